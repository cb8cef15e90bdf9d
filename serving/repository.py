"""The one module that owns the Triton model-repository layout (see docs/ARCHITECTURE.md).

Layout, per served model ``<name>`` (a :class:`serving.contract.ServedModel`; several can share one
repository):

- CPU target: ONE python-backend model ``<name>`` (tokenizer + ONNX Runtime on each row alone + head), one
  instance per usable core, 1 intra-op thread: ``<name>/<version>/{model.py, textmodel.py, contract.py,
  model.onnx, tokenizer/}``.
- GPU target: ONE python-backend model ``<name>`` too (tokenizer + ONNX Runtime with the CUDA provider, the
  CPU provider where no GPU is present + head), taking a dynamic batch of requests and running their rows in
  token-budget sub-batches sorted by length, each padded only to its own longest row (token_batch.py):
  ``<name>/1/{model.py, textmodel.py, contract.py, token_batch.py, model.onnx, tokenizer/}``. The config's
  ``target`` parameter tells the two apart.

Versions: a model's first build is version 1; :func:`add_model` into a repository that already serves the
model writes the next version beside the current one and keeps the newest ``keep_versions`` (default 2),
each with its own provenance record (``served[<name>].versions``). Versions share the model's
``config.pbtxt`` (``version_policy: latest 1``, so Triton serves the newest; its ``versions`` parameter
lists the directories, which ``serving.control`` reads to roll back); a build whose config differs from
the served one starts over with only the new version (older ones do not fit its config).

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
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from serving.contract import (
    DEFAULT_CLASSIFIER, ENCODER_INPUTS, ENCODER_LOGITS, ENCODER_PROBABILITIES, LABEL, LOGITS, PROBABILITIES,
    TEXT, ContractError, Head, ServedModel, Tensor,
)
from serving.errors import RepositoryError
from serving.integrity import PROVENANCE, verify_repository
from serving.models.token_batch import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_OVERHEAD_TOKENS

log = logging.getLogger(__name__)

VERSION = "1"  # a new model's first version; later ones: model_versions() / ServedModelInfo.version
KEEP_VERSIONS = 2  # versions of a model a build keeps: the new one and the one before (rollback)
VERSIONS_PARAM = "versions"  # config parameter: the version directories beside the config, "1,2"
# The default classifier's model name (one model per served model on both targets). Kept for callers that
# predate read_repository; new code reads the repository through read_repository().
ENSEMBLE = DEFAULT_CLASSIFIER
MODEL_NAMES = (ENSEMBLE,)
ENCODER_OUTPUTS = (ENCODER_LOGITS, ENCODER_PROBABILITIES)
_CLIENT_TENSORS = (TEXT, LABEL, PROBABILITIES, LOGITS)  # re-exported for older callers (serving.contract owns them)

# The GPU target runs in this NGC image: 26.08, the newest release in Triton's compatibility matrix and past
# 25.07, which fixed the python-backend RCE chain (CVE-2025-23319/23320/23334) and the HTTP chunked-encoding
# overflow (CVE-2025-23310/23311) of 2.51 (docs/SECURITY.md). It ships ONNX Runtime 1.28.0: source:
# triton-inference-server/server docs/introduction/compatibility.md, table "ONNX Runtime Versions" (row
# "26.08 | 1.28.0"). The limits were measured on the onnxruntime 1.28.0 wheel (an Identity model per IR
# version / opset): it loads IR version <= 13 and ai.onnx opset <= 26, and refuses IR 14 and opset 27. The
# GPU model runs the onnxruntime-gpu wheel that serving/docker/Dockerfile installs, pinned to this version.
NGC_IMAGE = "nvcr.io/nvidia/tritonserver:26.08-py3"
NGC_ORT_VERSION = "1.28.0"
NGC_MAX_IR_VERSION = 13
NGC_MAX_OPSET = 26


MODELS_SRC = Path(__file__).parent / "models"
CONTRACT_SRC = Path(__file__).parent / "contract.py"
SHARED_SOURCES = {"textmodel.py": MODELS_SRC / "textmodel.py", "tokenization.py": MODELS_SRC / "tokenization.py",
                  "metrics.py": MODELS_SRC / "metrics.py", "contract.py": CONTRACT_SRC,
                  "runtime.py": MODELS_SRC / "runtime.py"}  # OpenVINO hook: the runtime adapter
GPU_SOURCES = {"token_batch.py": MODELS_SRC / "token_batch.py"}  # beside the GPU target's model only
TAGGER_SOURCES = {"entities.py": MODELS_SRC / "entities.py"}  # beside a tagger (token classification) only
ONNX_FILE = "model.onnx"
TOKENIZER_DIR = "tokenizer"
WARMUP_DIR = "warmup"  # Triton reads model_warmup input files from <model>/warmup/
# Warm-up samples every python model answers before it reports ready (model_warmup): a short text twice,
# then one past max_length tokens (the longest shapes). docs/METRICS.md, "Warm start".
WARMUP_SAMPLES = (("short", 2), ("long", 1))
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


GPU_QUEUE_DELAY_US = 2000  # the gpu model's default dynamic-batching delay


@dataclass
class RepositoryConfig:
    """How the repository is served. Defaults fit the local CPU target.

    CPU target: ``encoder_instances`` instances of the one python model (0 = one per usable core of the
    machine the repository is built for), each running rows alone with ``intra_op_threads`` threads (1);
    ``max_queue_delay_us`` is its dynamic-batching delay. GPU target: ``encoder_instances`` instances (0 = 1)
    of the one python model running ONNX Runtime's CUDA provider (CPU provider without a GPU); the rows of a
    dynamic batch run in sub-batches sorted by length, each padded to its own longest row, at most
    ``max_batch_tokens`` tokens (padding included) each, cut to save ``overhead_tokens`` per encoder call.
    ``preferred_batch_sizes``: CPU (1,) (one request per execute call: rows
    run alone, so batching buys nothing, and an instance must not hold queued requests while another idles);
    GPU empty (no size is special). ``max_queue_delay_us``: CPU 0, GPU 2000.
    ``max_request_bytes``: the text rows of one request (UTF-8 bytes of TEXT and TEXT_PAIR) may total this
    much (>= 1 MiB), more is refused with 400; no text is refused for its length below it. ``long_text``:
    "truncate" (as the checkpoint saves it) or "chunk" (windows of ``chunk_overlap`` tokens overlap, at most
    ``max_chunks`` per text: docs/LONG_TEXT.md). ``trim_batch`` is unused since the CPU target runs rows
    alone (kept for old configs).
    """

    target: Target = field(default=Target.CPU,
                           metadata={"help": "cpu: every row alone, one pinned instance per core; gpu: token-budget "
                                             "batches on ONNX Runtime's CUDA provider (CPU provider without a GPU)"})
    max_batch_size: int = field(default=64, metadata={"help": "largest batch Triton forms"})
    max_length: int = field(default=128, metadata={"help": "tokenizer truncation in tokens"})
    encoder_instances: int = field(default=0, metadata={
        "help": "instances of the model that runs the encoder (0: one per usable core on cpu, 1 on gpu)"})
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
        "help": "dynamic batcher delay in microseconds of the served model (default: cpu 0, "
                "since its rows run alone and waiting to batch them only adds latency; gpu 2000)"})
    max_queue_size: int = field(default=256,
                                metadata={"help": "requests queued before the server answers unavailable"})
    default_queue_timeout_us: int = field(default=30_000_000,
                                          metadata={"help": "microseconds a request may wait in the queue"})
    tensorrt: bool = field(default=False, metadata={
        "help": "gpu target: ONNX Runtime's TensorRT provider (fp16, engine cache in /tmp/trt_cache) before CUDA"})
    max_batch_tokens: int = field(default=DEFAULT_MAX_BATCH_TOKENS, metadata={
        "help": "gpu target: most tokens (rows x longest row, padding included) one encoder call computes"})
    overhead_tokens: int = field(default=DEFAULT_OVERHEAD_TOKENS, metadata={
        "help": "gpu target: padded tokens one more encoder call is worth (sub-batches are cut to minimise "
                "computed tokens + this per call)"})
    max_request_bytes: int = field(default=DEFAULT_MAX_REQUEST_BYTES, metadata={
        "help": "most UTF-8 bytes of text (all TEXT and TEXT_PAIR rows) in one request, more gets 400 (>= 1 MiB); "
                "no text is refused for its length below it"})
    long_text: str = field(default="truncate", metadata={
        "help": "truncate: a text is truncated at max_length as the checkpoint saves it; chunk: windows averaged"})
    chunk_overlap: int = field(default=32, metadata={"help": "chunk: tokens consecutive windows share"})
    max_chunks: int = field(default=16, metadata={"help": "chunk: most windows per text"})
    normalize: bool = field(default=False, metadata={
        "help": "chunked embedders: L2-normalise the mean of a text's window embeddings (the graph answers them "
                "before normalisation)"})
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
        if self.encoder_instances < 0:
            raise RepositoryError("encoder_instances must be >= 1 (0: automatic)")
        if self.max_batch_tokens < self.max_length or self.overhead_tokens < 0:
            raise RepositoryError(f"max_batch_tokens must be >= max_length ({self.max_length}) and "
                                  "overhead_tokens >= 0")
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
        if min(self.max_queue_delay_us, self.max_queue_size,
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
        if self.normalize and self.long_text != "chunk":
            raise RepositoryError("normalize is for chunked embedders (a truncating graph normalises inside)")

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


def _batching(pb, config: RepositoryConfig):
    return pb.ModelDynamicBatching(
        preferred_batch_size=list(config.preferred_batch_sizes),
        max_queue_delay_microseconds=config.max_queue_delay_us,
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


def _python_model(pb, name: str, config: RepositoryConfig, count: int, kind: str = "KIND_CPU"):
    cfg = pb.ModelConfig(name=name, backend="python", max_batch_size=config.max_batch_size)
    cfg.version_policy.latest.num_versions = 1  # serve the newest version; a rollback overrides it on load
    cfg.instance_group.append(pb.ModelInstanceGroup(kind=pb.ModelInstanceGroup.Kind.Value(kind), count=count))
    cfg.dynamic_batching.CopyFrom(_batching(pb, config))
    return cfg


def warmup_text(sample: str, max_length: int, tensor: str = TEXT) -> str:
    """The text a warm-up sample sends in ``tensor`` (TEXT_PAIR: a short second text)."""
    if tensor != TEXT:
        return "warm-up pair"
    return "warm-up request" if sample == "short" else " ".join(["warm"] * (max_length + 8))


def add_warmup(pb, cfg, model: ServedModel) -> None:
    """Make ``cfg`` (a python model taking the client's text inputs) answer :data:`WARMUP_SAMPLES` before it
    reports ready; :func:`write_warmup_files` writes the inputs. The model tells warm-up from client requests
    by their count (textmodel: the first requests an instance executes)."""
    for sample, count in WARMUP_SAMPLES:
        warm = pb.ModelWarmup(name=sample, batch_size=1, count=count)
        for t in model.inputs:
            warm.inputs[t.name].CopyFrom(pb.ModelWarmup.Input(
                data_type=pb.DataType.Value(t.triton_type), dims=list(t.dims), input_data_file=f"{sample}_{t.name}"))
        cfg.model_warmup.append(warm)


def write_warmup_files(model_dir: Path, cfg) -> None:
    """The input files of ``cfg``'s model_warmup samples (BYTES: 4-byte little-endian length + UTF-8)."""
    max_length = int(cfg.parameters["max_length"].string_value)
    for warm in cfg.model_warmup:
        for name, spec in warm.inputs.items():
            data = warmup_text(warm.name, max_length, name).encode("utf-8")
            (model_dir / WARMUP_DIR).mkdir(exist_ok=True)
            (model_dir / WARMUP_DIR / spec.input_data_file).write_bytes(len(data).to_bytes(4, "little") + data)


def _text_params(config: RepositoryConfig, tokenizer_params: Mapping[str, Any]) -> dict[str, str]:
    return {"max_length": str(config.max_length), "max_request_bytes": str(config.max_request_bytes),
            "long_text": config.long_text, "chunk_overlap": str(config.chunk_overlap),
            "max_chunks": str(config.max_chunks), **{k: str(v) for k, v in tokenizer_params.items()}}


def _cpu_config(pb, config: RepositoryConfig, model: ServedModel, tokenizer_params: Mapping[str, Any]):
    """The CPU target's one python model: TEXT in, the head's outputs out, rows run alone."""
    cfg = _python_model(pb, model.name, config, config.instances)
    cfg.input.extend(_input(pb, t) for t in model.inputs)
    cfg.output.extend(_output(pb, t) for t in model.outputs)
    _params(cfg, {**model.to_parameters(), **_text_params(config, tokenizer_params),
                  "intra_op_threads": str(config.intra_op_threads),
                  "pin_instances": "true" if config.pin_instances else "false", **config.extra})
    add_warmup(pb, cfg, model)
    return cfg


# KIND_MODEL: the model places itself (ONNX Runtime's CUDA provider on device_id); Triton neither refuses it
# on a machine without a GPU nor moves tensors for it, so the same repository is served here on the CPU.
GPU_INSTANCE_KIND = "KIND_MODEL"


def _gpu_config(pb, config: RepositoryConfig, model: ServedModel, tokenizer_params: Mapping[str, Any]):
    """The GPU target's one python model: TEXT in, the head's outputs out, rows in token-budget sub-batches."""
    cfg = _python_model(pb, model.name, config, config.instances, GPU_INSTANCE_KIND)
    cfg.input.extend(_input(pb, t) for t in model.inputs)
    cfg.output.extend(_output(pb, t) for t in model.outputs)
    _params(cfg, {**model.to_parameters(), **_text_params(config, tokenizer_params), "target": Target.GPU.value,
                  "max_batch_tokens": str(config.max_batch_tokens), "overhead_tokens": str(config.overhead_tokens),
                  "tensorrt": "true" if config.tensorrt else "false", "device_id": "0",
                  "intra_op_threads": "0"})
    add_warmup(pb, cfg, model)
    return cfg


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
    if model.head not in (Head.SINGLE_LABEL, Head.MULTI_LABEL, Head.REGRESSION, Head.TOKEN_CLASSIFICATION):
        raise RepositoryError(f"head {model.head.value} is not served by the classifier models")
    if config.normalize:
        raise RepositoryError("normalize is for chunked embedders, not classifiers")
    if model.head is Head.TOKEN_CLASSIFICATION and config.target is not Target.CPU:
        raise RepositoryError("a token classifier (tagger) is served on the cpu target")
    make = _cpu_config if config.target is Target.CPU else _gpu_config
    return {model.name: make(pb, config, model, tokenizer_params or {})}


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


def _python_source(model: ServedModel, target: Target) -> str:
    """The python source of the served model: the GPU target's batched model serves every head."""
    if target is Target.GPU:
        return "batched.py"
    if model.head is Head.TOKEN_CLASSIFICATION:
        return "tagger.py"
    return "embedder.py" if model.head is Head.EMBEDDING else "classifier.py"


def model_versions(root: Path, name: str) -> list[int]:
    """The version directories of model directory ``name`` in ``root``, oldest first."""
    folder = Path(root) / name
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def _write_model_files(root: Path, configs: Mapping[str, Any], model: ServedModel, target: Target,
                       onnx_model: Path, tokenizer_dir: Path, version: int = 1) -> None:
    """Every file of one served model's ``version``: config (listing every version directory beside it),
    python sources, tokenizer, ONNX, warm-up inputs."""
    v = str(version)
    for name, model_config in configs.items():
        (root / name / v).mkdir(parents=True)
        listed = ",".join(str(n) for n in model_versions(root, name))
        model_config.parameters[VERSIONS_PARAM].string_value = listed
        (root / name / "config.pbtxt").write_text(config_text(model_config), encoding="utf-8")
    folder = root / model.name / v
    _copy_python(folder, _python_source(model, target))
    extra = GPU_SOURCES if target is Target.GPU else TAGGER_SOURCES if model.head is Head.TOKEN_CLASSIFICATION else {}
    for name, src in extra.items():
        shutil.copy2(src, folder / name)
    _copy_tokenizer(folder, tokenizer_dir)
    shutil.copy2(onnx_model, folder / ONNX_FILE)
    copy_openvino_ir(onnx_model, folder, target)  # OpenVINO hook
    write_warmup_files(root / model.name, configs[model.name])


def copy_openvino_ir(onnx_model: Path, folder: Path, target: Target = Target.CPU) -> None:
    """OpenVINO hook: an OpenVINO variant's IR (model.xml/model.bin beside its model.onnx, converted from it)
    goes beside the copy of model.onnx in ``folder``, so the CPU model runs it (serving/models/runtime.py);
    nothing is copied for an ONNX Runtime variant."""
    from serving.models import runtime

    xml = runtime.ir_beside(onnx_model)
    if xml is None:
        return
    if target is not Target.CPU:
        raise RepositoryError(f"{xml}: OpenVINO variants are served by the CPU target only")
    for fname in (runtime.IR_FILE, runtime.IR_WEIGHTS):
        shutil.copy2(Path(xml).parent / fname, folder / fname)


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


def _version_record(root: Path, names: Sequence[str], version: int, own: Mapping[str, Any]) -> dict[str, Any]:
    """One version's own provenance: its ONNX file, the exporter's record, when, and the SHA-256 of each of
    its files (the same hashes the repository's ``files`` holds, so a version is checked on its own)."""
    from common.provenance import hash_tree

    files = {}
    for name in names:
        files.update({f"{name}/{version}/{rel}": digest for rel, digest in hash_tree(root / name / str(version)).items()})
    return {"onnx": own["onnx"], "exporter": own["exporter"],
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}


def _served_record(root: Path, own: Mapping[str, Any], names: Sequence[str], version: int,
                   previous: Mapping[str, Any] | None = None, kept: Sequence[int] = ()) -> dict[str, Any]:
    """A served model's provenance: the newest build's config, ONNX and exporter record, and per version
    (``versions``) the record of each version kept."""
    older = dict((previous or {}).get("versions") or {})
    if previous and not older:  # written before versions were recorded: it was version 1
        older = {VERSION: {k: previous.get(k) for k in ("onnx", "exporter")}}
    records = {v: r for v, r in older.items() if int(v) in kept}
    records[str(version)] = _version_record(root, names, version, own)
    return {**{k: own[k] for k in ("config", "resolved", "onnx", "exporter")}, "version": version,
            "versions": records}


def model_provenance(provenance: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """One served model's own provenance record (its config, ONNX file, exporter record and versions:
    ``served[name]``), or the repository's top-level record where it predates per-model records (a one-model
    repository). In a repository of several models the top level holds the first model written, not
    necessarily ``name``."""
    return (provenance.get("served") or {}).get(name) or provenance


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
        record["served"] = {served.name: _served_record(tmp, record, list(configs), 1)}
        (tmp / PROVENANCE).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        validate_repository(tmp, config.target)
    log.info("wrote %s repository %s (model %s, labels %s, %d instance(s))", config.target.value, out,
             served.name, list(served.labels), config.instances)
    return out


# ------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class ServedModelInfo:
    """One served model of a repository: its contract, its config, and where its ONNX file and tokenizer
    are. ``parts`` is empty (it held the internal models of the GPU ensemble that the GPU target had before)."""

    contract: ServedModel
    target: Target
    config: Any  # the served model's ModelConfig (the one python model on both targets)
    parts: Mapping[str, Any]
    onnx_path: Path  # of the served (newest) version
    tokenizer_dir: Path
    version: int = 1  # the version Triton serves from this repository (the newest: version_policy latest 1)
    versions: tuple[int, ...] = (1,)  # every version directory, oldest first

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
        return self.config

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


def _served_info(root: Path, cfg, contract: ServedModel) -> ServedModelInfo:
    if cfg.platform == "ensemble":
        raise RepositoryError(f"model '{cfg.name}' is a GPU ensemble of an older build; rebuild the repository "
                              "(the GPU target is one python model now)")
    if cfg.backend != "python":
        raise RepositoryError(f"model '{cfg.name}' is not a python-backend model")
    param = cfg.parameters.get("target")
    try:
        target = Target(param.string_value if param is not None and param.string_value else Target.CPU)
    except ValueError as exc:
        raise RepositoryError(f"model '{cfg.name}': unknown target {param.string_value!r}") from exc
    versions = tuple(model_versions(root, contract.name)) or (1,)
    folder = root / contract.name / str(versions[-1])
    return ServedModelInfo(contract, target, cfg, {}, folder / ONNX_FILE, folder / TOKENIZER_DIR,
                           versions[-1], versions)


def accepts_models(repository: Path, target: Target) -> bool:
    """Whether ``repository`` is one of ours, for ``target``: a build then adds its model to it (the next
    version of a model it serves, beside the other models) instead of replacing the whole repository."""
    from serving.errors import ServingError

    if not (Path(repository) / PROVENANCE).is_file():
        return False
    try:
        info = read_repository(Path(repository))
    except ServingError:
        return False  # not readable as a current repository: it is replaced whole, as before
    return info.target is Target(target)


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
            models[name] = _served_info(path, cfg, contract)
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
    found = model_versions(root, cfg.name)
    if not found:
        raise RepositoryError(f"missing version directory of model '{cfg.name}': {root / cfg.name / VERSION}")
    listed = cfg.parameters[VERSIONS_PARAM].string_value if VERSIONS_PARAM in cfg.parameters else ""
    if listed and listed != ",".join(map(str, found)):
        raise RepositoryError(f"model '{cfg.name}': config lists versions {listed}, the directories are {found}")


def _check_python(root: Path, cfg) -> None:
    if cfg.backend != "python":
        raise RepositoryError(f"model '{cfg.name}' must use the python backend, not '{cfg.backend}'")
    for version in model_versions(root, cfg.name):
        for fname in ("model.py", *SHARED_SOURCES):
            _require(root / cfg.name / str(version) / fname, f"python source {fname} of model '{cfg.name}'")


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


def _validate_python_model(root: Path, m: ServedModelInfo, required: Sequence[str]) -> list[str]:
    """The one python model of either target: scheduling, sources, tensors, parameters, tokenizer, ONNX."""
    _check_scheduled(root, m.config)
    _check_python(root, m.config)
    _check_signature(m.config, m.contract)
    params = {k: v.string_value for k, v in m.config.parameters.items()}
    missing = [k for k in ("max_length", "max_request_bytes", "pad_id", "pad_token", *required) if not params.get(k)]
    if missing:
        raise RepositoryError(f"model '{m.name}': missing parameters {missing}")
    _require(m.tokenizer_dir / "tokenizer.json", "tokenizer file")
    _check_encoder_onnx(m)
    for warm in m.config.model_warmup:
        for spec in warm.inputs.values():
            _require(root / m.name / WARMUP_DIR / spec.input_data_file, f"warm-up input of model '{m.name}'")
    for version in m.versions[:-1]:  # older versions kept for a rollback: their files are there
        _require(root / m.name / str(version) / TOKENIZER_DIR / "tokenizer.json", "tokenizer file")
        _require(root / m.name / str(version) / ONNX_FILE, f"ONNX model of '{m.name}' version {version}")
    return [m.name]


def _validate_gpu(root: Path, m: ServedModelInfo) -> list[str]:
    """The GPU target's model also carries its batching sources and a token budget a full row fits in."""
    names = _validate_python_model(root, m, ("max_batch_tokens", "overhead_tokens"))
    for fname in GPU_SOURCES:
        _require(root / m.name / VERSION / fname, f"python source {fname} of model '{m.name}'")
    params = {k: v.string_value for k, v in m.config.parameters.items()}
    if int(params["max_batch_tokens"]) < int(params["max_length"]):
        raise RepositoryError(f"model '{m.name}': max_batch_tokens {params['max_batch_tokens']} < max_length "
                              f"{params['max_length']}")
    if m.config.dynamic_batching.max_queue_delay_microseconds < 1:
        log.warning("model '%s' batches with no queue delay: token-budget sub-batches form only from requests "
                    "that are already waiting", m.name)
    return names


def validate_repository(path: Path, target: Target | None = None) -> list[str]:
    """Check a repository offline (every served model: configs, files, ONNX opset/IR for the target); return
    the names of its models."""
    info = read_repository(path)
    if target is not None and Target(target) is not info.target:
        raise RepositoryError(f"repository is for target {info.target.value}, not {Target(target).value}")
    names: list[str] = []
    for m in info.models.values():
        names += _validate_python_model(info.path, m, ()) if m.target is Target.CPU else _validate_gpu(info.path, m)
    orphans = sorted(set(info.configs) - set(names))
    if orphans:
        raise RepositoryError(f"models {orphans} belong to no served model")
    return names


# -------------------------------------------------------------------- embedding models; several models




def build_embedding_configs(config: RepositoryConfig, model: ServedModel, *,
                            encoder_inputs: Sequence[str] = ENCODER_INPUTS,
                            output_types: Mapping[str, str] | None = None,
                            tokenizer_params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``ModelConfig`` of one embedding model: one python model (TEXT -> EMBEDDING); CPU rows alone, GPU
    token-budget sub-batches."""
    if model.head is not Head.EMBEDDING:
        raise RepositoryError(f"model {model.name!r} has head {model.head.value}, not embedding")
    pb = _pb()
    make = _cpu_config if config.target is Target.CPU else _gpu_config
    cfg = make(pb, config, model, tokenizer_params or {})
    if config.long_text == "chunk":  # the windows' mean of the graph's vectors, then normalised (or not)
        _params(cfg, {"normalize": "true" if config.normalize else "false"})
    return {model.name: cfg}


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


def _same_config(old, new) -> bool:
    """Whether two configs of one model directory differ only in what versions change (the version list
    and policy), so the old versions can be served by the new config."""
    a, b = type(old)(), type(new)()
    a.CopyFrom(old)
    b.CopyFrom(new)
    for cfg in (a, b):
        cfg.ClearField("version_policy")
        if VERSIONS_PARAM in cfg.parameters:
            del cfg.parameters[VERSIONS_PARAM]
    return a == b


def _kept_versions(existing: RepositoryInfo, old: ServedModelInfo | None, configs: Mapping[str, Any],
                   keep: int) -> tuple[list[int], int]:
    """(older versions the new one goes beside, the new version's number). Old versions stay only when the
    new configs fit them; numbers only grow, so Triton's ``latest`` policy always means the new build."""
    if old is None:
        return [], 1
    versions = sorted({v for name in old.model_names for v in model_versions(existing.path, name)})
    new_version = (versions[-1] if versions else 0) + 1
    fits = set(old.model_names) == set(configs) and all(
        _same_config(existing.configs[name], configs[name]) for name in configs)
    if not fits:
        log.warning("model %s: the new build's config differs from the served one; versions %s are dropped "
                    "(a rollback has nothing to return to)", old.name, versions)
        return [], new_version
    return versions[-(keep - 1):] if keep > 1 else [], new_version


def _keep_existing(tmp: Path, existing: RepositoryInfo, model: ServedModel, configs: Mapping[str, Any],
                   keep: int) -> tuple[list[int], int]:
    """Copy the existing repository into ``tmp`` (without bytecode), check it against its own provenance,
    then drop what the new build replaces: the model's config and its versions beyond the newest
    ``keep - 1``. Returns (versions kept, the new version's number)."""
    shutil.copytree(existing.path, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    verify_repository(tmp)  # never re-sign a repository that was changed since it was built
    (tmp / PROVENANCE).unlink()  # rewritten with the new model (the hashes never cover this file)
    old = existing.models.get(model.name)
    if old is not None and old.contract.head is not model.head:
        raise RepositoryError(f"{existing.path} already serves a {old.contract.head.value} model named "
                              f"{model.name!r}; choose another name for the {model.head.value} model")
    replaced = old.model_names if old is not None else []
    clash = sorted((set(existing.configs) - set(replaced)) & set(configs))
    if clash:
        raise RepositoryError(f"{existing.path}: model directories {clash} belong to another served model")
    kept, new_version = _kept_versions(existing, old, configs, keep)
    for name in replaced:
        if not kept:
            shutil.rmtree(tmp / name)
            continue
        (tmp / name / "config.pbtxt").unlink()
        for version in model_versions(tmp, name):
            if version not in kept:
                shutil.rmtree(tmp / name / str(version))
    return kept, new_version


def _merged_provenance(tmp: Path, existing: RepositoryInfo | None, config: RepositoryConfig, model: ServedModel,
                       onnx_model: Path, info: Mapping[str, Any], exporter: Mapping[str, Any] | None,
                       names: Sequence[str], version: int, kept: Sequence[int]) -> dict:
    """The repository's provenance with ``model`` added: ``models`` and ``served`` (per model: its config,
    ONNX file, exporter record and one record per version) updated, ``files`` rehashed; what the other
    models recorded is kept."""
    from common.provenance import hash_tree

    own = _provenance(tmp, config, model, onnx_model, info, exporter)
    record = dict(existing.provenance) if existing is not None else own
    record["models"] = {**record.get("models", {}), model.name: model.to_json()}
    previous = model_provenance(existing.provenance, model.name) \
        if existing is not None and model.name in existing.models else None
    served = _served_record(tmp, own, names, version, previous, kept)
    record["served"] = {**record.get("served", {}), model.name: served}
    record["files"] = hash_tree(tmp)
    return record


def add_model(out: Path, *, onnx_model: Path, tokenizer_dir: Path, model: ServedModel, config: RepositoryConfig,
              provenance: Mapping[str, Any] | None = None, keep_versions: int = KEEP_VERSIONS) -> Path:
    """Add the served ``model`` to the repository at ``out``, keeping every other model: a model it already
    serves gets the next version beside the current one (the newest ``keep_versions`` stay); atomic (copy,
    add, swap) with the provenance and integrity hashes updated. Creates the repository when there is
    none. A running ``serving up`` notices the new version and loads it (serving.supervisor)."""
    from common.atomic import atomic_directory

    out, onnx_model, tokenizer_dir = Path(out), Path(onnx_model), Path(tokenizer_dir)
    model = replace(model, chunked=config.long_text == "chunk")
    configs, info = _model_configs(config, model, onnx_model, tokenizer_dir)
    existing = _existing(out)
    if existing is not None and existing.target is not config.target:
        raise RepositoryError(f"{out} serves the {existing.target.value} target; cannot add a "
                              f"{config.target.value} model")
    if keep_versions < 1:
        raise RepositoryError(f"keep_versions must be >= 1, got {keep_versions}")
    with atomic_directory(out) as tmp:
        kept, version = [], 1
        if existing is not None:
            kept, version = _keep_existing(tmp, existing, model, configs, keep_versions)
        _write_model_files(tmp, configs, model, config.target, onnx_model, tokenizer_dir, version)
        record = _merged_provenance(tmp, existing, config, model, onnx_model, info, provenance, list(configs),
                                    version, kept)
        (tmp / PROVENANCE).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        validate_repository(tmp, config.target)
    log.info("added %s model %s version %d to %s (%d instance(s); versions kept %s); it serves %s",
             config.target.value, model.name, version, out, config.instances, kept + [version],
             ", ".join(sorted(read_repository(out).models)))
    return out
