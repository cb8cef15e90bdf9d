"""Stage 3: fp16 variant that keeps overflow-prone nodes and the graph's inputs/outputs in fp32."""
from __future__ import annotations

import logging
from pathlib import Path

from exporter.optimize import save_model

log = logging.getLogger(__name__)

# Normalisations, softmax and the reductions inside an unfused LayerNorm overflow or lose precision in
# fp16 (variance of large activations, exp of large logits): they stay fp32 and get Casts around them.
FP32_OPS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt")


def convert_fp16(src: Path, dst: Path) -> dict:
    """Write an fp16 copy of ``src`` to ``dst``; return {"fp32_nodes": [...], "converter": ...}.

    Uses onnxruntime's float16 converter (the maintained fork of onnxconverter_common.float16, same
    ``keep_io_types``/``op_block_list`` API). onnxconverter_common 1.16 itself breaks on fused graphs here:
    it inserts no Cast before contrib ops whose input types onnx cannot infer, and its Cast clean-up raises
    "The downstream node of the second cast node should be graph output" on the logits/probabilities pair.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    kept = [n.name for n in model.graph.node if n.op_type in FP32_OPS]
    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(FP32_OPS), disable_shape_infer=True,
    )
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(converted)
    wrapped.topological_sort()  # the converter appends its Casts at the end of the node list
    converted = wrapped.model
    save_model(converted, dst)  # one tensor at a time; then checked by path, without a Python copy
    onnx.checker.check_model(str(dst))
    log.info("fp16: %d nodes kept in fp32 (%s) plus float32 graph inputs/outputs", len(kept), ", ".join(sorted(set(
        n.op_type for n in model.graph.node if n.name in kept))) or "none")
    return {
        "converter": "onnxruntime.transformers.float16 (keep_io_types=True)",
        "fp32_ops": list(FP32_OPS),
        "fp32_nodes": kept,
        "fp32_ops_present": sorted({n.op_type for n in model.graph.node if n.name in kept}),
        "fp32_io": [i.name for i in model.graph.output],
    }
