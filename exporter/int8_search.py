"""The int8 search, the build process's side of stage 4: quantize in a worker, gate it, and (on tuning rows)
exclude the most sensitive nodes (ranked in a worker by :func:`exporter.int8.rank_sensitivity`) a bounded
number of times until the budget holds. The conversions themselves live in :mod:`exporter.int8`, which the
worker process runs.
"""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from exporter import worker
from exporter.int8 import DYNAMIC, DYNAMIC_OPS, STATIC, STATIC_OPS, QuantSettings
from exporter.parity import Batch
from exporter.progress import track
from exporter.steps import Gate, Verdict

log = logging.getLogger(__name__)

# Fractions of the ranked candidates excluded in rounds 1, 2, 3, ... (round 0 quantizes everything).
EXCLUSION_SCHEDULE = (0.125, 0.25, 0.5, 0.75)
# Bisection rounds after a round passes, between the last failing exclusion and the passing one: every node
# kept in fp32 costs speed. MiniLM's embedder passed with 12 of its 24 ranked nodes in fp32; two rounds found 7
# enough (min cosine 0.9925), and 7 run 1.30x the rows per CPU-second of 12 (scripts/int8_fp32_nodes_speed.py).
REFINE_ROUNDS = 2
PROBE_BATCHES = 1  # calibration batches of the static probe that round 0 is timed on (see _slower_than_floor)


def quantize(kind: str, src: Path, dst: Path, settings: QuantSettings, *, exclude: list[str],
             calibration: list[Batch] | None = None, calibration_cache: Path | None = None) -> None:
    """:func:`exporter.int8.quantize_here` in a worker process (the quantizers hold several copies of the
    weights)."""
    with tempfile.TemporaryDirectory(prefix="int8-calibration-") as tmp:
        batches = worker.save_batches(calibration, Path(tmp) / "calibration.npz") if calibration else None
        worker.call("quantize", kind=kind, src=str(src), dst=str(dst), settings=settings, exclude=list(exclude),
                    calibration=str(batches) if batches else None,
                    calibration_cache=str(calibration_cache) if calibration_cache else None)


@dataclass
class SearchResult:
    path: Path | None
    excluded: list[str] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)
    sensitivity: list[dict] = field(default_factory=list)
    eval_record: Verdict | None = None
    skipped: str | None = None
    calibration_batches: int = 0  # static: the calibration batches the kept file was calibrated on


@dataclass
class _Search:
    """What one search needs besides the files: the checks, the rows for ranking, and the speed floor."""

    kind: str
    settings: QuantSettings
    tune: Gate
    final: Gate
    tuning_batches: list[Batch]
    calibration: list[Batch] | None
    calibration_cache: Path | None
    throughput: Callable[[Path], float] | None
    speed_floor: float | None


def search(kind: str, src: Path, dst: Path, settings: QuantSettings, *, tune: Gate, final: Gate,
           tuning_batches: list[Batch], calibration: list[Batch] | None, max_rounds: int,
           calibration_cache: Path | None = None,
           throughput: Callable[[Path], float] | None = None, speed_floor: float | None = None) -> SearchResult:
    """Quantize, check on tuning rows, and exclude the most sensitive nodes until the budget holds.

    ``tune(path)`` and ``final(path)`` are gates (exporter.steps.Gate: the task's measure, a Verdict):
    ``tune`` on tuning rows drawn apart from the evaluation set, ``final`` the gate on the evaluation set
    itself. Round 0 (everything quantized) goes straight to ``final``: it makes no choice the tuning rows
    could inform, and a task's tuning reference (the fp32 graph on every tuning row) is then only computed
    when an exclusion round needs it. Each later round is checked on the tuning rows first, and gated only
    when it passes them. Returns the last attempt; its ``eval_record`` says whether it passed. When round 0's
    ``throughput(path)`` is already below ``speed_floor`` (the best passing variant's), neither its tuning check, its gate nor an exclusion round
    is run (``eval_record`` None, ``skipped`` says why; static int8 is timed on a probe calibrated on a few
    rows before its full calibration: :func:`_slower_than_floor`): keeping nodes in fp32 only slows a variant down,
    so it could never be selected; exporter.pipeline.run_variants records it as not gated (or gates round 0's
    file if its final speed measure puts it ahead of every passing variant; never a probe's, whose
    record the builder makes final: exporter.variants.probe_record).
    """
    job = _Search(kind, settings, tune, final, tuning_batches, calibration, calibration_cache, throughput, speed_floor)
    result = SearchResult(path=None)
    ranked: list[dict] | None = None
    exclude: list[str] = []
    failed_at: int | None = None  # the most nodes a round kept in fp32 and still missed the budget with
    for round_ in track(range(max_rounds + 1), f"int8 {kind} search rounds", total=max_rounds + 1):
        if round_ > 0:
            if ranked is None:
                ranked = _rank(job, src, result)
            exclude = _next_exclusion(ranked, exclude, round_)
            if exclude is None:
                break
        if _round(job, src, dst, round_, exclude, result):
            break
        failed_at = len(exclude)
    if ranked is not None and failed_at is not None and _passed(result):
        _refine(job, src, dst, ranked, failed_at, result)
    if result.path is not None and result.eval_record is None and not result.skipped:
        result.eval_record = final(result.path)  # the gate always speaks for the file that is kept
    if result.skipped and result.eval_record is not None and not result.eval_record.passed:
        result.eval_record.reason += f"; {result.skipped}"
    return result


def _passed(result: SearchResult) -> bool:
    return result.eval_record is not None and result.eval_record.passed


def _refine(job: _Search, src: Path, dst: Path, ranked: list[dict], failed_at: int, result: SearchResult) -> None:
    """Bisect the number of ranked nodes kept in fp32 between ``failed_at`` (missed the budget) and the passing
    round's, for at most ``REFINE_ROUNDS`` rounds: the fewest that pass is kept (``dst`` and ``result``). When
    the last round tried fails, the passing file is put back and the gate run on it again (its record must
    speak for the file that is kept; a task's gate may write beside it)."""
    lo, hi = failed_at, len(result.excluded)
    with tempfile.TemporaryDirectory(prefix="int8-refine-", dir=dst.parent) as tmp:
        kept = Path(tmp) / dst.name
        best = _snapshot(dst, kept, result)
        for _ in range(REFINE_ROUNDS):
            if hi - lo <= 1:
                break
            mid = (lo + hi) // 2
            log.info("int8 %s: bisection between %d (missed) and %d (passed) nodes in fp32: %d", job.kind, lo, hi, mid)
            passed = _round(job, src, dst, len(result.attempts), [r["node"] for r in ranked[:mid]], result)
            result.attempts[-1]["bisection"] = True
            if passed:
                hi, best = mid, _snapshot(dst, kept, result)
            else:
                lo = mid
        if len(result.excluded) != hi:  # the last round missed: the fewest that passed go back
            shutil.copyfile(kept, dst)
            result.path, result.excluded, result.calibration_batches, result.eval_record = best
            if "eval" in result.attempts[-1]:  # the gate ran on the file that missed: it speaks again
                result.eval_record = job.final(dst)


def _snapshot(dst: Path, kept: Path, result: SearchResult) -> tuple:
    """Copy the passing file aside; what ``result`` says about it."""
    shutil.copyfile(dst, kept)
    return result.path, list(result.excluded), result.calibration_batches, result.eval_record


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
    """:func:`exporter.int8.rank_sensitivity` in a worker process (it holds the weights and a capture
    session)."""
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
    timed = round_ == 0 and job.throughput is not None and bool(job.speed_floor)
    if timed and _slower_than_floor(job, src, dst, result):
        return True
    if not timed or _probed(job):  # a dynamic round 0 that was timed is already in ``dst``
        quantize(job.kind, src, dst, job.settings, exclude=exclude, calibration=job.calibration,
                 calibration_cache=job.calibration_cache if job.kind == STATIC else None)
    result.path, result.excluded, result.calibration_batches = dst, list(exclude), len(job.calibration or [])
    attempt = {"round": round_, "excluded": len(exclude)}
    tuning = job.tune(dst) if exclude else None  # round 0 chooses nothing the tuning rows could inform
    if tuning is not None:
        attempt["tuning"] = tuning.brief()
    if tuning is None or tuning.passed:
        result.eval_record = job.final(dst)
        attempt["eval"] = result.eval_record.brief()
    result.attempts.append(attempt)
    log.info("int8 %s round %d: %d nodes kept fp32%s%s (%.1fs)", job.kind, round_, len(exclude),
             "" if tuning is None else ", tuning " + ("pass" if tuning.passed else f"fail ({tuning.reason})"),
             "" if "eval" not in attempt else f", gate {'pass' if attempt['eval']['passed'] else 'fail'}",
             time.perf_counter() - t0)
    return result.eval_record is not None and result.eval_record.passed


def _probed(job: _Search) -> bool:
    """Whether round 0 is timed on a probe: static quantization with more calibration than ``PROBE_BATCHES``."""
    return job.kind == STATIC and len(job.calibration or []) > PROBE_BATCHES


def _slower_than_floor(job: _Search, src: Path, dst: Path, result: SearchResult) -> bool:
    """Round 0 timed before any check: True (and ``result.skipped`` says why) when it runs below the speed
    floor. Static int8 is timed on a probe calibrated on the first ``PROBE_BATCHES`` calibration batches
    (its own ranges, not the cache later rounds read): the calibration sets the scales, never which
    operators run, so the probe runs at the speed of the fully calibrated graph, and the full calibration
    (the slow part) runs only for a variant that could be selected. A skipped variant keeps the probe."""
    probe = _probed(job)
    calibration = (job.calibration or [])[:PROBE_BATCHES] if probe else job.calibration
    with tempfile.TemporaryDirectory(prefix="int8-probe-") as tmp:
        cache = Path(tmp) / "calibration.json" if probe else job.calibration_cache
        quantize(job.kind, src, dst, job.settings, exclude=[], calibration=calibration,
                 calibration_cache=cache if job.kind == STATIC else None)
    result.path, result.excluded, result.calibration_batches = dst, [], len(calibration or [])
    seq_s = job.throughput(dst)
    if seq_s >= job.speed_floor:
        log.info("int8 %s: round 0 runs %.1f seq/s, at least the %.1f seq/s of a variant that passed: searched",
                 job.kind, seq_s, job.speed_floor)
        return False
    result.skipped = (f"round 0 runs {seq_s:.1f} seq/s, below the {job.speed_floor:.1f} seq/s of a variant that "
                      "already passed: no tuning check, gate or exclusion search")
    if probe:
        result.skipped += (f" (timed on a probe calibrated on {len(calibration)} of the {len(job.calibration)} "
                           "calibration batches: the same operators, other scales; the file kept is that probe)")
    result.attempts.append({"round": 0, "excluded": 0, "throughput_seq_s": seq_s, "skipped": result.skipped})
    log.info("int8 %s: %s", job.kind, result.skipped)
    return True
