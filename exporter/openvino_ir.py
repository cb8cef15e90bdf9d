"""OpenVINO conversions run in a worker process (exporter.worker's ``ov-convert`` and ``ov-quantize`` jobs):
the ONNX → IR conversion and NNCF's quantization each hold several copies of the weights (on a
BERT-base-sized checkpoint they raised the build process's peak from 3.3× to 4.7× the fp32 weights when run
in it), so, like the torch export and the ONNX Runtime quantizers, they run where their memory goes back to
the system when they end. Imports only the standard library, numpy and serving/models/runtime.py; openvino
and nncf are imported by the functions that need them (heavy, and needed only here and in the served model).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from serving.models import runtime


def save_ir(model, src_onnx: Path, dst: Path, precision: str | None = None) -> dict:
    """Write ``dst`` (a copy of the ONNX graph the IR comes from) and model.xml/model.bin beside it (fp32
    weights kept: no fp16 compression), with ``precision`` as the inference precision every session of it
    compiles (None: the runtime's default); returns the variant's runtime record."""
    import openvino as ov

    if precision:
        model.set_rt_info(precision, runtime.PRECISION_KEY)
    shutil.copyfile(src_onnx, dst)
    xml = dst.parent / runtime.IR_FILE
    ov.save_model(model, str(xml), compress_to_fp16=False)
    session = runtime.OpenVINOSession(xml, threads=1)
    return {"runtime": runtime.OPENVINO, "openvino_version": ov.get_version(),
            "inference_precision": session.precision, "ir_files": [runtime.IR_FILE, runtime.IR_WEIGHTS],
            "ir_bytes": xml.stat().st_size + (dst.parent / runtime.IR_WEIGHTS).stat().st_size,
            "converted_from": "the fused fp32 ONNX graph (model.onnx beside the IR)"}


def convert(src_onnx: Path, dst: Path) -> dict:
    """``src_onnx`` converted as is into ``dst``'s directory (runs at the runtime's default precision)."""
    import openvino as ov

    return save_ir(ov.convert_model(str(src_onnx)), src_onnx, dst)


def quantize(src_onnx: Path, dst: Path, calibration: list[dict], ignored: dict | None, precision: str,
             smooth_quant: bool = True) -> dict:
    """NNCF post-training int8 of ``src_onnx`` calibrated on ``calibration`` (feeds of one row each), the
    nodes ``ignored`` names ({"names": [...], "patterns": [...]}) kept in floating point computed at
    ``precision``; written into ``dst``'s directory. Returns the runtime record. ``smooth_quant=False``
    skips NNCF's SmoothQuant (its own statistics pass and model compile): for a probe that is only timed,
    since SmoothQuant rescales weights and activations and never removes an operation."""
    import nncf
    import openvino as ov

    model = ov.convert_model(str(src_onnx))
    names = [p.get_any_name() for p in model.inputs]
    feeds = [{k: v for k, v in row.items() if k in names} for row in calibration]
    scope = nncf.IgnoredScope(**ignored, validate=False) if ignored else None
    advanced = None if smooth_quant else nncf.AdvancedQuantizationParameters(
        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1))  # NNCF: a negative alpha turns it off
    quantized = nncf.quantize(model, nncf.Dataset(feeds), preset=nncf.QuantizationPreset.MIXED,
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds), ignored_scope=scope,
                              advanced_parameters=advanced)
    del model
    return save_ir(quantized, src_onnx, dst, precision)
