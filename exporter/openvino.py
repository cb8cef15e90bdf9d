"""OpenVINO variants beside the ONNX Runtime ones (issue 22): ``ov_fp32`` and ``ov_int8``.

Both start from the same fused fp32 ONNX graph as every other variant and live in ``<build>/<name>/``: the
``model.onnx`` they were converted from (the repository checks its tensors) and ``model.xml``/``model.bin``,
the OpenVINO IR that runs (serving/models/runtime.py picks OpenVINO when the IR is there).

- ``ov_fp32``: the graph converted as is (fp32 weights), run at the runtime's DEFAULT inference precision:
  bf16 on CPUs with AMX or AVX512-BF16, f32 elsewhere. What ran is recorded (``runtime_settings``) and judges
  the budget: bf16 is 16-bit float inference, so it is gated with the fp16 budget; f32 with the fp32 one.
- ``ov_int8``: NNCF post-training quantization (``ModelType.TRANSFORMER``, MIXED preset) calibrated on
  training rows, each row alone at its own length as served (as the ORT static int8 calibration takes
  them); its float remainder runs in f32 (``INT8_REST_PRECISION``, written into the IR's rt_info). Sensitivity handling when the tuning rows miss the budget: rounds that keep more MatMuls in
  floating point (NNCF ``IgnoredScope``: the nodes the ONNX Runtime int8 search kept in fp32, then the FFN
  down-projections, then every FFN MatMul), each judged on the tuning rows, the first that passes kept; the
  evaluation rows then give the final verdict, like every variant's. (NNCF's accuracy-aware
  ``quantize_with_accuracy_control`` was tried first: on MiniLM each reverted layer made the drop worse,
  0.01 -> 0.21 -> 0.42 in min cosine, and its ranking ran for minutes on 2 shared cores.)

The conversion and each NNCF round run in a worker process (exporter.worker's ``ov-convert``/``ov-quantize``
jobs over exporter/openvino_ir.py), as the torch export and the ONNX Runtime quantizers do: in the build
process they raised a BERT-base-sized build's peak to 4.7× the fp32 weights.

Gated, timed and selected like every other variant (exporter.pipeline.run_variants, the same per-row 1-thread gate
and speed measure: parity.session opens an OpenVINO session when the IR is there).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from exporter import parity, worker
from exporter.config import Precision
from exporter.parity import Batch
from exporter.variants import OV_FP32, OV_INT8, Builder, Context, Made, ProbeSpeed, probe_record
from serving.models import runtime

log = logging.getLogger(__name__)

SIXTEEN_BIT = ("bf16", "f16")  # inference precisions judged by the fp16 budget
# ov_int8's non-quantized operations run in f32: at the default bf16 on AMX, NNCF int8 of MiniLM gave a min
# cosine of 0.660 (p1 0.786) on 200 texts, at f32 0.992 (measured here, 2026-12-05)
INT8_REST_PRECISION = "f32"
CALIBRATION_ROWS = 300  # NNCF's default subset size; fewer when fewer training rows are given
# ONNX node names of BERT-family FFN MatMuls (Optimum's export names them after the torch modules)
FFN_DOWN, FFN_UP = r".*layer\.\d+/output/dense/MatMul.*", r".*layer\.\d+/intermediate/dense/MatMul.*"


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


def make_fp32(ctx: Context, dst: Path) -> Made:
    record = worker.call("ov-convert", src=str(ctx.base), dst=str(dst))  # the conversion's memory: a worker's
    return {"fp32_nodes": "all", "runtime_settings": record}, None


def _quantize(src_onnx: Path, dst: Path, rows: Path, ignored: dict | None, smooth_quant: bool = True) -> dict:
    """One NNCF int8 round in a worker (exporter.openvino_ir.quantize): its memory is the worker's."""
    return worker.call("ov-quantize", src=str(src_onnx), dst=str(dst), calibration=str(rows), ignored=ignored,
                       precision=INT8_REST_PRECISION, smooth_quant=smooth_quant)


def sensitivity_rounds(excluded: Sequence[str] = ()) -> list[dict | None]:
    """The ignored scopes tried in turn until the tuning rows pass: none; the nodes the ONNX Runtime int8
    search kept in fp32 (when it kept any); the FFN down-projections (fed by GELU outputs with outliers, the
    most sensitive MatMuls on BERT models, as the ORT ranking finds); every FFN MatMul."""
    rounds: list[dict | None] = [None]
    if excluded:
        rounds.append({"names": list(excluded)})
    rounds += [{"patterns": [FFN_DOWN]}, {"patterns": [FFN_DOWN, FFN_UP]}]
    return rounds


def search(src_onnx: Path, dst: Path, calibration: list[Batch], tune: Callable[[Path], tuple[bool, str]],
           excluded: Sequence[str] = (), too_slow: Callable[[Path], bool] | None = None) -> dict:
    """Quantize with each of :func:`sensitivity_rounds` until ``tune(dst)`` passes (the tuning rows, never
    the evaluation rows); ``dst`` keeps the last round. Round 0 is timed before its tuning check when
    ``too_slow`` is given: when it says round 0 is slower than a variant that passed, neither the check nor
    a further round runs (keeping more in float only slows it down, so it could never be selected). That
    timing runs on a probe calibrated on the first ``PROBE_ROWS`` rows; the full
    calibration runs only when the probe is fast enough (:func:`_probe`). Returns the runtime record with the attempts."""
    attempts, record, rows_used, done = [], {}, len(calibration), None
    with tempfile.TemporaryDirectory(prefix="ov-int8-calibration-") as tmp:
        rows = worker.save_batches(calibration, Path(tmp) / "calibration.npz")
        if too_slow is not None:
            record, probe_rows, slow = _probe(src_onnx, dst, calibration, Path(tmp), too_slow)
            done = record if probe_rows == len(calibration) else None  # the probe was round 0 itself
            if slow:
                rows_used = probe_rows
                attempts.append({"round": 0, "ignored_scope": None, "calibration_rows": probe_rows,
                                 "skipped": f"timed on a probe calibrated on {probe_rows} rows without "
                                            "SmoothQuant (the same operators, other scales; the file kept is "
                                            "that probe): no full "
                                            "calibration, tuning check or sensitivity rounds"})
        for i, ignored in enumerate(sensitivity_rounds(excluded) if not attempts else []):
            record = done if i == 0 and done is not None else _quantize(src_onnx, dst, rows, ignored)
            passed, reason = tune(dst)
            attempts.append({"round": i, "ignored_scope": ignored, "tuning_passed": passed, "tuning": reason})
            log.info("ov_int8 round %d (ignored %s): tuning %s", i, ignored, "pass" if passed else reason)
            if passed:
                break
    record["quantization"] = {"tool": "nncf.quantize", "preset": "MIXED", "model_type": "TRANSFORMER",
                              "calibration_rows": rows_used, "ignored_scope": attempts[-1]["ignored_scope"]}
    record["search"] = attempts
    return record


PROBE_ROWS = 32  # calibration rows of the probe that ov_int8's round 0 is timed on


def _probe(src_onnx: Path, dst: Path, calibration: list[Batch], tmp: Path,
           too_slow: Callable[[Path], bool]) -> tuple[dict, int, bool]:
    """Round 0 quantized on the first ``PROBE_ROWS`` calibration rows only into ``dst``: (its runtime record,
    those rows, whether it is ``too_slow``). NNCF's calibration (its statistics passes: the slow part) sets
    the scales, never which operators run, so the probe runs at the speed of the fully calibrated IR. A probe
    that is not round 0 itself (fewer rows than the calibration) also skips SmoothQuant: its statistics pass
    and model compile took 25 -> 20 s of NNCF on a BERT-base-sized graph, and it only rescales (it can make
    the IR slower, never faster: the two probe files ran 36.3 / 36.1 rows/s, interleaved)."""
    probe = calibration[:PROBE_ROWS]
    rows = worker.save_batches(probe, tmp / "probe.npz")
    record = _quantize(src_onnx, dst, rows, None, smooth_quant=len(probe) == len(calibration))
    return record, len(probe), too_slow(dst)


def _calibration_rows(ctx: Context) -> list[Batch]:
    """ov_int8's calibration: the first ``CALIBRATION_ROWS`` training rows, each alone."""
    return parity.unbatch(ctx.data.calibration)[:CALIBRATION_ROWS]


# ------------------------------------------------------------------------------------------ embeddings


def embedding_rows(tokenizer, texts: Sequence[str], max_length: int) -> list[Batch]:
    """Each text alone, unpadded, as int64 feeds of one row (as the CPU embedder runs it)."""
    rows = []
    for text in texts:
        enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="np")
        rows.append({k: np.asarray(v, dtype=np.int64) for k, v in enc.items()})
    return rows


def make_embedding(name: str, fp32_onnx: Path, dst: Path, *, calibration: list[Batch] | None = None,
                   tune: Callable[[Path], tuple[bool, str]] | None = None) -> dict:
    """An OpenVINO embedding variant in ``dst``'s directory from the fp32 graph with its pooling head:
    converted (ov_fp32) or NNCF-quantized on ``calibration`` rows with the sensitivity rounds judged by
    ``tune`` (ov_int8). Returns its runtime record."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if name == OV_FP32:
        return worker.call("ov-convert", src=str(fp32_onnx), dst=str(dst))
    return search(fp32_onnx, dst, calibration or [], tune or (lambda path: (True, "no tuning texts")))


def make_int8(ctx: Context, dst: Path) -> Made:
    """NNCF PTQ on training rows, the sensitivity rounds judged on the tuning rows; the eval rows decide."""
    calibration = _calibration_rows(ctx)
    tuning = parity.unbatch(ctx.data.tuning_batches)
    excluded = sorted({n for v in ctx.variants.values() if not v.runtime_settings for n in v.excluded_nodes or ()})

    def tune(path: Path) -> tuple[bool, str]:
        sess = runtime.OpenVINOSession(path.parent / runtime.IR_FILE, threads=1)
        record = parity.tuning_check(sess, tuning, ctx.tuning_reference(), ctx.config.budgets, ctx.mode)
        return record.passed, record.reason

    floor, probe = None if ctx.config.exhaustive else ctx.best_passing(), ProbeSpeed(ctx)
    too_slow = None if floor is None else (lambda path: probe(path) < floor)  # ProbeSpeed logs the measure
    record = search(ctx.base, dst, calibration, tune, excluded, too_slow)
    scope = record["quantization"]["ignored_scope"] or {}
    extra = {"mode": "static", "runtime_settings": record, "excluded_nodes": scope.get("names") or scope.get("patterns"),
             "calibration": {"rows": record["quantization"]["calibration_rows"], "source": ctx.data.calibration_source,
                             "method": "NNCF MinMax (TRANSFORMER, MIXED)", "format": "OpenVINO IR FakeQuantize"}}
    skipped, rows = record["search"][0].get("skipped"), record["quantization"]["calibration_rows"]
    if skipped:  # round 0 timed slower than a passing variant: that measure is its record
        extra["speed"] = probe.record(f"ov_int8 round 0, a probe calibrated on {rows} of {len(calibration)} rows")
        if rows < len(calibration):  # left at its probe: final
            return extra, probe_record(ctx, skipped)
    return extra, None
