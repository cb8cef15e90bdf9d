"""OpenVINO variants beside the ONNX Runtime ones (issue 22): ``ov_fp32`` and ``ov_int8``.

Both start from the same fused fp32 ONNX graph as every other variant and live in ``<build>/<name>/``: the
``model.onnx`` they were converted from (the repository checks its tensors) and ``model.xml``/``model.bin``,
the OpenVINO IR that runs (serving/models/runtime.py picks OpenVINO when the IR is there).

- ``ov_fp32``: the graph converted as is (fp32 weights), run at the runtime's DEFAULT inference precision:
  bf16 on CPUs with AMX or AVX512-BF16, f32 elsewhere. What ran is recorded (``runtime_settings``) and judges
  the budget: bf16 is 16-bit float inference, so it is gated with the fp16 budget; f32 with the fp32 one.
- ``ov_int8``: NNCF post-training quantization (``ModelType.TRANSFORMER``, MIXED preset) calibrated on
  training rows, each row alone at its own length as served (as the ORT static int8 calibration takes
  them). Sensitivity handling when the tuning rows miss the budget: NNCF's accuracy-aware quantization
  (``quantize_with_accuracy_control``) reverts the most sensitive layers to floating point until the label
  agreement with the fp32 graph on the tuning rows is back within the int8 budget; the evaluation rows then
  give the final verdict, like every variant's.

Gated, timed and selected like every other variant (exporter.variants.run, the same per-row 1-thread gate
and speed measure: parity.session opens an OpenVINO session when the IR is there).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from exporter.config import Precision
from exporter.parity import Batch
from exporter.variants import OV_FP32, OV_INT8, Builder, Context, Made
from serving.models import runtime

log = logging.getLogger(__name__)

SIXTEEN_BIT = ("bf16", "f16")  # inference precisions judged by the fp16 budget
CALIBRATION_ROWS = 300  # NNCF's default subset size; fewer when fewer training rows are given
# accuracy-aware quantization: rows NNCF ranks the layers on, and at most this many layers reverted to float
# (each reversion is one more validation pass; measured: an unbounded search on MiniLM ran for minutes)
RANKING_ROWS, MAX_REVERTED = 64, 8


def default_precision() -> str:
    """The CPU plugin's default inference precision on this machine (``bf16`` or ``f32``)."""
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()


def gate_precision(inference_precision: str) -> Precision:
    """The budget an OpenVINO float variant is judged by: fp16's when it computes in 16 bits, else fp32's."""
    return Precision.FP16 if inference_precision in SIXTEEN_BIT else Precision.FP32


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def builders(precisions: Sequence[Precision], enabled: bool = True) -> list[Builder]:
    """The OpenVINO builders of the requested precisions (fp32 -> ov_fp32, int8 -> ov_int8); none when
    disabled or when openvino is not installed (then said once in the log)."""
    if not enabled:
        return []
    if not available():
        log.warning("openvino is not installed: no OpenVINO variants (pip install openvino nncf)")
        return []
    out = []
    if Precision.FP32 in precisions:
        out.append(Builder(OV_FP32, gate_precision(default_precision()), "convert", make_fp32))
    if Precision.INT8 in precisions:
        out.append(Builder(OV_INT8, Precision.INT8, "quantize", make_int8))
    return out


def save_ir(model, src_onnx: Path, dst: Path) -> dict:
    """Write ``dst`` (a copy of the ONNX graph the IR comes from) and model.xml/model.bin beside it (fp32
    weights kept: no fp16 compression); returns the variant's runtime record."""
    import openvino as ov

    shutil.copyfile(src_onnx, dst)
    xml = dst.parent / runtime.IR_FILE
    ov.save_model(model, str(xml), compress_to_fp16=False)
    session = runtime.OpenVINOSession(xml, threads=1)
    return {"runtime": runtime.OPENVINO, "openvino_version": ov.get_version(),
            "inference_precision": session.precision, "ir_files": [runtime.IR_FILE, runtime.IR_WEIGHTS],
            "ir_bytes": xml.stat().st_size + (dst.parent / runtime.IR_WEIGHTS).stat().st_size,
            "converted_from": "the fused fp32 ONNX graph (model.onnx beside the IR)"}


def make_fp32(ctx: Context, dst: Path) -> Made:
    import openvino as ov

    record = save_ir(ov.convert_model(str(ctx.base)), ctx.base, dst)
    return {"fp32_nodes": "all", "runtime_settings": record}, None


def quantize(src_onnx: Path, calibration: list[Batch], *, accuracy_control: tuple | None = None):
    """NNCF post-training int8 of ``src_onnx`` calibrated on ``calibration`` (feeds of one row each).
    ``accuracy_control`` = (validation rows, validation_fn, max absolute drop): NNCF's accuracy-aware
    quantization, which reverts the most sensitive layers until the metric is within the drop."""
    import nncf
    import openvino as ov

    model = ov.convert_model(str(src_onnx))
    names = [p.get_any_name() for p in model.inputs]
    feeds = [{k: v for k, v in row.items() if k in names} for row in calibration]
    common = dict(preset=nncf.QuantizationPreset.MIXED, model_type=nncf.ModelType.TRANSFORMER,
                  subset_size=len(feeds))
    if accuracy_control is None:
        return nncf.quantize(model, nncf.Dataset(feeds), **common)
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    rows, validate, max_drop = accuracy_control
    restorer = AdvancedAccuracyRestorerParameters(max_num_iterations=MAX_REVERTED,
                                                  ranking_subset_size=min(RANKING_ROWS, len(rows)))
    return nncf.quantize_with_accuracy_control(
        model, nncf.Dataset(feeds), nncf.Dataset([{k: v for k, v in r.items() if k in names} for r in rows]),
        validation_fn=validate, max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE,
        advanced_accuracy_restorer_parameters=restorer, **common)


def validation_fn(output: str, per_row: Callable[[np.ndarray], np.ndarray], reduce: Callable = np.mean):
    """NNCF's validation_fn: (``reduce`` of the per-row values, the per-row values) of the compiled model's
    ``output`` over the validation rows (each row alone, in their order). The per-row values let NNCF rank
    the layers without a pass per row."""

    def validate(compiled, rows):
        request = compiled.create_infer_request()
        got = [np.array(request.infer(row)[compiled.output(output)], np.float32) for row in rows]
        values = per_row(np.concatenate(got))
        return float(reduce(values)), [float(v) for v in values]

    return validate


def agreement_fn(ref_logits: np.ndarray, disagree: Callable[[np.ndarray, np.ndarray], np.ndarray]):
    """The fraction of decisions a compiled model shares with ``ref_logits`` on the validation rows."""
    from serving.contract import ENCODER_LOGITS

    def per_row(logits: np.ndarray) -> np.ndarray:
        wrong = disagree(logits, ref_logits[:len(logits)])
        return 1.0 - (wrong.reshape(len(logits), -1).mean(1))

    return validation_fn(ENCODER_LOGITS, per_row)


def min_cosine_fn(reference: np.ndarray):
    """The lowest cosine between a compiled embedder's vectors and ``reference`` on the validation rows."""
    from serving.contract import ENCODER_EMBEDDING

    def per_row(got: np.ndarray) -> np.ndarray:
        ref = reference[:len(got)].astype(np.float64)
        norms = np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
        return (got.astype(np.float64) * ref).sum(1) / norms

    return validation_fn(ENCODER_EMBEDDING, per_row, np.min)


# ------------------------------------------------------------------------------------------ embeddings


def embedding_rows(tokenizer, texts: Sequence[str], max_length: int) -> list[Batch]:
    """Each text alone, unpadded, as int64 feeds of one row (as the CPU embedder runs it)."""
    rows = []
    for text in texts:
        enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="np")
        rows.append({k: np.asarray(v, dtype=np.int64) for k, v in enc.items()})
    return rows


def make_embedding(name: str, fp32_onnx: Path, dst: Path, *, calibration: list[Batch] | None = None,
                   control: tuple | None = None) -> dict:
    """An OpenVINO embedding variant in ``dst``'s directory from the fp32 graph with its pooling head:
    converted (ov_fp32) or NNCF-quantized on ``calibration`` rows (ov_int8, accuracy-aware when ``control``).
    Returns its runtime record."""
    import openvino as ov

    dst.parent.mkdir(parents=True, exist_ok=True)
    if name == OV_FP32:
        return save_ir(ov.convert_model(str(fp32_onnx)), fp32_onnx, dst)
    record = save_ir(quantize(fp32_onnx, calibration or [], accuracy_control=control), fp32_onnx, dst)
    record["quantization"] = {"tool": "nncf.quantize_with_accuracy_control" if control else "nncf.quantize",
                              "preset": "MIXED", "model_type": "TRANSFORMER", "calibration_rows": len(calibration or [])}
    return record


def make_int8(ctx: Context, dst: Path) -> Made:
    """Round 0: NNCF PTQ; if the tuning rows miss the budget, accuracy-aware PTQ; the eval rows decide."""
    from exporter import parity

    calibration = parity.unbatch(ctx.data.calibration)[:CALIBRATION_ROWS]
    tuning = parity.unbatch(ctx.data.tuning_batches)
    tune_ref, budgets = ctx.tuning_reference(), ctx.config.budgets
    settings = {"tool": "nncf.quantize", "preset": "MIXED", "model_type": "TRANSFORMER",
                "calibration_rows": len(calibration)}
    record = save_ir(quantize(ctx.base, calibration), ctx.base, dst)
    sess = runtime.OpenVINOSession(dst.parent / runtime.IR_FILE, threads=1)
    tuned = parity.tuning_check(sess, tuning, tune_ref, budgets, ctx.mode)
    attempts = [{"round": 0, "tuning": tuned.reason, "passed": tuned.passed}]
    if not tuned.passed:
        log.info("ov_int8 round 0 misses its budget on the tuning rows (%s): accuracy-aware quantization",
                 tuned.reason)
        disagree = lambda got, ref: parity.disagreements(got, ref, tune_ref.head, tune_ref.threshold)  # noqa: E731
        control = (tuning, agreement_fn(tune_ref.logits, disagree), 1.0 - budgets.int8_min_agreement)
        record = save_ir(quantize(ctx.base, calibration, accuracy_control=control), ctx.base, dst)
        settings["tool"] = "nncf.quantize_with_accuracy_control"
        settings["max_drop"] = {"label_agreement": control[2], "rows": len(tuning)}
        attempts.append({"round": 1, "tuning": "accuracy-aware quantization"})
    record.update(quantization=settings, search=attempts)
    extra = {"mode": "static", "runtime_settings": record,
             "calibration": {"rows": len(calibration), "source": ctx.data.calibration_source,
                             "method": "NNCF MinMax (TRANSFORMER, MIXED)", "format": "OpenVINO IR FakeQuantize"}}
    return extra, None
