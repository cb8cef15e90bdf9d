"""The inference runtime of a CPU model file (copied beside each CPU ``model.py`` as ``runtime.py``).

A version directory holds ``model.onnx``; when the exporter selected an OpenVINO variant it also holds
``model.xml``/``model.bin``, the OpenVINO IR converted (and for ov_int8 quantized) from that ONNX file.
:func:`open_session` opens what the directory needs: an OpenVINO ``CompiledModel`` when the IR is there,
else an ONNX Runtime ``InferenceSession``. Both answer the same three calls (``get_inputs``,
``get_outputs``, ``run(output_names, feeds)``), so the served model and the exporter's gate drive them alike.
Imports only numpy, the standard library and the runtime it opens (it runs inside the Triton python stub).
"""
import os

import numpy as np

ONNX_FILE = "model.onnx"
IR_FILE = "model.xml"  # OpenVINO IR; its weights are model.bin beside it
IR_WEIGHTS = "model.bin"
ONNXRUNTIME, OPENVINO = "onnxruntime", "openvino"
# ONNX Runtime's session-level fusions left out: SkipLayerNormFusion would re-fuse the residual Add +
# LayerNormalization the exporter leaves apart on the CPU target (exporter/optimize.py SKIP_LAYER_NORM: the
# fused CPU kernel is the slower one). Every session that judges or serves a model file passes these.
DISABLED_OPTIMIZERS = ["SkipLayerNormFusion"]
# The IR's rt_info key of the inference precision the exporter gated it at (absent: the runtime's default)
PRECISION_KEY = ["runtime_options", "INFERENCE_PRECISION_HINT"]


def pinnable(instances, threads, cores):
    """Whether ``instances`` instances of ``threads`` fixed intra-op threads each are pinned, one core set per
    instance, on ``cores`` usable cores (serving/models/textmodel.py ``pin_instance`` does it; loadtest tune
    tries the layouts it pins both ways): every instance fits, the threads are fixed (not 0), and no CPU quota
    applies."""
    return threads >= 1 and instances * threads <= cores and not _cpu_quota_limited()


def _cpu_quota_limited():
    """True when a cgroup CPU quota (not a cpuset) limits this process: then the cores in its affinity mask
    are shared with others, and pinning to some of them would crowd onto those."""
    for path, unlimited in (("/sys/fs/cgroup/cpu.max", "max"), ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1")):
        try:
            with open(path) as fh:
                return fh.read().split()[0] != unlimited
        except (OSError, IndexError):
            continue
    return False


def ir_beside(onnx_path):
    """The OpenVINO IR in ``onnx_path``'s directory, or None when that directory runs on ONNX Runtime."""
    path = os.path.join(os.path.dirname(os.path.abspath(str(onnx_path))), IR_FILE)
    return path if os.path.isfile(path) else None


def runtime_of(onnx_path):
    """``openvino`` when an IR lies beside ``onnx_path``, else ``onnxruntime``."""
    return OPENVINO if ir_beside(onnx_path) else ONNXRUNTIME


class _Port:
    """A named input/output, as ONNX Runtime's NodeArg gives its ``name``."""

    def __init__(self, name):
        self.name = name


class OpenVINOSession:
    """An OpenVINO CompiledModel on the CPU behind ONNX Runtime's session calls: one infer request, run by one
    caller at a time (a Triton instance runs its requests in turn), ``threads`` inference threads (0: the
    runtime's default), one stream, no CPU pinning of its own (the instance pins itself: textmodel). The
    inference precision is the one the IR's rt_info names (``PRECISION_KEY``: the exporter writes it where it
    gated the model at a fixed precision), else the runtime's default (bf16 where the CPU has
    AMX/AVX512-BF16, else f32); ``precision`` holds what was compiled."""

    def __init__(self, xml_path, threads=1):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(xml_path))
        config = {"NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if model.has_rt_info(PRECISION_KEY):
            config["INFERENCE_PRECISION_HINT"] = model.get_rt_info(PRECISION_KEY).astype(str)
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self._inputs = [_Port(port.get_any_name()) for port in self.compiled.inputs]
        self._outputs = [_Port(port.get_any_name()) for port in self.compiled.outputs]

    def get_inputs(self):
        return list(self._inputs)

    def get_outputs(self):
        return list(self._outputs)

    def run(self, output_names, feeds):
        """The named outputs of one inference as numpy arrays the caller owns (copies: the request's output
        buffers are reused by the next call)."""
        self.request.infer(feeds)
        names = output_names or [p.name for p in self._outputs]
        return [np.array(self.request.get_tensor(name).data, copy=True) for name in names]


def ort_session(path, threads=1):
    """An ONNX Runtime CPU session: ``threads`` intra-op threads (0: the runtime's default), one inter-op
    thread, sequential, no spinning, without the ``DISABLED_OPTIMIZERS`` (the CPU target's session)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads > 0:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=DISABLED_OPTIMIZERS)


def open_session(onnx_path, threads=1):
    """The session a CPU model file needs: OpenVINO when its IR lies beside ``onnx_path``, else ONNX Runtime."""
    xml = ir_beside(onnx_path)
    return OpenVINOSession(xml, threads) if xml else ort_session(onnx_path, threads)
