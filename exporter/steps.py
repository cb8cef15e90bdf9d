"""The steps every build shares, whatever its task (classifier, embedder, tagger): the gate interface a
variant is judged through, the one rule that selects the variant to serve, and the repository stage that
hands it to serving and records the outcome in the report.

A task supplies its own gate measure (exporter.parity for classifiers, exporter.embedding_gate for
embedders, exporter.token_classification for taggers); each returns a record that is a :class:`Verdict`,
and the int8 search (exporter.int8_search) and :func:`select` only look at that."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from exporter.choices import Precision, Target

log = logging.getLogger(__name__)

# The target's preference when it does not select by speed: the GPU target serves fp16, else fp32.
GPU_PREFERENCE = (Precision.FP16.value, Precision.FP32.value)


class Verdict(Protocol):
    """What a gate says of one variant (ParityResult, EmbeddingGate, TaggerGate)."""

    passed: bool
    reason: str

    def brief(self) -> dict[str, Any]: ...


Gate = Callable[[Path], Verdict]  # a variant's file -> its verdict (a task's measure, bound to its reference)


@dataclass(frozen=True)
class Candidate:
    """One built variant as selection sees it: its gate verdict, its speed (higher is faster, in the unit the
    task times: sequences/s, rows per CPU-second, texts/s), and whether the target can serve it."""

    name: str
    precision: str
    passed: bool
    speed: float | None = None
    servable: bool = True


def preference(candidates: Iterable[Candidate], target: Target) -> list[Candidate]:
    """The candidates in the order selection prefers them, whether they passed or not: the GPU target fp16,
    then fp32, then the rest; the CPU target fastest first (a variant whose speed was not measured last).
    The sort is stable, so candidates that tie keep their given order."""
    candidates = list(candidates)
    if Target(target) is Target.GPU:
        preferred = [c for p in GPU_PREFERENCE for c in candidates if c.precision == p]
        return preferred + [c for c in candidates if c not in preferred]
    return sorted(candidates, key=lambda c: -c.speed if c.speed is not None else float("inf"))


def select(candidates: Iterable[Candidate], target: Target, forced: str | None = None) -> str | None:
    """The variant to serve: the first of :func:`preference`'s order that passed its gate and that the target
    serves (GPU: fp16, else fp32; CPU: the fastest whatever its runtime). ``forced`` (--variant): that variant
    if it qualifies. None when no variant qualifies.

    Because selection takes the FIRST passing candidate of that order, a candidate after one that passed can
    never be selected, whatever its own gate says: exporter.pipeline.run_variants gates in this order and stops
    at the first pass (each later variant recorded as not gated) with the same result as gating every one."""
    passing = [c for c in preference(candidates, target) if c.passed and c.servable]
    if forced is not None:
        if forced not in {c.name for c in passing}:
            log.error("--variant %s did not pass its gate (or was not built): nothing is selected", forced)
            return None
        return forced
    return passing[0].name if passing else None


def repository_stage(report: Any, write: Callable[[], Path], save: Callable[[], None], stages=None) -> Path:
    """Hand the selected variant to the repository writer (``write()`` returns the repository) and record the
    outcome in ``report`` (``repository``, or ``repository_error`` when writing failed: the error is re-raised
    after ``save()`` wrote the report). With ``stages`` (exporter.stages.Stages) the write is a timed stage
    and the report takes the stage times and memory record."""
    try:
        with stages("repository") if stages is not None else contextlib.nullcontext():
            path = write()
    except BaseException as exc:
        report.repository_error = f"{type(exc).__name__}: {exc}"
        save()
        raise
    report.repository = str(Path(path).absolute())
    if stages is not None:
        report.stage_seconds, report.memory = stages.seconds, stages.memory
    save()
    return Path(path)
