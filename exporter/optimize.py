"""Stage 2: graph fusions (Optimum's O2 fusion set), at the level that is safe for the target."""
from __future__ import annotations

import collections
import contextlib
import logging
import shutil
from pathlib import Path

from exporter.choices import Target
from exporter.memory import release_memory

log = logging.getLogger(__name__)

# O2 = O1 (LayerNorm/SkipLayerNorm/Attention/BiasGelu fusions) + extended fusions, numerically exact.
# O3 adds the GELU approximation and O4 casts the whole graph to fp16 blindly: neither is used.
LEVEL = {Target.CPU: 2, Target.GPU: 2}
# SkipLayerNormalization (residual Add + LayerNorm in one contrib op) only where its kernel is the faster one.
# ONNX Runtime 1.32's CPU kernel computes each row's mean and variance in a scalar loop with a division per
# element (14 % of a served stub's CPU samples); the Add + LayerNormalization it replaces are vectorized. Per
# row, 1 thread, the demo classifier runs 1.16-1.25x faster as int8_dynamic and 1.06x as fp32 without it
# (`scripts/skip_layer_norm_speed.py`, idle machine).
SKIP_LAYER_NORM = {Target.CPU: False, Target.GPU: True}
MS_DOMAIN = "com.microsoft"


def _fuse(model, raw_dir: Path, level: int, target: Target, skip_layer_norm: bool):
    """Apply the transformers fusions of Optimum's ``O<level>`` config to ``model`` in place.

    The same fusion options and model type as ``ORTOptimizer.optimize`` (which also checks the architecture
    is supported), but with ``opt_level=0``: Python fusions only, no ONNX Runtime graph-optimisation pass
    first. That pass held the graph twice more (an InferenceSession plus its serialized output, +1.3 GB on
    BERT-base) and only applies what ONNX Runtime applies again when a session loads the graph.
    """
    from onnxruntime.transformers.optimizer import optimize_model
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig
    from optimum.onnxruntime.utils import ORTConfigManager

    optimizer = ORTOptimizer.from_pretrained(raw_dir)  # reads config.json; raises for unknown architectures
    config = OptimizationConfig(optimization_level=level, optimize_for_gpu=target is Target.GPU, fp16=False)
    ORTConfigManager.check_optimization_supported_model(optimizer.model_type, config)
    model_type = ORTConfigManager.get_model_ort_type(optimizer.model_type)
    options = config.create_fusion_options(model_type)
    options.enable_skip_layer_norm = skip_layer_norm
    fused = optimize_model(model, model_type, optimizer.normalized_config.num_attention_heads,
                           optimizer.normalized_config.hidden_size, opt_level=0, optimization_options=options,
                           use_gpu=target is Target.GPU, only_onnxruntime=False)
    fused.topological_sort()  # what OnnxModel.save_model_to_file does before it writes
    if any(n.domain == MS_DOMAIN for n in fused.model.graph.node) and not any(
            o.domain == MS_DOMAIN for o in fused.model.opset_import):
        fused.model.opset_import.add(domain=MS_DOMAIN, version=1)
    return fused.model


def optimize_onnx(raw_dir: Path, out_dir: Path, target: Target, *,
                  skip_layer_norm: bool | None = None) -> tuple[Path, dict]:
    """Fuse ``raw_dir/model.onnx`` into ``out_dir/model.onnx`` (one file) with value_info for every tensor;
    ``skip_layer_norm``: fuse SkipLayerNormalization (None: the target's :data:`SKIP_LAYER_NORM`).

    Returns the path and a record (level, fused operators). When the fusions do not support the
    architecture the raw graph is kept (with shape annotations) and the record says why.
    """
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    for extra in out_dir.iterdir():
        shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    level = LEVEL[target]
    skip_layer_norm = SKIP_LAYER_NORM[target] if skip_layer_norm is None else skip_layer_norm
    record: dict = {"tool": "optimum.onnxruntime O2 fusions (onnxruntime.transformers.optimizer, opt_level=0)",
                    "level": f"O{level}", "optimize_for_gpu": target is Target.GPU,
                    "skip_layer_norm": skip_layer_norm}
    weights = out_dir / "unfused"
    model = _weightless(raw_dir / "model.onnx", weights)
    before = collections.Counter(n.op_type for n in model.graph.node)
    with contextlib.chdir(weights):  # the fusions read the few weights they merge relative to the cwd
        try:
            model = _fuse(model, raw_dir, level, target, skip_layer_norm)
        except (NotImplementedError, KeyError, ValueError) as exc:
            log.warning("the O%d fusions cannot optimize this model (%s); keeping the unfused graph", level, exc)
            record.update(level="none", reason=str(exc))
        model = _annotate(model)
    onnx.load_external_data_for_model(model, str(weights))
    clear_data_location(model)
    path = out_dir / "model.onnx"
    save_model(model, path)
    shutil.rmtree(weights)
    after = collections.Counter(n.op_type for n in model.graph.node)
    record["nodes_before"] = sum(before.values())
    record["nodes_after"] = sum(after.values())
    record["fused_ops"] = {op: n for op, n in sorted(after.items()) if op not in before}
    log.info("optimized graph: %d -> %d nodes, fused %s", record["nodes_before"], record["nodes_after"], record["fused_ops"])
    return path, record


def _weightless(src: Path, scratch: Path):
    """``src``'s graph with its weights moved to an external file in ``scratch`` and not loaded.

    Shape inference (which the Attention fusion needs, and which copies the whole model several times)
    and the fusions then handle a graph of a few MB instead of the weights; the weights are read back
    once, for the final save.
    """
    import onnx

    scratch.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src))
    onnx.save(model, str(scratch / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    del model
    release_memory()
    return onnx.load(str(scratch / "model.onnx"), load_external_data=False)


def _annotate(model):
    """Shapes for every tensor, checked. Contrib ops (Attention, SkipLayerNormalization) defeat onnx
    shape inference; the fp16 converter and the quantizers need every tensor's type, so ORT's symbolic
    shape inference annotates the graph."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    onnx.checker.check_model(model)
    return model


def clear_data_location(model) -> None:
    """Drop the explicit ``data_location=DEFAULT`` that loading external data leaves on each tensor, so a
    graph that went through external data is the same ModelProto as one that never did."""
    for tensor in [*model.graph.initializer, *(a.t for n in model.graph.node for a in n.attribute if a.HasField("t"))]:
        tensor.ClearField("data_location")


def _without(message, name: str):
    """A copy of ``message`` without its field ``name`` (the other fields are small)."""
    out = type(message)()
    for fd, value in message.ListFields():
        if fd.name == name:
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(out, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(out, fd.name).CopyFrom(value)
        else:
            setattr(out, fd.name, value)
    return out


def save_model(model, path: Path, base_dir: Path | None = None) -> None:
    """``onnx.save(model, path)`` (one file, weights inside) without serializing the model in one piece.

    ``onnx.save`` holds the model, its serialization and a copy of that at once (+1.5 GB on BERT-base).
    This writes the model without its graph, then its graph without initializers, then each initializer as
    a ModelProto of its own that holds only that one: protobuf parsers merge repeated occurrences of a
    message field (the documented "last one wins"/merge rule of the wire format), so every reader (onnx,
    ONNX Runtime) parses the same ModelProto, and this process holds one tensor's bytes at a time.
    Initializers kept as ONNX external data are read from ``base_dir`` one at a time and written inline.
    """
    import onnx
    from onnx import external_data_helper

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(_without(model, "graph").SerializeToString())
        fh.write(onnx.ModelProto(graph=_without(model.graph, "initializer")).SerializeToString())
        for tensor in model.graph.initializer:
            wrapper = onnx.ModelProto()  # graph.initializer = [a copy of this tensor], nothing else
            copy = wrapper.graph.initializer.add()
            copy.CopyFrom(tensor)
            if external_data_helper.uses_external_data(copy):
                _inline(copy, base_dir)
            fh.write(wrapper.SerializeToString())
            del wrapper, copy
    tmp.replace(path)


def _inline(tensor, base_dir: Path | None) -> None:
    """Read an external-data initializer's bytes from ``base_dir`` into it: an ordinary tensor afterwards."""
    from onnx import external_data_helper

    if base_dir is None:
        raise ValueError(f"initializer {tensor.name} is external data and no base directory was given")
    external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))
    del tensor.external_data[:]
    tensor.ClearField("data_location")
