"""Stage 4: int8 variants (dynamic, static QDQ) with a sensitivity-driven search for nodes to keep fp32.

Quantization runs on the fused fp32 graph. When a variant leaves its budget on the tuning rows, the
quantizable nodes are ranked by their local int8 error (each node's output with its weight and input
activation quantized, given fp32 inputs captured on tuning text) and the most sensitive are excluded,
a bounded number of times.
"""
from __future__ import annotations

import contextlib
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from exporter.artifacts import ParityResult
from exporter.calibration import calibrate_minmax
from exporter.parity import Batch
from exporter.stages import track

log = logging.getLogger(__name__)

DYNAMIC = "dynamic"
STATIC = "static"
# The projections carry the compute. Embedding tables (Gather) stay fp32: quantizing them saves file
# size, not time, and per-tensor table quantization flipped labels in measurements here.
DYNAMIC_OPS = ("MatMul", "Attention")
# Static QDQ: weights and activations of the projections; fused contrib ops (Attention) stay fp32.
STATIC_OPS = ("MatMul",)
# Fractions of the ranked candidates excluded in rounds 1, 2, 3, ... (round 0 quantizes everything).
EXCLUSION_SCHEDULE = (0.125, 0.25, 0.5, 0.75)


def cpu_preset() -> str:
    """The Optimum AutoQuantizationConfig preset that fits this CPU."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


@dataclass
class QuantSettings:
    """Quantizer parameters taken from an Optimum preset."""

    preset: str
    is_static: bool
    per_channel: bool
    reduce_range: bool
    activation_type: object
    weight_type: object

    @classmethod
    def from_preset(cls, preset: str, *, is_static: bool, per_channel: bool = True) -> "QuantSettings":
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        qc = getattr(AutoQuantizationConfig, preset)(is_static=is_static, per_channel=per_channel)
        return cls(preset, is_static, qc.per_channel, qc.reduce_range, qc.activations_dtype, qc.weights_dtype)

    def describe(self) -> dict:
        return {"preset": self.preset, "per_channel": self.per_channel, "reduce_range": self.reduce_range,
                "activation_type": getattr(self.activation_type, "name", str(self.activation_type)),
                "weight_type": getattr(self.weight_type, "name", str(self.weight_type))}


@dataclass
class Candidate:
    name: str
    op_type: str
    activation: str | None  # input tensor quantized at run time (None for Gather tables)
    weight: str


def candidates(model, op_types: tuple[str, ...]) -> list[Candidate]:
    """Nodes the quantizer would touch: constant float weights feeding MatMul/Attention/Gather."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        if node.op_type == "Gather":
            table = inits.get(node.input[0])
            if table is not None and table.data_type == TensorProto.FLOAT and len(table.dims) == 2:
                found.append(Candidate(node.name, node.op_type, None, table.name))
        elif len(node.input) > 1 and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            found.append(Candidate(node.name, node.op_type, node.input[0], node.input[1]))
    return found


def _fake_quant_activation(x: np.ndarray, rng: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 asymmetric per-tensor quantization then dequantization; the range is the tensor's own
    (DynamicQuantizeLinear) or, for static quantization, the calibrated ``rng``."""
    lo, hi = (float(x.min()), float(x.max())) if rng is None else rng
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255 or 1.0
    zero = np.clip(np.round(-lo / scale), 0, 255)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def _fake_quant_weight(w: np.ndarray, *, per_channel: bool, reduce_range: bool, amax=None) -> np.ndarray:
    """Symmetric int8 weight quantization (per output column when per_channel) then dequantize."""
    qmax = 63 if reduce_range else 127
    if amax is None:
        amax = np.abs(w).max(axis=0, keepdims=True) if per_channel else np.abs(w).max()
    scale = np.where(amax > 0, amax / qmax, 1.0)
    return np.clip(np.round(w / scale), -qmax, qmax) * scale


def rank_sensitivity(fp32_path: Path, batches: list[Batch], op_types: tuple[str, ...],
                     settings: QuantSettings, calibration: list[Batch] | None = None) -> list[dict]:
    """Nodes sorted by local relative output error under int8, most sensitive first.

    Each node sees fp32 inputs captured on ``batches``; its activation is quantized with its own range
    (dynamic) or with the MinMax range seen on ``calibration`` (static), its weight as the quantizer does.
    """
    cands, weights, sess, wanted = _capture_session(fp32_path, op_types)
    feeds = {i.name for i in sess.get_inputs()}
    errors: dict[str, list[float]] = {c.name: [] for c in cands}
    ranges: dict[str, tuple[float, float]] = {}
    for batch in (calibration or []) if settings.is_static else []:
        for name, x in zip(wanted, sess.run(wanted, {k: v for k, v in batch.items() if k in feeds})):
            lo, hi = ranges.get(name, (np.inf, -np.inf))
            ranges[name] = (min(lo, float(x.min())), max(hi, float(x.max())))
    for batch in track(batches, "int8 sensitivity", total=len(batches)):
        acts = dict(zip(wanted, sess.run(wanted, {k: v for k, v in batch.items() if k in feeds})))
        for c in cands:
            errors[c.name].append(_local_error(c, weights[c.weight], acts, ranges, batch, settings))
    ranked = [{"node": c.name, "op_type": c.op_type, "local_rel_error": round(float(np.mean(errors[c.name])), 6)}
              for c in cands]
    ranked.sort(key=lambda r: r["local_rel_error"], reverse=True)
    return ranked


def _capture_session(fp32_path: Path, op_types: tuple[str, ...]):
    """(candidates, their weights, a session that also outputs every candidate's input, those names).

    The model proto is dropped before the session is created, and the session neither prepacks weights
    nor keeps an arena: only the weights and one session are alive while the ranking runs.
    """
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(fp32_path))
    cands = candidates(model, op_types)
    inits = {i.name: i for i in model.graph.initializer}
    wanted = sorted({c.activation for c in cands if c.activation})
    have = {o.name for o in model.graph.output}
    for name in wanted:
        if name not in have:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    weights = {c.weight: numpy_helper.to_array(inits[c.weight]) for c in cands}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.disable_prepacking", "1")
    with tempfile.TemporaryDirectory(prefix="int8-capture-") as tmp:
        path = Path(tmp) / "capture.onnx"
        onnx.save(model, str(path))
        del model, inits
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return cands, weights, sess, wanted


def _local_error(c: Candidate, w: np.ndarray, acts: dict, ranges: dict, batch: Batch, settings: QuantSettings) -> float:
    """Relative output error of one candidate node under int8, on one batch."""
    if c.activation is None:  # embedding table: weight-only error on the rows looked up
        ids = np.unique(batch["input_ids"])
        ids = ids[ids < w.shape[0]] if w.shape[0] > 1024 else np.arange(w.shape[0])
        rows = w[ids]
        rows_q = _fake_quant_weight(rows, per_channel=False, reduce_range=False, amax=np.abs(w).max())
        return float(np.linalg.norm(rows_q - rows) / (np.linalg.norm(rows) or 1.0))
    x = acts[c.activation]
    mask = batch["attention_mask"].astype(bool)
    # the range covers the whole tensor (padding included, as DynamicQuantizeLinear sees it);
    # the error is measured on real tokens only
    rng = ranges.get(c.activation) or (float(x.min()), float(x.max()))
    if x.ndim == 3 and x.shape[:2] == mask.shape:
        x = x[mask]
    x = x.reshape(-1, x.shape[-1])
    y = x @ w
    yq = _fake_quant_activation(x, rng) @ _fake_quant_weight(w, per_channel=settings.per_channel,
                                                            reduce_range=settings.reduce_range)
    # per-token relative error, averaged: a coarse range ruins small-norm tokens that a norm over the
    # whole tensor would hide
    per_token = np.linalg.norm(yq - y, axis=1) / np.maximum(np.linalg.norm(y, axis=1), 1e-12)
    return float(per_token.mean())


def quantize(kind: str, src: Path, dst: Path, settings: QuantSettings, *, exclude: list[str],
             calibration: list[Batch] | None = None, calibration_cache: Path | None = None) -> None:
    """:func:`quantize_here` in a worker process (the quantizers hold several copies of the weights)."""
    import tempfile

    from exporter import worker

    with tempfile.TemporaryDirectory(prefix="int8-calibration-") as tmp:
        batches = worker.save_batches(calibration, Path(tmp) / "calibration.npz") if calibration else None
        worker.call("quantize", kind=kind, src=str(src), dst=str(dst), settings=settings, exclude=list(exclude),
                    calibration=str(batches) if batches else None,
                    calibration_cache=str(calibration_cache) if calibration_cache else None)


def quantize_here(kind: str, src: Path, dst: Path, settings: QuantSettings, *, exclude: list[str],
                  calibration: list[Batch] | None = None, calibration_cache: Path | None = None) -> None:
    """Write the ``kind`` int8 variant of ``src`` to ``dst``, keeping ``exclude`` nodes in fp32.

    Static quantization calibrates once: the tensor ranges go to ``calibration_cache`` and later rounds
    (which only exclude nodes, so need a subset of the ranges) reuse them.
    """
    import onnx

    extra = {"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT}
    with _quiet_root_logger():
        _quantize(kind, src, dst, settings, exclude, calibration, extra, calibration_cache)


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime.quantization logs per-tensor chatter on the root logger; keep warnings only."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def _quantize(kind, src, dst, settings, exclude, calibration, extra, calibration_cache) -> None:
    """Quantize into a scratch directory with external weights (onnxruntime's own single-file save holds
    the model's serialization twice), then write ``dst`` as one file, one tensor at a time."""
    import tempfile

    import onnx

    from exporter.optimize import clear_data_location, save_model

    with tempfile.TemporaryDirectory(prefix="int8-", dir=Path(dst).parent) as tmp:
        out = Path(tmp) / "model.onnx"
        _quantize_to(kind, src, out, settings, exclude, calibration, extra, calibration_cache)
        model = onnx.load(str(out))
        clear_data_location(model)
        save_model(model, Path(dst))


def _quantize_to(kind, src, dst, settings, exclude, calibration, extra, calibration_cache) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_dynamic, quantize_static

    if kind == DYNAMIC:
        quantize_dynamic(src, dst, op_types_to_quantize=list(DYNAMIC_OPS), per_channel=settings.per_channel,
                         reduce_range=settings.reduce_range, weight_type=settings.weight_type,
                         nodes_to_exclude=exclude, extra_options=extra, use_external_data_format=True)
        return
    cache = Path(calibration_cache) if calibration_cache else Path(dst).parent / "calibration.json"
    if not cache.is_file():  # calibrated here, lean (exporter.calibration); quantize_static reads the cache
        calibrate_minmax(Path(src), calibration or [], cache, STATIC_OPS)
    quantize_static(src, dst, None, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(STATIC_OPS), per_channel=settings.per_channel,
                    reduce_range=settings.reduce_range, activation_type=settings.activation_type,
                    weight_type=settings.weight_type, nodes_to_exclude=exclude,
                    calibrate_method=CalibrationMethod.MinMax, extra_options=extra,
                    calibration_cache_path=cache, use_external_data_format=True)


@dataclass
class SearchResult:
    path: Path | None
    excluded: list[str] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)
    sensitivity: list[dict] = field(default_factory=list)
    eval_record: ParityResult | None = None
    skipped: str | None = None


@dataclass
class _Search:
    """What one search needs besides the files: the checks, the rows for ranking, and the speed floor."""

    kind: str
    settings: QuantSettings
    tune: Callable[[Path], ParityResult]
    final: Callable[[Path], ParityResult]
    tuning_batches: list[Batch]
    calibration: list[Batch] | None
    calibration_cache: Path | None
    throughput: Callable[[Path], float] | None
    speed_floor: float | None


def search(kind: str, src: Path, dst: Path, settings: QuantSettings, *, tune: Callable[[Path], ParityResult],
           final: Callable[[Path], ParityResult], tuning_batches: list[Batch], calibration: list[Batch] | None,
           max_rounds: int, calibration_cache: Path | None = None,
           throughput: Callable[[Path], float] | None = None, speed_floor: float | None = None) -> SearchResult:
    """Quantize, check on tuning rows, and exclude the most sensitive nodes until the budget holds.

    ``tune(path)`` and ``final(path)`` return parity records: ``tune`` on tuning rows drawn apart from the
    evaluation set, ``final`` the gate on the evaluation set itself. Returns the last attempt; its
    ``eval_record`` says whether it passed. When round 0 fails and ``throughput(path)`` is already below
    ``speed_floor`` (the best passing variant's), no exclusion round is tried: keeping nodes in fp32 only
    slows a variant down, so it could never be selected.
    """
    job = _Search(kind, settings, tune, final, tuning_batches, calibration, calibration_cache, throughput, speed_floor)
    result = SearchResult(path=None)
    ranked: list[dict] | None = None
    exclude: list[str] = []
    for round_ in track(range(max_rounds + 1), f"int8 {kind} search rounds", total=max_rounds + 1):
        if round_ > 0:
            if ranked is None:
                ranked = _rank(job, src, result)
            exclude = _next_exclusion(ranked, exclude, round_)
            if exclude is None:
                break
        if _round(job, src, dst, round_, exclude, result):
            break
    if result.path is not None and result.eval_record is None:
        result.eval_record = final(result.path)  # the gate always speaks for the file that is kept
    if result.skipped and not result.eval_record.passed:
        result.eval_record.reason += f"; {result.skipped}"
    return result


def _rank(job: _Search, src: Path, result: SearchResult) -> list[dict]:
    t0 = time.perf_counter()
    ops = DYNAMIC_OPS if job.kind == DYNAMIC else STATIC_OPS
    ranked = _rank_in_worker(src, job.tuning_batches[:2], ops, job.settings, (job.calibration or [])[:4])
    result.sensitivity = ranked[:10]
    log.info("int8 %s: ranked %d nodes by local error in %.1fs; most sensitive: %s", job.kind, len(ranked),
             time.perf_counter() - t0, ", ".join(f"{r['node']} ({r['local_rel_error']:.3f})" for r in ranked[:3]))
    return ranked


def _rank_in_worker(src: Path, batches: list[Batch], ops: tuple[str, ...], settings: QuantSettings,
                    calibration: list[Batch]) -> list[dict]:
    """:func:`rank_sensitivity` in a worker process (it holds the weights and a capture session)."""
    import tempfile

    from exporter import worker

    with tempfile.TemporaryDirectory(prefix="int8-rank-") as tmp:
        rows = worker.save_batches(batches, Path(tmp) / "rows.npz")
        calib = worker.save_batches(calibration, Path(tmp) / "calibration.npz") if calibration else None
        return worker.call("rank", src=str(src), batches=str(rows), op_types=list(ops), settings=settings,
                           calibration=str(calib) if calib else None)


def _next_exclusion(ranked: list[dict], exclude: list[str], round_: int) -> list[str] | None:
    """The nodes round ``round_`` keeps in fp32, or None when it would exclude nothing new."""
    frac = EXCLUSION_SCHEDULE[min(round_ - 1, len(EXCLUSION_SCHEDULE) - 1)]
    k = min(len(ranked), max(len(exclude) + 1, math.ceil(frac * len(ranked))))
    return None if k <= len(exclude) else [r["node"] for r in ranked[:k]]


def _round(job: _Search, src: Path, dst: Path, round_: int, exclude: list[str], result: SearchResult) -> bool:
    """Quantize and check one round; True when the search should stop (passed, or not worth going on)."""
    t0 = time.perf_counter()
    result.eval_record = None
    quantize(job.kind, src, dst, job.settings, exclude=exclude, calibration=job.calibration,
             calibration_cache=job.calibration_cache if job.kind == STATIC else None)
    tuning = job.tune(dst)
    attempt = {"round": round_, "excluded": len(exclude), "tuning": tuning.brief()}
    if tuning.passed:
        result.eval_record = job.final(dst)
        attempt["eval"] = result.eval_record.brief()
    result.attempts.append(attempt)
    result.path, result.excluded = dst, list(exclude)
    log.info("int8 %s round %d: %d nodes kept fp32, tuning %s%s (%.1fs)", job.kind, round_, len(exclude),
             "pass" if tuning.passed else f"fail ({tuning.reason})",
             "" if "eval" not in attempt else f", eval {'pass' if attempt['eval']['passed'] else 'fail'}",
             time.perf_counter() - t0)
    if result.eval_record is not None and result.eval_record.passed:
        return True
    if round_ == 0 and job.throughput is not None and job.speed_floor:
        seq_s = job.throughput(dst)
        attempt["throughput_seq_s"] = seq_s
        if seq_s < job.speed_floor:
            result.skipped = (f"exclusion search skipped: round 0 runs {seq_s:.1f} seq/s, below the "
                              f"{job.speed_floor:.1f} seq/s of a variant that already passed")
            log.info("int8 %s: %s", job.kind, result.skipped)
            return True
    return False
