"""The one module that owns the Triton model-repository layout (see docs/ARCHITECTURE.md).

Layout, per served model ``<name>`` (a :class:`serving.contract.ServedModel`; several can share one
repository):

- CPU target: ONE python-backend model ``<name>`` (tokenizer + ONNX Runtime on each row alone + head), one
  instance per usable core, 1 intra-op thread: ``<name>/1/{model.py, textmodel.py, contract.py,
  model.onnx, tokenizer/}``.
- GPU target: the ensemble ``<name>`` = ``<name>_tokenizer`` (python) -> ``<name>_encoder`` (onnxruntime,
  dynamic batching, input dims pinned to ``[max_length]``) -> ``<name>_postprocess`` (python).

Every ``config.pbtxt`` is a ``model_config_pb2.ModelConfig`` built from the ServedModel's tensors and written
with ``google.protobuf.text_format``; python models read their contract back from the config parameters
(``ServedModel.to_parameters``). Nobody outside this module builds paths into a repository: read it with
:func:`read_repository`; check it offline with :func:`validate_repository`.
"""
from __future__ import annotations

import enum
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from serving.contract import (
    DEFAULT_CLASSIFIER, ENCODER_INPUTS, ENCODER_LOGITS, ENCODER_PROBABILITIES, LABEL, LOGITS, PROBABILITIES,
    TEXT, ContractError, Head, Part, ServedModel, Tensor,
)
from serving.errors import RepositoryError

log = logging.getLogger(__name__)

VERSION = "1"
# Names of the default classifier's models on the GPU target (ServedModel().part(...)). Kept for callers
# that predate read_repository; new code reads the repository through read_repository().
ENSEMBLE = DEFAULT_CLASSIFIER
TOKENIZER, ENCODER, POSTPROCESS = (ServedModel(labels=("a", "b")).part(p) for p in Part)
MODEL_NAMES = (TOKENIZER, ENCODER, POSTPROCESS, ENSEMBLE)
ENCODER_OUTPUTS = (ENCODER_LOGITS, ENCODER_PROBABILITIES)
_CLIENT_TENSORS = (TEXT, LABEL, PROBABILITIES, LOGITS)  # re-exported for older callers (serving.contract owns them)

# The GPU target runs in this NGC image: 26.08, the newest release in Triton's compatibility matrix and past
# 25.07, which fixed the python-backend RCE chain (CVE-2025-23319/23320/23334) and the HTTP chunked-encoding
# overflow (CVE-2025-23310/23311) of 2.51 (docs/SECURITY.md). It ships ONNX Runtime 1.28.0: source:
# triton-inference-server/server docs/introduction/compatibility.md, table "ONNX Runtime Versions" (row
# "26.08 | 1.28.0"). The limits were measured on the onnxruntime 1.28.0 wheel (an Identity model per IR
# version / opset): it loads IR version <= 13 and ai.onnx opset <= 26, and refuses IR 14 and opset 27.
NGC_IMAGE = "nvcr.io/nvidia/tritonserver:26.08-py3"
NGC_ORT_VERSION = "1.28.0"
NGC_MAX_IR_VERSION = 13
NGC_MAX_OPSET = 26


MODELS_SRC = Path(__file__).parent / "models"
CONTRACT_SRC = Path(__file__).parent / "contract.py"
SHARED_SOURCES = {"textmodel.py": MODELS_SRC / "textmodel.py", "tokenization.py": MODELS_SRC / "tokenization.py",
                  "contract.py": CONTRACT_SRC}
ONNX_FILE = "model.onnx"
TOKENIZER_DIR = "tokenizer"
PROVENANCE = "provenance.json"
# A request's text rows (TEXT and TEXT_PAIR, UTF-8 bytes) may total this much; a text of any length below it is
# answered as the checkpoint saves it (cut before tokenizing: serving/models/tokenization.py). docs/SERVING.md
DEFAULT_MAX_REQUEST_BYTES = 4 << 20
MIN_MAX_REQUEST_BYTES = 1 << 20
LONG_TEXT_MODES = ("truncate", "chunk")


class Target(str, enum.Enum):
    CPU = "cpu"
    GPU = "gpu"


def usable_cores() -> int:
    """Cores this process may run on (affinity/cgroup cpusets), the CPU target's default instance count."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


GPU_QUEUE_DELAY_US = 2000  # the gpu encoder's default dynamic-batching delay


@dataclass
class RepositoryConfig:
    """How the repository is served. Defaults fit the local CPU target.

    CPU target: ``encoder_instances`` instances of the one python model (0 = one per usable core of the
    machine the repository is built for), each running rows alone with ``intra_op_threads`` threads (1);
    ``max_queue_delay_us`` is its dynamic-batching delay. GPU target: ``encoder_instances`` GPU instances of
    the onnxruntime encoder (0 = 1), ``max_queue_delay_us`` on the encoder and ``aux_queue_delay_us`` on the
    python tokenizer and postprocess. ``preferred_batch_sizes``: CPU (1,) (one request per execute call: rows
    run alone, so batching buys nothing, and an instance must not hold queued requests while another idles);
    GPU empty (no size is special). ``max_queue_delay_us``: CPU 0, GPU 2000.
    ``max_request_bytes``: the text rows of one request (UTF-8 bytes of TEXT and TEXT_PAIR) may total this
    much (>= 1 MiB), more is refused with 400; no text is refused for its length below it. ``long_text``:
    "truncate" (as the checkpoint saves it) or "chunk" (windows of ``chunk_overlap`` tokens overlap, at most
    ``max_chunks`` per text: docs/LONG_TEXT.md). ``trim_batch`` is unused since the CPU target runs rows
    alone (kept for old configs).
    """

    target: Target = field(default=Target.CPU,
                           metadata={"help": "cpu: one python-backend classifier; gpu: ensemble on the onnxruntime "
                                             "backend"})
    max_batch_size: int = field(default=64, metadata={"help": "largest batch Triton forms"})
    max_length: int = field(default=128, metadata={"help": "tokenizer truncation in tokens"})
    encoder_instances: int = field(default=0, metadata={
        "help": "instances of the model that runs the encoder (0: one per usable core on cpu, 1 on gpu)"})
    tokenizer_instances: int = field(default=1, metadata={"help": "gpu target: tokenizer model instances"})
    intra_op_threads: int = field(default=1, metadata={
        "help": "cpu target: ONNX Runtime intra-op threads per instance (0: the runtime's default)"})
    pin_instances: bool = field(default=True, metadata={
        "help": "cpu target: pin each instance to cores of its own (as the ceiling runs) when instances x "
                "threads fit the cores the server may use and no cgroup CPU quota applies"})
    preferred_batch_sizes: tuple[int, ...] | None = field(default=None, metadata={
        "help": "dynamic batcher preferred sizes in rows (default: cpu 1, so that each execute call takes one "
                "request and an idle instance never waits on requests another instance took; gpu none: the "
                "largest batch the delay allows)"})
    max_queue_delay_us: int | None = field(default=None, metadata={
        "help": "dynamic batcher delay in microseconds of the cpu model / the gpu encoder (default: cpu 0, "
                "since its rows run alone and waiting to batch them only adds latency; gpu 2000)"})
    max_queue_size: int = field(default=256,
                                metadata={"help": "requests queued before the server answers unavailable"})
    default_queue_timeout_us: int = field(default=30_000_000,
                                          metadata={"help": "microseconds a request may wait in the queue"})
    tensorrt: bool = field(default=False,
                           metadata={"help": "gpu target: TensorRT execution accelerator on the onnxruntime backend"})
    aux_queue_delay_us: int = field(default=500,
                                    metadata={"help": "gpu target: batcher delay of the tokenizer and postprocess "
                                                      "models in microseconds"})
    max_request_bytes: int = field(default=DEFAULT_MAX_REQUEST_BYTES, metadata={
        "help": "most UTF-8 bytes of text (all TEXT and TEXT_PAIR rows) in one request, more gets 400 (>= 1 MiB); "
                "no text is refused for its length below it"})
    long_text: str = field(default="truncate", metadata={
        "help": "truncate: a text is truncated at max_length as the checkpoint saves it; chunk: windows averaged"})
    chunk_overlap: int = field(default=32, metadata={"help": "chunk: tokens consecutive windows share"})
    max_chunks: int = field(default=16, metadata={"help": "chunk: most windows per text"})
    trim_batch: bool = field(default=True, metadata={"help": "unused: the cpu target runs every row alone"})
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "more model-config parameters"})

    def __post_init__(self) -> None:
        try:
            self.target = Target(self.target)
        except ValueError as exc:
            raise RepositoryError(f"target must be one of {[t.value for t in Target]}") from exc
        if self.max_batch_size < 1:
            raise RepositoryError("max_batch_size must be >= 1")
        if self.max_length < 8:
            raise RepositoryError("max_length must be >= 8")
        if self.encoder_instances < 0 or self.tokenizer_instances < 1:
            raise RepositoryError("instance counts must be >= 1 (encoder_instances 0: automatic)")
        if self.intra_op_threads < 0:
            raise RepositoryError("intra_op_threads must be >= 0")
        if self.preferred_batch_sizes is None:
            self.preferred_batch_sizes = () if self.target is Target.GPU else (1,)
        self.preferred_batch_sizes = tuple(int(b) for b in self.preferred_batch_sizes)
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise RepositoryError(f"preferred batch sizes {bad} are outside 1..max_batch_size")
        if self.max_queue_delay_us is None:
            self.max_queue_delay_us = GPU_QUEUE_DELAY_US if self.target is Target.GPU else 0
        if min(self.max_queue_delay_us, self.aux_queue_delay_us, self.max_queue_size,
               self.default_queue_timeout_us) < 0:
            raise RepositoryError("queue delay, size and timeout must be >= 0")
        if self.max_request_bytes < MIN_MAX_REQUEST_BYTES:
            raise RepositoryError(f"max_request_bytes must be >= {MIN_MAX_REQUEST_BYTES} (1 MiB)")
        if self.long_text not in LONG_TEXT_MODES:
            raise RepositoryError(f"long_text must be one of {list(LONG_TEXT_MODES)}")
        if self.chunk_overlap < 0 or self.max_chunks < 1:
            raise RepositoryError("chunk_overlap must be >= 0 and max_chunks >= 1")
        if self.long_text == "chunk" and self.target is Target.GPU:
            raise RepositoryError("long_text chunk is served by the cpu target")
        if self.long_text == "chunk" and self.chunk_overlap > (self.max_length - 2) // 2:
            raise RepositoryError(f"chunk_overlap {self.chunk_overlap} is over half a window at max_length "
                                  f"{self.max_length}")
        if self.tensorrt and self.target is not Target.GPU:
            raise RepositoryError("tensorrt needs target gpu")

    @property
    def instances(self) -> int:
        """Resolved instance count of the model that runs the encoder."""
        if self.encoder_instances:
            return self.encoder_instances
        return usable_cores() if self.target is Target.CPU else 1



# ----------------------------------------------------------------------------------------- configs


def _pb():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def _input(pb, t: Tensor, dtype: str | None = None):
    return pb.ModelInput(name=t.name, data_type=pb.DataType.Value(dtype or t.triton_type), dims=list(t.dims))


def _output(pb, t: Tensor, dtype: str | None = None):
    return pb.ModelOutput(name=t.name, data_type=pb.DataType.Value(dtype or t.triton_type), dims=list(t.dims))


def _batching(pb, config: RepositoryConfig, *, aux: bool = False):
    return pb.ModelDynamicBatching(
        preferred_batch_size=list(config.preferred_batch_sizes),
        max_queue_delay_microseconds=config.aux_queue_delay_us if aux else config.max_queue_delay_us,
        default_queue_policy=pb.ModelQueuePolicy(
            timeout_action=pb.ModelQueuePolicy.REJECT,
            default_timeout_microseconds=config.default_queue_timeout_us,
            allow_timeout_override=False,  # a client must not raise its own queue timeout
            max_queue_size=config.max_queue_size,
        ),
    )


def _params(cfg, values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        cfg.parameters[key].string_value = value if isinstance(value, str) else json.dumps(value)


def _python_model(pb, name: str, config: RepositoryConfig, count: int, *, aux: bool):
    cfg = pb.ModelConfig(name=name, backend="python", max_batch_size=config.max_batch_size)
    cfg.instance_group.append(pb.ModelInstanceGroup(kind=pb.ModelInstanceGroup.KIND_CPU, count=count))
    cfg.dynamic_batching.CopyFrom(_batching(pb, config, aux=aux))
    return cfg


def _text_params(config: RepositoryConfig, tokenizer_params: Mapping[str, Any]) -> dict[str, str]:
    return {"max_length": str(config.max_length), "max_request_bytes": str(config.max_request_bytes),
            "long_text": config.long_text, "chunk_overlap": str(config.chunk_overlap),
            "max_chunks": str(config.max_chunks), **{k: str(v) for k, v in tokenizer_params.items()}}


def _cpu_config(pb, config: RepositoryConfig, model: ServedModel, tokenizer_params: Mapping[str, Any]):
    """The CPU target's one python model: TEXT in, the head's outputs out, rows run alone."""
    cfg = _python_model(pb, model.name, config, config.instances, aux=False)
    cfg.input.extend(_input(pb, t) for t in model.inputs)
    cfg.output.extend(_output(pb, t) for t in model.outputs)
    _params(cfg, {**model.to_parameters(), **_text_params(config, tokenizer_params),
                  "intra_op_threads": str(config.intra_op_threads),
                  "pin_instances": "true" if config.pin_instances else "false"})
    return cfg


def _encoder_tensors(model: ServedModel, config: RepositoryConfig, encoder_inputs: Sequence[str],
                     output_types: Mapping[str, str]) -> tuple[list[Tensor], list[tuple[Tensor, str]]]:
    """The GPU encoder's inputs (pinned to [max_length]) and outputs with their Triton types."""
    inputs = [Tensor(name, "INT64", (config.max_length,)) for name in encoder_inputs]
    outputs = [(Tensor(name, "FP32", (model.num_outputs,)), output_types.get(name, "TYPE_FP32"))
               for name in model.encoder_outputs]
    return inputs, outputs


def _gpu_encoder(pb, config: RepositoryConfig, model: ServedModel, inputs, outputs):
    enc = pb.ModelConfig(name=model.part(Part.ENCODER), backend="onnxruntime", max_batch_size=config.max_batch_size,
                         default_model_filename=ONNX_FILE)
    enc.input.extend(_input(pb, t) for t in inputs)
    enc.output.extend(_output(pb, t, dtype) for t, dtype in outputs)
    enc.dynamic_batching.CopyFrom(_batching(pb, config))
    enc.instance_group.append(pb.ModelInstanceGroup(kind=pb.ModelInstanceGroup.KIND_GPU, count=config.instances))
    if config.tensorrt:
        trt = pb.ModelOptimizationPolicy.ExecutionAccelerators.Accelerator(name="tensorrt")
        trt.parameters["precision_mode"] = "FP16"
        trt.parameters["max_workspace_size_bytes"] = str(1 << 30)
        trt.parameters["trt_engine_cache_enable"] = "1"
        trt.parameters["trt_engine_cache_path"] = "/tmp/trt_cache"  # the repository is mounted read-only
        enc.optimization.execution_accelerators.gpu_execution_accelerator.append(trt)
    return enc


def _gpu_ensemble(pb, config: RepositoryConfig, model: ServedModel, inputs, outputs):
    ens = pb.ModelConfig(name=model.name, platform="ensemble", max_batch_size=config.max_batch_size)
    ens.input.extend(_input(pb, t) for t in model.inputs)
    ens.output.extend(_output(pb, t) for t in model.outputs)
    step = pb.ModelEnsembling.Step
    ens.ensemble_scheduling.step.append(step(
        model_name=model.part(Part.TOKENIZER), model_version=-1,
        input_map={t.name: t.name for t in model.inputs}, output_map={t.name: f"_{t.name}" for t in inputs}))
    ens.ensemble_scheduling.step.append(step(
        model_name=model.part(Part.ENCODER), model_version=-1,
        input_map={t.name: f"_{t.name}" for t in inputs}, output_map={t.name: f"_{t.name}" for t, _ in outputs}))
    ens.ensemble_scheduling.step.append(step(
        model_name=model.part(Part.POSTPROCESS), model_version=-1,
        input_map={t.name: f"_{t.name}" for t, _ in outputs}, output_map={t.name: t.name for t in model.outputs}))
    _params(ens, model.to_parameters())
    return ens


def _gpu_configs(pb, config: RepositoryConfig, model: ServedModel, encoder_inputs: Sequence[str],
                 output_types: Mapping[str, str], tokenizer_params: Mapping[str, Any]) -> dict[str, Any]:
    """The GPU target's ensemble and its three steps, keyed by model name."""
    inputs, outputs = _encoder_tensors(model, config, encoder_inputs, output_types)
    tok = _python_model(pb, model.part(Part.TOKENIZER), config, config.tokenizer_instances, aux=True)
    tok.input.extend(_input(pb, t) for t in model.inputs)
    tok.output.extend(_output(pb, t) for t in inputs)
    _params(tok, {**model.to_parameters(), **_text_params(config, tokenizer_params)})
    post = _python_model(pb, model.part(Part.POSTPROCESS), config, 1, aux=True)
    post.input.extend(_input(pb, t, dtype) for t, dtype in outputs)
    post.output.extend(_output(pb, t) for t in model.outputs)
    _params(post, model.to_parameters())
    enc = _gpu_encoder(pb, config, model, inputs, outputs)
    ens = _gpu_ensemble(pb, config, model, inputs, outputs)
    return {cfg.name: cfg for cfg in (tok, enc, post, ens)}


def _as_model(model: ServedModel | Sequence[str]) -> ServedModel:
    if isinstance(model, ServedModel):
        return model
    try:
        return ServedModel(labels=tuple(model))
    except ContractError as exc:
        raise RepositoryError(str(exc)) from exc


def build_configs(
    config: RepositoryConfig,
    model: ServedModel | Sequence[str],
    *,
    encoder_inputs: Sequence[str] = ENCODER_INPUTS,
    output_types: Mapping[str, str] | None = None,
    tokenizer_params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``ModelConfig`` messages of one served model (keyed by model name); ``model`` may be a label list
    (the default classifier)."""
    pb, model = _pb(), _as_model(model)
    if model.head not in (Head.SINGLE_LABEL, Head.MULTI_LABEL, Head.REGRESSION):
        raise RepositoryError(f"head {model.head.value} is not served by the classifier models")
    if config.target is Target.CPU:
        return {model.name: _cpu_config(pb, config, model, tokenizer_params or {})}
    return _gpu_configs(pb, config, model, encoder_inputs, output_types or {}, tokenizer_params or {})


def config_text(model_config) -> str:
    """Text-format protobuf of a ``ModelConfig``."""
    from google.protobuf import text_format

    return text_format.MessageToString(model_config)


def read_config(path: Path):
    """Parse a ``config.pbtxt`` back into a ``ModelConfig``."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(Path(path).read_text(encoding="utf-8"), _pb().ModelConfig())
    except (OSError, text_format.ParseError) as exc:
        raise RepositoryError(f"{path}: cannot parse: {exc}") from exc


# ---------------------------------------------------------------------------------------- onnx checks


_ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 7: "TYPE_INT64", 6: "TYPE_INT32", 16: "TYPE_BF16"}


def inspect_onnx(path: Path) -> dict[str, Any]:
    """IR version, default-domain opset, input names and output Triton types of an ONNX file."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise RepositoryError(f"{path}: not a readable ONNX model: {exc}") from exc
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    outputs = {}
    for out in model.graph.output:
        elem = out.type.tensor_type.elem_type
        outputs[out.name] = _ONNX_TO_TRITON.get(elem, f"onnx-elem-{elem}")
    initializer_names = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializer_names]
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    return {"ir_version": model.ir_version, "opset": opset, "inputs": inputs, "outputs": outputs,
            "external_data": external}


def check_onnx_for_image(info: Mapping[str, Any], path: Path) -> None:
    """Raise if the model's IR version or opset is newer than the pinned NGC image's ONNX Runtime."""
    if info["ir_version"] > NGC_MAX_IR_VERSION:
        raise RepositoryError(
            f"{path}: ONNX IR version {info['ir_version']} > {NGC_MAX_IR_VERSION}, the newest that "
            f"ONNX Runtime {NGC_ORT_VERSION} in {NGC_IMAGE} loads; re-export with an older IR/opset"
        )
    if info["opset"] > NGC_MAX_OPSET:
        raise RepositoryError(
            f"{path}: ONNX opset {info['opset']} > {NGC_MAX_OPSET}, the newest that ONNX Runtime "
            f"{NGC_ORT_VERSION} in {NGC_IMAGE} supports; re-export with opset <= {NGC_MAX_OPSET}"
        )


# ------------------------------------------------------------------------------------------ writing


def _labels(id2label: Mapping[int, str], minimum: int = 2) -> list[str]:
    try:
        ids = sorted(int(k) for k in id2label)
    except (TypeError, ValueError) as exc:
        raise RepositoryError(f"id2label keys must be integers: {list(id2label)}") from exc
    if ids != list(range(len(ids))) or len(ids) < minimum:
        raise RepositoryError(f"id2label must map 0..n-1 (n >= {minimum}) to labels, got keys {ids}")
    labels = [str(id2label[i] if i in id2label else id2label[str(i)]) for i in ids]  # type: ignore[index]
    if len(set(labels)) != len(labels):
        raise RepositoryError(f"labels must be distinct: {labels}")
    return labels


def _side(value: Any, what: str, path: Path) -> str:
    if value in (None, "right", "left"):
        return value or "right"
    raise RepositoryError(f"{path}: {what} must be 'left' or 'right', got {value!r}")


def tokenizer_settings(tokenizer_dir: Path) -> dict[str, str]:
    """The checkpoint tokenizer's settings the served tokenizer applies: pad token and id, padding side and
    truncation side (tokenizer_config.json). Normalisation and special tokens live in tokenizer.json."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    cfg_path = tokenizer_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    pad = cfg.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    pad_token = pad if isinstance(pad, str) else "[PAD]"
    pad_id = tok.token_to_id(pad_token)
    if pad_id is None:
        raise RepositoryError(f"{tokenizer_dir}: pad token {pad_token!r} is not in the vocabulary")
    return {"pad_token": pad_token, "pad_id": str(pad_id),
            "padding_side": _side(cfg.get("padding_side"), "padding_side", cfg_path),
            "truncation_side": _side(cfg.get("truncation_side"), "truncation_side", cfg_path)}


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _check_onnx(onnx_model: Path, model: ServedModel, target: Target) -> dict[str, Any]:
    """The ONNX file's facts (inspect_onnx) once it is known to fit the model and the target."""
    if not onnx_model.is_file():
        raise RepositoryError(f"ONNX model not found: {onnx_model}")
    info = inspect_onnx(onnx_model)
    if info["external_data"]:
        raise RepositoryError(f"{onnx_model}: weights in external-data files are not supported; save one file")
    missing = [n for n in ENCODER_INPUTS[:2] if n not in info["inputs"]]
    missing += [n for n in model.encoder_outputs if n not in info["outputs"]]
    if missing:
        raise RepositoryError(
            f"{onnx_model}: missing tensors {missing}; expected inputs {list(ENCODER_INPUTS)} and outputs "
            f"{list(model.encoder_outputs)} (got inputs {info['inputs']}, outputs {list(info['outputs'])})"
        )
    unknown = [n for n in info["inputs"] if n not in ENCODER_INPUTS]
    if unknown:
        raise RepositoryError(f"{onnx_model}: unexpected inputs {unknown}")
    if target is Target.GPU:
        check_onnx_for_image(info, onnx_model)
    bad = {n: info["outputs"][n] for n in model.encoder_outputs if info["outputs"][n] not in ("TYPE_FP32", "TYPE_FP16")}
    if bad:
        raise RepositoryError(f"{onnx_model}: outputs must be float32 or float16, got {bad}")
    return info


def _copy_python(dst: Path, source: str) -> None:
    """A python model's sources: model.py plus the shared modules it imports from its version dir."""
    shutil.copy2(MODELS_SRC / source, dst / "model.py")
    for name, src in SHARED_SOURCES.items():
        shutil.copy2(src, dst / name)


def _copy_tokenizer(dst: Path, tokenizer_dir: Path) -> None:
    (dst / TOKENIZER_DIR).mkdir()
    for fname in _TOKENIZER_FILES:
        if (tokenizer_dir / fname).is_file():
            shutil.copy2(tokenizer_dir / fname, dst / TOKENIZER_DIR / fname)


def _python_sources(model: ServedModel) -> tuple[str, str]:
    """(the CPU target's one model, the GPU ensemble's postprocess): python sources of the model's head."""
    if model.head is Head.EMBEDDING:
        return "embedder.py", "embedding_postprocess.py"
    return "classifier.py", "postprocess.py"


def _write_model_files(root: Path, configs: Mapping[str, Any], model: ServedModel, target: Target,
                       onnx_model: Path, tokenizer_dir: Path) -> None:
    """Every file of one served model: configs, python sources, tokenizer, ONNX."""
    cpu_source, postprocess_source = _python_sources(model)
    for name, model_config in configs.items():
        (root / name / VERSION).mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(config_text(model_config), encoding="utf-8")
    if target is Target.CPU:
        version = root / model.name / VERSION
        _copy_python(version, cpu_source)
        _copy_tokenizer(version, tokenizer_dir)
        shutil.copy2(onnx_model, version / ONNX_FILE)
        return
    _copy_python(root / model.part(Part.TOKENIZER) / VERSION, "tokenizer.py")
    _copy_tokenizer(root / model.part(Part.TOKENIZER) / VERSION, tokenizer_dir)
    shutil.copy2(onnx_model, root / model.part(Part.ENCODER) / VERSION / ONNX_FILE)
    _copy_python(root / model.part(Part.POSTPROCESS) / VERSION, postprocess_source)


def _provenance(root: Path, config: RepositoryConfig, model: ServedModel, onnx_model: Path,
                info: Mapping[str, Any], exporter: Mapping[str, Any] | None) -> dict[str, Any]:
    from common.provenance import hash_tree, sha256_file, versions

    return {
        "target": config.target.value,
        "config": {**asdict(config), "target": config.target.value},
        "resolved": {"instances": config.instances, "max_request_bytes": config.max_request_bytes},
        "labels": list(model.labels),
        "models": {model.name: model.to_json()},
        "onnx": {"source": str(onnx_model.absolute()), "sha256": sha256_file(onnx_model),
                 "ir_version": info["ir_version"], "opset": info["opset"]},
        "ngc_image": NGC_IMAGE if config.target is Target.GPU else None,
        "files": hash_tree(root),
        "versions": versions(),
        "exporter": dict(exporter or {}),
    }


def _served_model(model: ServedModel | None, id2label: Mapping[int, str]) -> ServedModel:
    one = model is not None and model.head in (Head.REGRESSION, Head.MULTI_LABEL)  # heads with 1 output/label
    labels = _labels(id2label, 1 if one else 2)
    if model is None:
        return _as_model(labels)
    if model.labels and list(model.labels) != labels:
        raise RepositoryError(f"model {model.name!r} has labels {list(model.labels)}, id2label gives {labels}")
    return model


def write_repository(
    out: Path,
    *,
    onnx_model: Path,
    tokenizer_dir: Path,
    id2label: Mapping[int, str],
    config: RepositoryConfig,
    provenance: Mapping[str, Any] | None = None,
    model: ServedModel | None = None,
) -> Path:
    """Write a complete repository serving ``model`` (default: the classifier ``classifier`` with the labels
    of ``id2label``) to ``out`` atomically (temp dir, swap at the end); return ``out``."""
    from common.atomic import atomic_directory

    out, onnx_model, tokenizer_dir = Path(out), Path(onnx_model), Path(tokenizer_dir)
    served = replace(_served_model(model, id2label), chunked=config.long_text == "chunk")
    if not onnx_model.is_file():
        raise RepositoryError(f"ONNX model not found: {onnx_model}")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise RepositoryError(f"{tokenizer_dir}: no tokenizer.json (a fast tokenizer is required)")
    info = _check_onnx(onnx_model, served, config.target)
    configs = build_configs(
        config, served, encoder_inputs=[n for n in ENCODER_INPUTS if n in info["inputs"]],
        output_types={n: info["outputs"][n] for n in served.encoder_outputs},
        tokenizer_params=tokenizer_settings(tokenizer_dir),
    )
    with atomic_directory(out) as tmp:
        _write_model_files(tmp, configs, served, config.target, onnx_model, tokenizer_dir)
        record = _provenance(tmp, config, served, onnx_model, info, provenance)
        (tmp / PROVENANCE).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        validate_repository(tmp, config.target)
    log.info("wrote %s repository %s (model %s, labels %s, %d instance(s))", config.target.value, out,
             served.name, list(served.labels), config.instances)
    return out


# ------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class ServedModelInfo:
    """One served model of a repository: its contract, its configs, and where its ONNX file and tokenizer
    are. ``parts`` holds the GPU ensemble's internal models by :class:`Part` value (empty on the CPU)."""

    contract: ServedModel
    target: Target
    config: Any  # the served model's ModelConfig (CPU: the python model; GPU: the ensemble)
    parts: Mapping[str, Any]
    onnx_path: Path
    tokenizer_dir: Path

    @property
    def name(self) -> str:
        return self.contract.name

    @property
    def model_names(self) -> list[str]:
        """Every model directory of this served model (internal ones first)."""
        return [cfg.name for cfg in self.parts.values()] + [self.name]

    @property
    def encoder_config(self) -> Any:
        """The config of the model that runs the ONNX file."""
        return self.config if self.target is Target.CPU else self.parts[Part.ENCODER.value]

    @property
    def instances(self) -> int:
        return sum(g.count for g in self.encoder_config.instance_group) or 1

    @property
    def intra_op_threads(self) -> int:
        """ONNX Runtime intra-op threads per instance (0: the runtime's default; GPU: not set)."""
        param = self.encoder_config.parameters.get("intra_op_threads")
        return int(param.string_value or 0) if param is not None else 0

    @property
    def max_batch_size(self) -> int:
        return int(self.config.max_batch_size)

    @property
    def batching(self) -> Any:
        """The dynamic-batching settings of the model that runs the ONNX file."""
        return self.encoder_config.dynamic_batching


@dataclass(frozen=True)
class RepositoryInfo:
    """A model repository as written by :func:`write_repository`."""

    path: Path
    target: Target
    models: Mapping[str, ServedModelInfo]
    configs: Mapping[str, Any]  # every model directory's ModelConfig, by name
    provenance: Mapping[str, Any]

    def model(self, name: str | None = None) -> ServedModelInfo:
        """A served model by name; without a name, the only one (or ``classifier``)."""
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            name = DEFAULT_CLASSIFIER
        if name not in self.models:
            raise RepositoryError(f"{self.path}: no served model {name!r} (has {sorted(self.models)})")
        return self.models[name]


def _read_configs(path: Path) -> dict[str, Any]:
    configs = {}
    for cfg_path in sorted(path.glob("*/config.pbtxt")):
        name = cfg_path.parent.name
        cfg = read_config(cfg_path)
        if cfg.name and cfg.name != name:
            raise RepositoryError(f"{cfg_path}: name '{cfg.name}' does not match its directory '{name}'")
        cfg.name = name
        configs[name] = cfg
    return configs


def _contract(cfg) -> ServedModel | None:
    """The contract a config carries in its parameters (None when it carries none)."""
    params = dict(cfg.parameters)
    if "contract" not in params and "labels" not in params:
        return None
    try:
        return ServedModel.from_parameters(params, max_batch_size=int(cfg.max_batch_size))
    except (ContractError, ValueError, TypeError) as exc:
        raise RepositoryError(f"model '{cfg.name}': bad contract parameters: {exc}") from exc


def _served_info(root: Path, cfg, contract: ServedModel, configs: Mapping[str, Any]) -> ServedModelInfo:
    if cfg.platform == "ensemble":
        parts = {p.value: configs[contract.part(p)] for p in Part if contract.part(p) in configs}
        return ServedModelInfo(contract, Target.GPU, cfg, parts,
                               root / contract.part(Part.ENCODER) / VERSION / ONNX_FILE,
                               root / contract.part(Part.TOKENIZER) / VERSION / TOKENIZER_DIR)
    if cfg.backend == "python":
        version = root / contract.name / VERSION
        return ServedModelInfo(contract, Target.CPU, cfg, {}, version / ONNX_FILE, version / TOKENIZER_DIR)
    raise RepositoryError(f"model '{cfg.name}' is neither a python model (cpu target) nor an ensemble (gpu)")


def read_repository(path: Path) -> RepositoryInfo:
    """Read a repository's served models, their contracts and configs, and its provenance (no deep checks:
    see :func:`validate_repository`)."""
    path = Path(path)
    if not path.is_dir():
        raise RepositoryError(f"repository not found: {path}")
    configs = _read_configs(path)
    models = {}
    for name, cfg in configs.items():
        contract = _contract(cfg)
        if contract is not None and contract.name == name:
            models[name] = _served_info(path, cfg, contract, configs)
    if not models:
        raise RepositoryError(f"{path}: no served model (no config.pbtxt with a 'contract' parameter)")
    targets = {m.target for m in models.values()}
    if len(targets) > 1:
        raise RepositoryError(f"{path}: models for several targets {sorted(t.value for t in targets)}")
    prov_path = path / PROVENANCE
    try:
        provenance = json.loads(prov_path.read_text(encoding="utf-8")) if prov_path.is_file() else {}
    except ValueError as exc:
        raise RepositoryError(f"{prov_path}: not JSON: {exc}") from exc
    return RepositoryInfo(path, targets.pop(), models, configs, provenance)


# ---------------------------------------------------------------------------------------- validation


def _require(path: Path, what: str) -> None:
    if not path.is_file():
        raise RepositoryError(f"missing {what}: {path}")


def _check_scheduled(root: Path, cfg) -> None:
    """A model Triton schedules itself: batching on, a queue, a version directory."""
    if cfg.max_batch_size < 1:
        raise RepositoryError(f"model '{cfg.name}': max_batch_size must be > 0 (dynamic batching)")
    if not cfg.HasField("dynamic_batching"):
        raise RepositoryError(f"model '{cfg.name}' has no dynamic_batching")
    if not (root / cfg.name / VERSION).is_dir():
        raise RepositoryError(f"missing version directory of model '{cfg.name}': {root / cfg.name / VERSION}")


def _check_python(root: Path, cfg) -> None:
    if cfg.backend != "python":
        raise RepositoryError(f"model '{cfg.name}' must use the python backend, not '{cfg.backend}'")
    for fname in ("model.py", *SHARED_SOURCES):
        _require(root / cfg.name / VERSION / fname, f"python source {fname} of model '{cfg.name}'")


def _check_signature(cfg, contract: ServedModel) -> None:
    """The served model's tensors are exactly the contract's."""
    want = {(t.name, t.triton_type, tuple(t.dims)) for t in contract.inputs + contract.outputs}
    pb = _pb()
    got = {(t.name, pb.DataType.Name(t.data_type), tuple(t.dims)) for t in [*cfg.input, *cfg.output]}
    if got != want:
        raise RepositoryError(f"model '{cfg.name}': tensors {sorted(got)} differ from its contract {sorted(want)}")


def _check_encoder_onnx(m: ServedModelInfo, input_names: Sequence[str] | None = None) -> dict[str, Any]:
    _require(m.onnx_path, f"ONNX model of '{m.name}'")
    info = inspect_onnx(m.onnx_path)
    if m.target is Target.GPU:
        check_onnx_for_image(info, m.onnx_path)
    if input_names is not None and sorted(input_names) != sorted(info["inputs"]):
        raise RepositoryError(f"encoder config inputs {list(input_names)} != ONNX inputs {info['inputs']}")
    missing = [n for n in m.contract.encoder_outputs if n not in info["outputs"]]
    unknown = [n for n in info["inputs"] if n not in ENCODER_INPUTS]
    if missing or unknown:
        raise RepositoryError(f"{m.onnx_path}: outputs {missing} missing, inputs {unknown} unexpected")
    return info


def _validate_cpu(root: Path, m: ServedModelInfo) -> list[str]:
    _check_scheduled(root, m.config)
    _check_python(root, m.config)
    _check_signature(m.config, m.contract)
    params = {k: v.string_value for k, v in m.config.parameters.items()}
    missing = [k for k in ("max_length", "max_request_bytes", "pad_id", "pad_token") if not params.get(k)]
    if missing:
        raise RepositoryError(f"model '{m.name}': missing parameters {missing}")
    _require(m.tokenizer_dir / "tokenizer.json", "tokenizer file")
    _check_encoder_onnx(m)
    return [m.name]


def _validate_gpu(root: Path, m: ServedModelInfo, configs: Mapping[str, Any]) -> list[str]:
    missing = [m.contract.part(p) for p in Part if p.value not in m.parts]
    if missing:
        raise RepositoryError(f"missing config of model(s) {missing} (ensemble '{m.name}')")
    _validate_ensemble(m.config, configs)
    _check_signature(m.config, m.contract)
    tok, enc, post = (m.parts[p.value] for p in Part)
    for cfg in (tok, enc, post):
        _check_scheduled(root, cfg)
    _check_python(root, tok)
    _check_python(root, post)
    if enc.backend != "onnxruntime":
        raise RepositoryError(f"model '{enc.name}' must use the onnxruntime backend, not '{enc.backend}'")
    _require(m.tokenizer_dir / "tokenizer.json", "tokenizer file")
    _check_encoder_onnx(m, [t.name for t in enc.input])
    produced = {t.name: list(t.dims) for t in tok.output}
    for t in enc.input:
        if list(t.dims) != produced.get(t.name) or min(t.dims, default=-1) < 1:
            raise RepositoryError(f"model '{enc.name}': input {t.name} dims {list(t.dims)} must be pinned to "
                                  f"what '{tok.name}' produces ({produced.get(t.name)})")
    return m.model_names


def validate_repository(path: Path, target: Target | None = None) -> list[str]:
    """Check a repository offline (every served model: configs, files, wiring, ONNX opset/IR); return the
    names of its models."""
    info = read_repository(path)
    if target is not None and Target(target) is not info.target:
        raise RepositoryError(f"repository is for target {info.target.value}, not {Target(target).value}")
    names: list[str] = []
    for m in info.models.values():
        names += _validate_cpu(info.path, m) if m.target is Target.CPU else _validate_gpu(info.path, m, info.configs)
    orphans = sorted(set(info.configs) - set(names))
    if orphans:
        raise RepositoryError(f"models {orphans} belong to no served model")
    return names


def _validate_ensemble(ens, configs: Mapping[str, Any]) -> None:
    if ens.platform != "ensemble" or not ens.ensemble_scheduling.step:
        raise RepositoryError(f"model '{ens.name}' is not an ensemble with steps")
    available = {t.name for t in ens.input}
    for i, step in enumerate(ens.ensemble_scheduling.step):
        model = configs.get(step.model_name)
        if model is None:
            raise RepositoryError(f"ensemble step {i} names unknown model '{step.model_name}'")
        model_inputs = {t.name for t in model.input}
        model_outputs = {t.name for t in model.output}
        for key, tensor in step.input_map.items():
            if key not in model_inputs:
                raise RepositoryError(f"ensemble step {i}: '{key}' is not an input of '{step.model_name}'")
            if tensor not in available:
                raise RepositoryError(f"ensemble step {i}: tensor '{tensor}' is not produced before it")
        missing = model_inputs - set(step.input_map)
        if missing:
            raise RepositoryError(f"ensemble step {i}: inputs {sorted(missing)} of '{step.model_name}' unmapped")
        for key, tensor in step.output_map.items():
            if key not in model_outputs:
                raise RepositoryError(f"ensemble step {i}: '{key}' is not an output of '{step.model_name}'")
            available.add(tensor)
    for out in ens.output:
        if out.name not in available:
            raise RepositoryError(f"ensemble output '{out.name}' is produced by no step")


# -------------------------------------------------------------------- embedding models; several models




def build_embedding_configs(config: RepositoryConfig, model: ServedModel, *,
                            encoder_inputs: Sequence[str] = ENCODER_INPUTS,
                            output_types: Mapping[str, str] | None = None,
                            tokenizer_params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``ModelConfig`` messages of one embedding model: CPU, one python model (TEXT -> EMBEDDING, rows
    alone); GPU, the ensemble ``<name>_tokenizer`` -> ``<name>_encoder`` -> ``<name>_postprocess`` (a cast)."""
    if model.head is not Head.EMBEDDING:
        raise RepositoryError(f"model {model.name!r} has head {model.head.value}, not embedding")
    if config.long_text != "truncate":
        raise RepositoryError("long_text chunk is not served for embedding models yet (classifiers only)")
    pb = _pb()
    if config.target is Target.CPU:
        return {model.name: _cpu_config(pb, config, model, tokenizer_params or {})}
    return _gpu_configs(pb, config, model, encoder_inputs, output_types or {}, tokenizer_params or {})


def _model_configs(config: RepositoryConfig, model: ServedModel, onnx_model: Path, tokenizer_dir: Path):
    """(configs, ONNX facts) of one served model of any head this module serves."""
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise RepositoryError(f"{tokenizer_dir}: no tokenizer.json (a fast tokenizer is required)")
    info = _check_onnx(onnx_model, model, config.target)
    build = build_embedding_configs if model.head is Head.EMBEDDING else build_configs
    configs = build(config, model, encoder_inputs=[n for n in ENCODER_INPUTS if n in info["inputs"]],
                    output_types={n: info["outputs"][n] for n in model.encoder_outputs},
                    tokenizer_params=tokenizer_settings(tokenizer_dir))
    return configs, info


def _existing(out: Path) -> RepositoryInfo | None:
    """The repository already at ``out`` (None when there is none); anything else there is an error."""
    if not out.exists():
        return None
    if out.is_dir() and not any(out.iterdir()):
        return None
    return read_repository(out)


def _keep_existing(tmp: Path, existing: RepositoryInfo, model: ServedModel, new_names: Sequence[str]) -> None:
    """Copy the existing repository into ``tmp`` (without bytecode), check it against its own provenance,
    then drop the directories of the model being replaced."""
    from serving.integrity import verify_repository

    shutil.copytree(existing.path, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    verify_repository(tmp)  # never re-sign a repository that was changed since it was built
    (tmp / PROVENANCE).unlink()  # rewritten with the new model (the hashes never cover this file)
    old = existing.models.get(model.name)
    if old is not None and old.contract.head is not model.head:
        raise RepositoryError(f"{existing.path} already serves a {old.contract.head.value} model named "
                              f"{model.name!r}; choose another name for the {model.head.value} model")
    replaced = old.model_names if old is not None else []
    others = set(existing.configs) - set(replaced)
    clash = sorted(others & set(new_names))
    if clash:
        raise RepositoryError(f"{existing.path}: model directories {clash} belong to another served model")
    for name in replaced:
        shutil.rmtree(tmp / name)


def _merged_provenance(tmp: Path, existing: RepositoryInfo | None, config: RepositoryConfig, model: ServedModel,
                       onnx_model: Path, info: Mapping[str, Any], exporter: Mapping[str, Any] | None) -> dict:
    """The repository's provenance with ``model`` added: ``models`` and ``served`` (per model: its config,
    ONNX file and exporter record) updated, ``files`` rehashed; what the other models recorded is kept."""
    from common.provenance import hash_tree

    own = _provenance(tmp, config, model, onnx_model, info, exporter)
    record = dict(existing.provenance) if existing is not None else own
    record["models"] = {**record.get("models", {}), model.name: model.to_json()}
    served = {k: own[k] for k in ("config", "resolved", "onnx", "exporter")}
    record["served"] = {**record.get("served", {}), model.name: served}
    record["files"] = hash_tree(tmp)
    return record


def add_model(out: Path, *, onnx_model: Path, tokenizer_dir: Path, model: ServedModel, config: RepositoryConfig,
              provenance: Mapping[str, Any] | None = None) -> Path:
    """Add (or replace) the served ``model`` in the repository at ``out``, keeping every other model;
    atomic (copy, add, swap) with the provenance and integrity hashes updated. Creates the repository
    when there is none."""
    from common.atomic import atomic_directory

    out, onnx_model, tokenizer_dir = Path(out), Path(onnx_model), Path(tokenizer_dir)
    model = replace(model, chunked=config.long_text == "chunk")
    configs, info = _model_configs(config, model, onnx_model, tokenizer_dir)
    existing = _existing(out)
    if existing is not None and existing.target is not config.target:
        raise RepositoryError(f"{out} serves the {existing.target.value} target; cannot add a "
                              f"{config.target.value} model")
    with atomic_directory(out) as tmp:
        if existing is not None:
            _keep_existing(tmp, existing, model, list(configs))
        _write_model_files(tmp, configs, model, config.target, onnx_model, tokenizer_dir)
        record = _merged_provenance(tmp, existing, config, model, onnx_model, info, provenance)
        (tmp / PROVENANCE).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        validate_repository(tmp, config.target)
    log.info("added %s model %s to %s (%d instance(s)); it serves %s", config.target.value, model.name, out,
             config.instances, ", ".join(sorted(read_repository(out).models)))
    return out
