"""Stage 2: graph fusions with Optimum's ORTOptimizer, at the level that is safe for the target."""
from __future__ import annotations

import collections
import logging
import shutil
from pathlib import Path

from exporter.config import Target

log = logging.getLogger(__name__)

# O2 = O1 (LayerNorm/SkipLayerNorm/Attention/BiasGelu fusions) + extended fusions, numerically exact.
# O3 adds the GELU approximation and O4 casts the whole graph to fp16 blindly: neither is used.
LEVEL = {Target.CPU: 2, Target.GPU: 2}


def optimize_onnx(raw_dir: Path, out_dir: Path, target: Target) -> tuple[Path, dict]:
    """Fuse ``raw_dir/model.onnx`` into ``out_dir/model.onnx`` with value_info for every tensor.

    Returns the path and a record (level, fused operators). When ORTOptimizer does not support the
    architecture the raw graph is kept (with shape annotations) and the record says why.
    """
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    out_dir.mkdir(parents=True, exist_ok=True)
    level = LEVEL[target]
    record: dict = {"tool": "optimum.onnxruntime.ORTOptimizer", "level": f"O{level}",
                    "optimize_for_gpu": target is Target.GPU}
    try:
        from optimum.onnxruntime import ORTOptimizer
        from optimum.onnxruntime.configuration import OptimizationConfig

        config = OptimizationConfig(optimization_level=level, optimize_for_gpu=target is Target.GPU, fp16=False)
        ORTOptimizer.from_pretrained(raw_dir).optimize(config, out_dir, file_suffix=None)
    except (NotImplementedError, KeyError, ValueError) as exc:
        log.warning("ORTOptimizer cannot optimize this model (%s); keeping the unfused graph", exc)
        record.update(level="none", reason=str(exc))
        shutil.copy(raw_dir / "model.onnx", out_dir / "model.onnx")
    for extra in out_dir.iterdir():
        if extra.name != "model.onnx":
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    path = out_dir / "model.onnx"
    # Contrib ops (Attention, SkipLayerNormalization) defeat onnx shape inference; the fp16 converter and
    # the quantizers need every tensor's type, so annotate with ORT's symbolic shape inference.
    model = SymbolicShapeInference.infer_shapes(onnx.load(str(path)), auto_merge=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    before = collections.Counter(n.op_type for n in onnx.load(str(raw_dir / "model.onnx"), load_external_data=False).graph.node)
    after = collections.Counter(n.op_type for n in model.graph.node)
    record["nodes_before"] = sum(before.values())
    record["nodes_after"] = sum(after.values())
    record["fused_ops"] = {op: n for op, n in sorted(after.items()) if op not in before}
    log.info("optimized graph: %d -> %d nodes, fused %s", record["nodes_before"], record["nodes_after"], record["fused_ops"])
    return path, record
