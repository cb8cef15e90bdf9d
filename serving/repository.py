"""The one module that owns the Triton model-repository layout (see docs/ARCHITECTURE.md).

``write_repository`` builds every ``config.pbtxt`` as a ``model_config_pb2.ModelConfig`` and writes it
with ``google.protobuf.text_format``; ``validate_repository`` parses them back and checks the
repository offline (files, ensemble wiring, the encoder's ONNX IR version and opset).
"""
from __future__ import annotations

import enum
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from serving.errors import RepositoryError

log = logging.getLogger(__name__)

ENSEMBLE = "classifier"
TOKENIZER = "tokenizer"
ENCODER = "encoder"
POSTPROCESS = "postprocess"
MODEL_NAMES = (TOKENIZER, ENCODER, POSTPROCESS, ENSEMBLE)
VERSION = "1"

# Client contract (docs/ARCHITECTURE.md).
TEXT, LABEL, PROBABILITIES, LOGITS = "TEXT", "LABEL", "PROBABILITIES", "LOGITS"
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
ENCODER_OUTPUTS = ("logits", "probabilities")

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


class Target(str, enum.Enum):
    CPU = "cpu"
    GPU = "gpu"


@dataclass
class RepositoryConfig:
    """How the repository is served. Defaults fit the local CPU target.

    ``preferred_batch_sizes`` is empty by default: on the CPU the encoder's cost grows linearly with the
    batch, so no size is special and Triton should form the largest batch the delay allows.
    ``max_queue_delay_us`` applies to the encoder; ``aux_queue_delay_us`` to the cheap tokenizer and
    postprocess models. Measured here (tiny model, 2 cores, gRPC): 2 ms on all three models costs ~6 ms on
    every lone request (p50 ~13 ms); 0 on tokenizer/postprocess gives p50 ~5 ms but fewer, smaller batches
    under 16 concurrent clients (~270 req/s vs ~420-520); 500 us there gave p50 ~5.5 ms and ~580 req/s.
    ``max_text_chars``: a longer text is refused with 400 (far beyond ``max_length`` tokens for any real
    text; with ``max_batch_size`` it bounds a request's size and the tokenizer's work).
    """

    target: Target = field(default=Target.CPU,
                           metadata={"help": "cpu: one python-backend classifier; gpu: ensemble on the onnxruntime "
                                             "backend"})
    max_batch_size: int = field(default=64, metadata={"help": "largest batch Triton forms"})
    max_length: int = field(default=128, metadata={"help": "tokenizer truncation in tokens"})
    encoder_instances: int = field(default=1, metadata={"help": "encoder model instances"})
    tokenizer_instances: int = field(default=1, metadata={"help": "tokenizer model instances"})
    intra_op_threads: int = field(default=0,
                                  metadata={"help": "onnxruntime intra-op threads per instance (0: its default)"})
    preferred_batch_sizes: tuple[int, ...] = field(default=(),
                                                   metadata={"help": "dynamic batcher preferred sizes (empty: the "
                                                                     "largest the delay allows)"})
    max_queue_delay_us: int = field(default=2000, metadata={"help": "encoder dynamic batcher delay in microseconds"})
    max_queue_size: int = field(default=256,
                                metadata={"help": "requests queued before the server answers unavailable"})
    default_queue_timeout_us: int = field(default=30_000_000,
                                          metadata={"help": "microseconds a request may wait in the queue"})
    tensorrt: bool = field(default=False,
                           metadata={"help": "gpu target: TensorRT execution accelerator on the onnxruntime backend"})
    aux_queue_delay_us: int = field(default=500,
                                    metadata={"help": "batcher delay of the tokenizer and postprocess models in "
                                                      "microseconds"})
    max_text_chars: int = field(default=100_000, metadata={"help": "longer texts are refused with 400"})
    trim_batch: bool = field(default=True,
                             metadata={"help": "cpu target: cut each batch to its longest real sequence (exact for "
                                               "BERT)"})
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
        if self.encoder_instances < 1 or self.tokenizer_instances < 1:
            raise RepositoryError("instance counts must be >= 1")
        if self.intra_op_threads < 0:
            raise RepositoryError("intra_op_threads must be >= 0")
        self.preferred_batch_sizes = tuple(int(b) for b in self.preferred_batch_sizes)
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise RepositoryError(f"preferred batch sizes {bad} are outside 1..max_batch_size")
        if min(self.max_queue_delay_us, self.aux_queue_delay_us, self.max_queue_size,
               self.default_queue_timeout_us) < 0:
            raise RepositoryError("queue delay, size and timeout must be >= 0")
        if self.max_text_chars < 1:
            raise RepositoryError("max_text_chars must be >= 1")
        if self.tensorrt and self.target is not Target.GPU:
            raise RepositoryError("tensorrt needs target gpu")


# ----------------------------------------------------------------------------------------- configs


def _pb():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def _tensor(pb, name: str, dtype: str, dims: list[int]):
    return pb.ModelInput(name=name, data_type=pb.DataType.Value(dtype), dims=dims)


def _output(pb, name: str, dtype: str, dims: list[int]):
    return pb.ModelOutput(name=name, data_type=pb.DataType.Value(dtype), dims=dims)


def _batching(pb, config: RepositoryConfig, *, aux: bool = False):
    return pb.ModelDynamicBatching(
        preferred_batch_size=list(config.preferred_batch_sizes),
        max_queue_delay_microseconds=config.aux_queue_delay_us if aux else config.max_queue_delay_us,
        default_queue_policy=pb.ModelQueuePolicy(
            timeout_action=pb.ModelQueuePolicy.REJECT,
            default_timeout_microseconds=config.default_queue_timeout_us,
            allow_timeout_override=True,
            max_queue_size=config.max_queue_size,
        ),
    )


def _params(cfg, values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        cfg.parameters[key].string_value = value if isinstance(value, str) else json.dumps(value)


_ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 7: "TYPE_INT64", 6: "TYPE_INT32", 16: "TYPE_BF16"}


def build_configs(
    config: RepositoryConfig,
    labels: list[str],
    *,
    encoder_inputs: tuple[str, ...] = ENCODER_INPUTS,
    output_types: Mapping[str, str] | None = None,
    tokenizer_params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the four ``ModelConfig`` messages (keyed by model name)."""
    pb = _pb()
    n = len(labels)
    output_types = dict(output_types or {})
    kind_cpu = pb.ModelInstanceGroup.KIND_CPU

    tok = pb.ModelConfig(name=TOKENIZER, backend="python", max_batch_size=config.max_batch_size)
    tok.input.append(_tensor(pb, TEXT, "TYPE_STRING", [1]))
    for name in ENCODER_INPUTS:
        tok.output.append(_output(pb, name, "TYPE_INT64", [config.max_length]))
    tok.instance_group.append(pb.ModelInstanceGroup(kind=kind_cpu, count=config.tokenizer_instances))
    tok.dynamic_batching.CopyFrom(_batching(pb, config, aux=True))
    _params(tok, {"max_length": str(config.max_length), "max_text_chars": str(config.max_text_chars),
                  **(tokenizer_params or {})})

    enc = pb.ModelConfig(name=ENCODER, max_batch_size=config.max_batch_size)
    for name in encoder_inputs:
        enc.input.append(_tensor(pb, name, "TYPE_INT64", [-1]))
    for name in ENCODER_OUTPUTS:
        enc.output.append(_output(pb, name, output_types.get(name, "TYPE_FP32"), [n]))
    enc.dynamic_batching.CopyFrom(_batching(pb, config))
    if config.target is Target.CPU:
        enc.backend = "python"
        enc.instance_group.append(pb.ModelInstanceGroup(kind=kind_cpu, count=config.encoder_instances))
        _params(enc, {"intra_op_threads": str(config.intra_op_threads),
                      "trim_batch": "true" if config.trim_batch else "false"})
    else:
        enc.backend = "onnxruntime"
        enc.default_model_filename = "model.onnx"
        enc.instance_group.append(
            pb.ModelInstanceGroup(kind=pb.ModelInstanceGroup.KIND_GPU, count=config.encoder_instances)
        )
        if config.tensorrt:
            trt = pb.ModelOptimizationPolicy.ExecutionAccelerators.Accelerator(name="tensorrt")
            trt.parameters["precision_mode"] = "FP16"
            trt.parameters["max_workspace_size_bytes"] = str(1 << 30)
            trt.parameters["trt_engine_cache_enable"] = "1"
            trt.parameters["trt_engine_cache_path"] = "/tmp/trt_cache"  # the repository is mounted read-only
            enc.optimization.execution_accelerators.gpu_execution_accelerator.append(trt)

    post = pb.ModelConfig(name=POSTPROCESS, backend="python", max_batch_size=config.max_batch_size)
    for name in ENCODER_OUTPUTS:
        post.input.append(_tensor(pb, name, output_types.get(name, "TYPE_FP32"), [n]))
    post.output.append(_output(pb, LABEL, "TYPE_STRING", [1]))
    post.output.append(_output(pb, PROBABILITIES, "TYPE_FP32", [n]))
    post.output.append(_output(pb, LOGITS, "TYPE_FP32", [n]))
    post.instance_group.append(pb.ModelInstanceGroup(kind=kind_cpu, count=1))
    post.dynamic_batching.CopyFrom(_batching(pb, config, aux=True))
    _params(post, {"labels": list(labels)})

    ens = pb.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=config.max_batch_size)
    ens.input.append(_tensor(pb, TEXT, "TYPE_STRING", [1]))
    ens.output.append(_output(pb, LABEL, "TYPE_STRING", [1]))
    ens.output.append(_output(pb, PROBABILITIES, "TYPE_FP32", [n]))
    ens.output.append(_output(pb, LOGITS, "TYPE_FP32", [n]))
    step = pb.ModelEnsembling.Step
    ens.ensemble_scheduling.step.append(step(
        model_name=TOKENIZER, model_version=-1,
        input_map={TEXT: TEXT}, output_map={name: f"_{name}" for name in encoder_inputs},
    ))
    ens.ensemble_scheduling.step.append(step(
        model_name=ENCODER, model_version=-1,
        input_map={name: f"_{name}" for name in encoder_inputs},
        output_map={name: f"_{name}" for name in ENCODER_OUTPUTS},
    ))
    ens.ensemble_scheduling.step.append(step(
        model_name=POSTPROCESS, model_version=-1,
        input_map={name: f"_{name}" for name in ENCODER_OUTPUTS},
        output_map={LABEL: LABEL, PROBABILITIES: PROBABILITIES, LOGITS: LOGITS},
    ))
    _params(ens, {"labels": list(labels)})
    return {TOKENIZER: tok, ENCODER: enc, POSTPROCESS: post, ENSEMBLE: ens}


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


def _labels(id2label: Mapping[int, str]) -> list[str]:
    try:
        ids = sorted(int(k) for k in id2label)
    except (TypeError, ValueError) as exc:
        raise RepositoryError(f"id2label keys must be integers: {list(id2label)}") from exc
    if ids != list(range(len(ids))) or len(ids) < 2:
        raise RepositoryError(f"id2label must map 0..n-1 (n >= 2) to labels, got keys {ids}")
    labels = [str(id2label[i] if i in id2label else id2label[str(i)]) for i in ids]  # type: ignore[index]
    if len(set(labels)) != len(labels):
        raise RepositoryError(f"labels must be distinct: {labels}")
    return labels


def _tokenizer_params(tokenizer_dir: Path) -> dict[str, str]:
    """The pad token and id the tokenizer model pads with (from tokenizer_config.json)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    pad_token = "[PAD]"
    cfg_path = tokenizer_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        pad = json.loads(cfg_path.read_text(encoding="utf-8")).get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str):
            pad_token = pad
    pad_id = tok.token_to_id(pad_token)
    if pad_id is None:
        raise RepositoryError(f"{tokenizer_dir}: pad token {pad_token!r} is not in the vocabulary")
    return {"pad_token": pad_token, "pad_id": str(pad_id)}


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def write_repository(
    out: Path,
    *,
    onnx_model: Path,
    tokenizer_dir: Path,
    id2label: Mapping[int, str],
    config: RepositoryConfig,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete repository to ``out`` atomically (temp dir, swap at the end); return ``out``."""
    from common.atomic import atomic_directory
    from common.provenance import hash_tree, sha256_file, versions

    out, onnx_model, tokenizer_dir = Path(out), Path(onnx_model), Path(tokenizer_dir)
    if not onnx_model.is_file():
        raise RepositoryError(f"ONNX model not found: {onnx_model}")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise RepositoryError(f"{tokenizer_dir}: no tokenizer.json (a fast tokenizer is required)")
    labels = _labels(id2label)
    info = inspect_onnx(onnx_model)
    if info["external_data"]:
        raise RepositoryError(f"{onnx_model}: weights in external-data files are not supported; save one file")
    missing = [n for n in ("input_ids", "attention_mask") if n not in info["inputs"]]
    missing += [n for n in ENCODER_OUTPUTS if n not in info["outputs"]]
    if missing:
        raise RepositoryError(
            f"{onnx_model}: missing tensors {missing}; expected inputs {list(ENCODER_INPUTS)} and outputs "
            f"{list(ENCODER_OUTPUTS)} (got inputs {info['inputs']}, outputs {list(info['outputs'])})"
        )
    unknown = [n for n in info["inputs"] if n not in ENCODER_INPUTS]
    if unknown:
        raise RepositoryError(f"{onnx_model}: unexpected inputs {unknown}")
    if config.target is Target.GPU:
        check_onnx_for_image(info, onnx_model)
    out_types = {name: info["outputs"][name] for name in ENCODER_OUTPUTS}
    bad_types = {k: v for k, v in out_types.items() if v not in ("TYPE_FP32", "TYPE_FP16")}
    if bad_types:
        raise RepositoryError(f"{onnx_model}: outputs must be float32 or float16, got {bad_types}")
    encoder_inputs = tuple(n for n in ENCODER_INPUTS if n in info["inputs"])
    configs = build_configs(
        config, labels, encoder_inputs=encoder_inputs, output_types=out_types,
        tokenizer_params=_tokenizer_params(tokenizer_dir),
    )

    with atomic_directory(out) as tmp:
        for name, model_config in configs.items():
            (tmp / name / VERSION).mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(config_text(model_config), encoding="utf-8")
        shutil.copy2(MODELS_SRC / "tokenizer.py", tmp / TOKENIZER / VERSION / "model.py")
        tok_dst = tmp / TOKENIZER / VERSION / "tokenizer"
        tok_dst.mkdir()
        for fname in _TOKENIZER_FILES:
            if (tokenizer_dir / fname).is_file():
                shutil.copy2(tokenizer_dir / fname, tok_dst / fname)
        shutil.copy2(onnx_model, tmp / ENCODER / VERSION / "model.onnx")
        if config.target is Target.CPU:
            shutil.copy2(MODELS_SRC / "encoder.py", tmp / ENCODER / VERSION / "model.py")
        shutil.copy2(MODELS_SRC / "postprocess.py", tmp / POSTPROCESS / VERSION / "model.py")
        record = {
            "target": config.target.value,
            "config": {**asdict(config), "target": config.target.value},
            "labels": labels,
            "onnx": {"source": str(onnx_model.absolute()), "sha256": sha256_file(onnx_model),
                     "ir_version": info["ir_version"], "opset": info["opset"]},
            "ngc_image": NGC_IMAGE if config.target is Target.GPU else None,
            "files": hash_tree(tmp),
            "versions": versions(),
            "exporter": dict(provenance or {}),
        }
        (tmp / "provenance.json").write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        validate_repository(tmp, config.target)
    log.info("wrote %s repository %s (labels %s)", config.target.value, out, labels)
    return out


# ---------------------------------------------------------------------------------------- validation


def _require(path: Path, what: str) -> None:
    if not path.is_file():
        raise RepositoryError(f"missing {what}: {path}")


def validate_repository(path: Path, target: Target | None = None) -> list[str]:
    """Check a repository offline (configs parse, files present, ONNX opset/IR); return model names."""
    path = Path(path)
    if not path.is_dir():
        raise RepositoryError(f"repository not found: {path}")
    configs = {}
    for name in MODEL_NAMES:
        cfg_path = path / name / "config.pbtxt"
        _require(cfg_path, f"config of model '{name}'")
        cfg = read_config(cfg_path)
        if cfg.name and cfg.name != name:
            raise RepositoryError(f"{cfg_path}: name '{cfg.name}' does not match its directory '{name}'")
        if cfg.max_batch_size < 1:
            raise RepositoryError(f"{cfg_path}: max_batch_size must be > 0 (dynamic batching)")
        if name != ENSEMBLE:
            if not cfg.HasField("dynamic_batching"):
                raise RepositoryError(f"{cfg_path}: model '{name}' has no dynamic_batching")
            if not (path / name / VERSION).is_dir():
                raise RepositoryError(f"missing version directory of model '{name}': {path / name / VERSION}")
        configs[name] = cfg

    enc = configs[ENCODER]
    found = Target.CPU if enc.backend == "python" else Target.GPU if enc.backend == "onnxruntime" else None
    if found is None:
        raise RepositoryError(f"encoder backend '{enc.backend}' is neither python (cpu) nor onnxruntime (gpu)")
    if target is not None and Target(target) is not found:
        raise RepositoryError(f"repository is for target {found.value}, not {Target(target).value}")

    for name in (TOKENIZER, POSTPROCESS):
        _require(path / name / VERSION / "model.py", f"python source of model '{name}'")
    _require(path / TOKENIZER / VERSION / "tokenizer" / "tokenizer.json", "tokenizer file")
    onnx_path = path / ENCODER / VERSION / "model.onnx"
    _require(onnx_path, "encoder ONNX model")
    if found is Target.CPU:
        _require(path / ENCODER / VERSION / "model.py", "python source of model 'encoder'")

    info = inspect_onnx(onnx_path)
    if found is Target.GPU:
        check_onnx_for_image(info, onnx_path)
    enc_in = [t.name for t in enc.input]
    if sorted(enc_in) != sorted(info["inputs"]):
        raise RepositoryError(f"encoder config inputs {enc_in} != ONNX inputs {info['inputs']}")
    for out in enc.output:
        if out.name not in info["outputs"]:
            raise RepositoryError(f"encoder output '{out.name}' is not an output of {onnx_path}")

    try:
        labels = json.loads(configs[POSTPROCESS].parameters["labels"].string_value)
    except (KeyError, ValueError) as exc:
        raise RepositoryError("postprocess has no valid 'labels' JSON parameter") from exc
    num_labels = [list(o.dims) for o in configs[ENSEMBLE].output if o.name == PROBABILITIES]
    if num_labels != [[len(labels)]]:
        raise RepositoryError(f"{len(labels)} labels but PROBABILITIES dims {num_labels}")

    _validate_ensemble(configs)
    return list(MODEL_NAMES)


def _validate_ensemble(configs: Mapping[str, Any]) -> None:
    ens = configs[ENSEMBLE]
    if ens.platform != "ensemble" or not ens.ensemble_scheduling.step:
        raise RepositoryError(f"model '{ENSEMBLE}' is not an ensemble with steps")
    names = {t.name for t in ens.input}
    if names != {TEXT}:
        raise RepositoryError(f"ensemble inputs must be ['{TEXT}'], got {sorted(names)}")
    available = set(names)
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
