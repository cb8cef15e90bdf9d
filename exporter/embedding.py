"""Sentence embeddings: read the pipeline, export it to ONNX with pooling (and normalisation) inside the
graph, and build fp32/fp16/int8 variants.

The pipeline comes from a sentence-transformers directory (``modules.json``: Transformer -> Pooling ->
optional Normalize) or from a plain Hugging Face encoder with an explicit pooling choice. The encoder body
is exported with Optimum (``feature-extraction``: ``last_hidden_state``) and fused like the classifier;
each variant converts the body (fp16, int8) and only then gets the pooling head appended, so the head
always runs in fp32. The graph answers ``embedding`` (FP32 ``[batch, dim]``) from int64 ``input_ids``,
``attention_mask`` and, when the model takes them, ``token_type_ids``.
"""
from __future__ import annotations

import enum
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from exporter.choices import Pooling, Target
from exporter.errors import CheckpointError, ExporterError
from exporter.fp16 import convert_fp16
from exporter.int8 import DYNAMIC, QuantSettings, cpu_preset
from exporter.int8_search import quantize
from exporter.optimize import optimize_onnx
from serving.contract import ENCODER_EMBEDDING, ENCODER_INPUTS

log = logging.getLogger(__name__)

HIDDEN = "last_hidden_state"
# sentence-transformers' constants: Pooling clamps the token count at 1e-9, Normalize is
# torch.nn.functional.normalize(p=2, dim=1) whose default eps is 1e-12.
MEAN_COUNT_EPS = 1e-9
NORMALIZE_EPS = 1e-12
_ST_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
               "sentence_camembert_config.json", "sentence_albert_config.json", "sentence_xlm-roberta_config.json")


class Source(str, enum.Enum):
    """Where the pipeline's description came from: modules.json, or a plain encoder plus options."""

    SENTENCE_TRANSFORMERS = "sentence-transformers"
    TRANSFORMERS = "transformers"


_LEGACY_POOLING_KEYS = {  # sentence-transformers < 5 wrote one boolean per mode
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken",
}


# sentence-transformers Dense activations (their class path as saved) -> the ONNX op that computes them
DENSE_ACTIVATIONS = {"torch.nn.modules.activation.Tanh": "Tanh", "torch.nn.modules.linear.Identity": "Identity",
                     "torch.nn.modules.activation.ReLU": "Relu", "torch.nn.modules.activation.Sigmoid": "Sigmoid"}


@dataclass(frozen=True)
class DenseLayer:
    """A sentence-transformers Dense module: ``activation(x @ weight.T + bias)``, put in the graph as nodes."""

    path: Path  # the module's folder (config.json + model.safetensors)
    in_features: int
    out_features: int
    bias: bool
    activation: str  # an ONNX op name (DENSE_ACTIVATIONS)

    def weights(self):
        """(weight [out, in], bias [out] or None) as float32 numpy arrays, from the module's safetensors."""
        from safetensors.numpy import load_file

        file = self.path / "model.safetensors"
        if not file.is_file():
            raise CheckpointError(f"Dense module {self.path} has no model.safetensors (pickle weights are not loaded)")
        tensors = load_file(str(file))
        weight = tensors.get("linear.weight")
        if weight is None or tuple(weight.shape) != (self.out_features, self.in_features):
            raise CheckpointError(f"Dense module {self.path}: linear.weight is not [{self.out_features}, "
                                  f"{self.in_features}]")
        bias = tensors.get("linear.bias") if self.bias else None
        return weight.astype("float32"), None if bias is None else bias.astype("float32")


@dataclass(frozen=True)
class EmbeddingPipeline:
    """What turns text into one vector: the encoder weights, the pooling, the normalisation, the limits."""

    root: Path = field(metadata={"help": "the model directory as given (sentence-transformers root or HF encoder)"})
    encoder_dir: Path = field(metadata={"help": "directory of the transformer weights, config and tokenizer"})
    source: Source = field(metadata={"help": "sentence-transformers modules or a plain transformers encoder"})
    pooling: Pooling = field(metadata={"help": "how token vectors become one vector"})
    normalize: bool = field(metadata={"help": "L2-normalise the pooled vector (a Normalize module)"})
    dim: int = field(metadata={"help": "embedding dimension (the encoder's hidden size)"})
    max_seq_length: int = field(metadata={"help": "tokens per text; longer texts are truncated"})
    do_lower_case: bool = field(default=False, metadata={"help": "lowercase text before tokenizing"})
    dense: tuple[DenseLayer, ...] = field(default=(), metadata={"help": "Dense modules after the pooling"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "pooling", Pooling(self.pooling))
        object.__setattr__(self, "source", Source(self.source))
        if self.dim < 1 or self.max_seq_length < 1:
            raise CheckpointError(f"bad embedding pipeline: dim={self.dim}, max_seq_length={self.max_seq_length}")

    def describe(self) -> dict:
        return {"root": str(self.root), "encoder_dir": str(self.encoder_dir), "source": self.source.value,
                "pooling": self.pooling.value, "normalize": self.normalize, "dim": self.dim,
                "max_seq_length": self.max_seq_length, "do_lower_case": self.do_lower_case,
                **({"dense": [f"{d.in_features}->{d.out_features} {d.activation}" for d in self.dense]}
                   if self.dense else {})}


# ------------------------------------------------------------------------------------------ reading


def read_pipeline(model_dir: Path, *, pooling: Pooling | str | None = None,
                  normalize: bool | None = None) -> EmbeddingPipeline:
    """The embedding pipeline of ``model_dir``.

    A sentence-transformers directory (``modules.json``) specifies pooling and normalisation itself; an
    explicit ``pooling``/``normalize`` that contradicts it is an error. A plain encoder needs ``pooling``
    (``normalize`` defaults to False).
    """
    model_dir = Path(model_dir)
    pooling = None if pooling is None else parse_pooling(pooling)
    if not (model_dir / "config.json").is_file() and not (model_dir / "modules.json").is_file():
        raise CheckpointError(f"{model_dir} is neither a sentence-transformers nor a Hugging Face model directory")
    if (model_dir / "modules.json").is_file():
        found = _read_sentence_transformers(model_dir)
        wanted = {"pooling": None if pooling is None else pooling.value, "normalize": normalize}
        actual = {"pooling": found.pooling.value, "normalize": found.normalize}
        for key, value in wanted.items():
            if value is not None and value != actual[key]:
                raise CheckpointError(f"{model_dir} specifies {key}={actual[key]} in its modules, not {value}")
        return found
    if pooling is None:
        raise CheckpointError(f"{model_dir} has no modules.json: choose a pooling ({', '.join(p.value for p in Pooling)})")
    hidden, max_len = _encoder_limits(model_dir, None)
    return EmbeddingPipeline(model_dir, model_dir, Source.TRANSFORMERS, pooling, bool(normalize), hidden, max_len)


def parse_pooling(value: Pooling | str) -> Pooling:
    """``"mean"`` -> Pooling.MEAN; an unsupported mode is a one-line CheckpointError."""
    try:
        return Pooling(value)
    except ValueError:
        raise CheckpointError(f"pooling {value!r} is not supported "
                              f"(supported: {', '.join(p.value for p in Pooling)})") from None


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def _read_sentence_transformers(root: Path) -> EmbeddingPipeline:
    """Transformer -> Pooling -> any Dense modules -> optional Normalize, nothing else."""
    modules = sorted(_read_json(root / "modules.json"), key=lambda m: m.get("idx", 0))
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    normalize = kinds[-1:] == ["Normalize"]
    middle = kinds[2:len(kinds) - normalize]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Dense" for k in middle):
        raise CheckpointError(f"{root}/modules.json is {' -> '.join(kinds) or 'empty'}; supported: "
                              "Transformer -> Pooling [-> Dense ...] [-> Normalize]")
    encoder_dir = root / modules[0].get("path", "")
    st_config = next((encoder_dir / n for n in _ST_CONFIGS if (encoder_dir / n).is_file()), None)
    st = _read_json(st_config) if st_config else {}
    pooling_config = _read_json(root / modules[1].get("path", "") / "config.json")
    pooling = _pooling_mode(pooling_config, root)
    hidden, max_len = _encoder_limits(encoder_dir, st.get("max_seq_length"))
    declared = pooling_config.get("embedding_dimension", pooling_config.get("word_embedding_dimension", hidden))
    if declared != hidden:
        raise CheckpointError(f"{root}: pooling expects dimension {declared}, the encoder has {hidden}")
    dense = tuple(_read_dense(root / m.get("path", "")) for m in modules[2:2 + len(middle)])
    dim = hidden
    for layer in dense:
        if layer.in_features != dim:
            raise CheckpointError(f"{layer.path}: Dense takes {layer.in_features} features, the previous module "
                                  f"gives {dim}")
        dim = layer.out_features
    return EmbeddingPipeline(root, encoder_dir, Source.SENTENCE_TRANSFORMERS, pooling, normalize,
                             dim, max_len, bool(st.get("do_lower_case", False)), dense)


def _read_dense(path: Path) -> DenseLayer:
    config = _read_json(path / "config.json")
    fn = config.get("activation_function", "torch.nn.modules.activation.Tanh")  # Dense's default
    if fn not in DENSE_ACTIVATIONS:
        raise CheckpointError(f"Dense module {path}: activation {fn} is not supported "
                              f"(supported: {', '.join(DENSE_ACTIVATIONS)})")
    try:
        return DenseLayer(path, int(config["in_features"]), int(config["out_features"]),
                          bool(config.get("bias", True)), DENSE_ACTIVATIONS[fn])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"Dense module {path}: config.json lacks in_features/out_features") from None


def _pooling_mode(config: dict, root: Path) -> Pooling:
    """The one pooling mode of a Pooling config (new ``pooling_mode`` key or the legacy booleans)."""
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key)]
        mode = modes or ["mean"]  # sentence-transformers' default when no flag is set
    modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1:
        raise CheckpointError(f"{root}: pooling concatenates {modes}; only a single pooling mode is supported")
    if config.get("include_prompt", True) is False:
        raise CheckpointError(f"{root}: pooling excludes prompt tokens (include_prompt=false); not supported")
    try:
        return parse_pooling(modes[0])
    except CheckpointError as exc:
        raise CheckpointError(f"{root}: {exc}") from None


def _encoder_limits(encoder_dir: Path, max_seq_length: int | None) -> tuple[int, int]:
    """(hidden size, max sequence length) as sentence-transformers resolves them."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(encoder_dir, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot read the encoder in {encoder_dir}: {exc}") from exc
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None)
    if not hidden:
        raise CheckpointError(f"{encoder_dir}/config.json has no hidden size")
    if max_seq_length is None:
        limits = [tokenizer.model_max_length, getattr(config, "max_position_embeddings", None)]
        max_seq_length = min(int(v) for v in limits if v and 0 < v < 1_000_000)
    return int(hidden), int(max_seq_length)


def load_tokenizer(pipeline: EmbeddingPipeline):
    """The encoder's tokenizer, lowercasing when the pipeline says so."""
    from transformers import AutoTokenizer

    kwargs = {"do_lower_case": True} if pipeline.do_lower_case else {}
    return AutoTokenizer.from_pretrained(pipeline.encoder_dir, local_files_only=True, **kwargs)


# ------------------------------------------------------------------------------------------ export


def export_body(pipeline: EmbeddingPipeline, out_dir: Path, *, opset: int | None = None) -> Path:
    """Export the transformer to ``out_dir/model.onnx`` (output ``last_hidden_state``), fused for the CPU."""
    import onnx
    from optimum.exporters.onnx import main_export

    raw = out_dir / "raw"
    try:
        main_export(str(pipeline.encoder_dir), raw, task="feature-extraction", opset=opset, do_validation=False,
                    local_files_only=True, library_name="transformers")
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot export {pipeline.encoder_dir} to ONNX: {exc}") from exc
    model = onnx.load(str(raw / "model.onnx"))
    outputs = [o.name for o in model.graph.output]
    if HIDDEN not in outputs:
        raise ExporterError(f"exported encoder has no {HIDDEN!r} output (outputs: {outputs})")
    path, record = optimize_onnx(raw, out_dir / "optimized", Target.CPU)
    log.info("embedding body: %s (%s)", path, record.get("level"))
    return path


def append_head(model, pipeline: EmbeddingPipeline) -> None:
    """Replace the graph's outputs by ``embedding`` = [Normalize]([Dense ...](Pooling(last_hidden_state, mask)))."""
    from onnx import TensorProto, helper

    graph = model.graph
    if HIDDEN not in [o.name for o in graph.output]:
        raise ExporterError(f"graph has no {HIDDEN!r} output to pool")
    inputs = {i.name: i for i in graph.input}
    batch = inputs[ENCODER_INPUTS[0]].type.tensor_type.shape.dim[0]
    nodes, inits = _pooling_nodes(pipeline.pooling, _opset(model))
    last = "emb_pooled"
    for i, layer in enumerate(pipeline.dense):
        n2, i2, last = _dense_nodes(layer, last, i)
        nodes, inits = nodes + n2, inits + i2
    if pipeline.normalize:
        n2, i2 = _normalize_nodes(last)
        nodes, inits = nodes + n2, inits + i2
    else:
        nodes.append(helper.make_node("Identity", [last], [ENCODER_EMBEDDING], name="emb_out"))
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(
        ENCODER_EMBEDDING, TensorProto.FLOAT, [batch.dim_param or batch.dim_value or "batch_size", pipeline.dim]))


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _reduce(op: str, x: str, out: str, axis: int, keepdims: int, opset: int, axes_name: str):
    """A Reduce* node; ReduceSum takes axes as an input from opset 13, the others from opset 18."""
    from onnx import helper

    if opset >= (13 if op == "ReduceSum" else 18):
        return helper.make_node(op, [x, axes_name], [out], keepdims=keepdims, name=out)
    return helper.make_node(op, [x], [out], axes=[axis], keepdims=keepdims, name=out)


def _pooling_nodes(pooling: Pooling, opset: int):
    """Nodes from ``last_hidden_state``/``attention_mask`` to ``emb_pooled`` [batch, hidden], like
    sentence-transformers' Pooling (rows right-padded or alone, so CLS is position 0)."""
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    mask = ENCODER_INPUTS[1]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "emb_axis1"),
             numpy_helper.from_array(np.array([2], np.int64), "emb_axis2")]
    if pooling is Pooling.CLS:
        inits.append(numpy_helper.from_array(np.array(0, np.int64), "emb_index0"))
        return [helper.make_node("Gather", [HIDDEN, "emb_index0"], ["emb_pooled"], axis=1, name="emb_cls")], inits
    if pooling is Pooling.MAX:
        inits.append(numpy_helper.from_array(np.array(-np.inf, np.float32), "emb_neg_inf"))
        return [
            helper.make_node("Cast", [mask], ["emb_mask_b"], to=TensorProto.BOOL, name="emb_mask_b"),
            helper.make_node("Unsqueeze", ["emb_mask_b", "emb_axis2"], ["emb_mask3"], name="emb_mask3"),
            helper.make_node("Where", ["emb_mask3", HIDDEN, "emb_neg_inf"], ["emb_masked"], name="emb_masked"),
            _reduce("ReduceMax", "emb_masked", "emb_pooled", 1, 0, opset, "emb_axis1"),
        ], inits
    inits.append(numpy_helper.from_array(np.array(MEAN_COUNT_EPS, np.float32), "emb_count_eps"))
    nodes = [
        helper.make_node("Cast", [mask], ["emb_mask_f"], to=TensorProto.FLOAT, name="emb_mask_f"),
        helper.make_node("Unsqueeze", ["emb_mask_f", "emb_axis2"], ["emb_mask3"], name="emb_mask3"),
        helper.make_node("Mul", [HIDDEN, "emb_mask3"], ["emb_masked"], name="emb_masked"),
        _reduce("ReduceSum", "emb_masked", "emb_sum", 1, 0, opset, "emb_axis1"),
        _reduce("ReduceSum", "emb_mask3", "emb_count", 1, 0, opset, "emb_axis1"),
        helper.make_node("Max", ["emb_count", "emb_count_eps"], ["emb_count_c"], name="emb_count_c"),
    ]
    if pooling is Pooling.MEAN_SQRT_LEN:
        nodes.append(helper.make_node("Sqrt", ["emb_count_c"], ["emb_divisor"], name="emb_divisor"))
    else:
        nodes.append(helper.make_node("Identity", ["emb_count_c"], ["emb_divisor"], name="emb_divisor"))
    nodes.append(helper.make_node("Div", ["emb_sum", "emb_divisor"], ["emb_pooled"], name="emb_mean"))
    return nodes, inits


def _dense_nodes(layer: DenseLayer, x: str, i: int):
    """``activation(x @ W.T + b)`` as MatMul [+ Add] + activation nodes (fp32 initializers); returns the
    nodes, the initializers and the output name."""
    from onnx import helper, numpy_helper
    import numpy as np

    weight, bias = layer.weights()
    p = f"emb_dense{i}"
    inits = [numpy_helper.from_array(np.ascontiguousarray(weight.T), f"{p}_wt")]
    nodes = [helper.make_node("MatMul", [x, f"{p}_wt"], [f"{p}_mm"], name=f"{p}_mm")]
    pre = f"{p}_mm"
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, f"{p}_b"))
        nodes.append(helper.make_node("Add", [pre, f"{p}_b"], [f"{p}_lin"], name=f"{p}_lin"))
        pre = f"{p}_lin"
    nodes.append(helper.make_node(layer.activation, [pre], [f"{p}_out"], name=f"{p}_act"))
    return nodes, inits, f"{p}_out"


def _normalize_nodes(x: str = "emb_pooled"):
    """``embedding = x / max(||x||_2, 1e-12)`` (torch.nn.functional.normalize)."""
    from onnx import helper, numpy_helper
    import numpy as np

    inits = [numpy_helper.from_array(np.array(NORMALIZE_EPS, np.float32), "emb_norm_eps")]
    return [
        helper.make_node("Mul", [x, x], ["emb_sq"], name="emb_sq"),
        _reduce("ReduceSum", "emb_sq", "emb_sumsq", 1, 1, 13, "emb_axis1"),
        helper.make_node("Sqrt", ["emb_sumsq"], ["emb_norm"], name="emb_norm"),
        helper.make_node("Max", ["emb_norm", "emb_norm_eps"], ["emb_norm_c"], name="emb_norm_c"),
        helper.make_node("Div", [x, "emb_norm_c"], [ENCODER_EMBEDDING], name="emb_normalize"),
    ], inits


# ---------------------------------------------------------------------------------------- variants


def append_head_to_file(body_variant: Path, pipeline: EmbeddingPipeline, dst: Path) -> Path:
    """Append the head to ``body_variant``, check the graph and write ``dst`` atomically."""
    import onnx

    model = onnx.load(str(body_variant))
    append_head(model, pipeline)
    onnx.checker.check_model(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


def fp32_variant(body: Path, pipeline: EmbeddingPipeline, dst: Path) -> Path:
    """The fused fp32 body with the pooling head."""
    return append_head_to_file(body, pipeline, dst)


def fp16_variant(body: Path, pipeline: EmbeddingPipeline, dst: Path) -> Path:
    """fp16 body (exporter.fp16: LayerNorm/Softmax kept fp32, fp32 inputs/outputs) + fp32 pooling head."""
    with tempfile.TemporaryDirectory(dir=dst.parent if dst.parent.exists() else None) as tmp:
        converted = Path(tmp) / "body.onnx"
        convert_fp16(body, converted)
        return append_head_to_file(converted, pipeline, dst)


def int8_variant(body: Path, pipeline: EmbeddingPipeline, dst: Path, *, per_channel: bool = True) -> Path:
    """Dynamic int8 body (exporter.int8: MatMul/Attention weights, this CPU's preset) + fp32 pooling head."""
    settings = QuantSettings.from_preset(cpu_preset(), is_static=False, per_channel=per_channel)
    with tempfile.TemporaryDirectory(dir=dst.parent if dst.parent.exists() else None) as tmp:
        quantized = Path(tmp) / "body.onnx"
        quantize(DYNAMIC, body, quantized, settings, exclude=[])
        return append_head_to_file(quantized, pipeline, dst)


def copy_tokenizer(pipeline: EmbeddingPipeline, out_dir: Path) -> Path:
    """Save the tokenizer the served model needs beside the variants."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(pipeline)
    tok.model_max_length = pipeline.max_seq_length
    tok.save_pretrained(out_dir)
    return out_dir
