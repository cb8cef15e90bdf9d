"""The one build pipeline, whatever the task: read and validate the inputs -> reference -> reference speed ->
export -> variants (each built and timed, then gated in selection's order, stopping at the first that passes
unless --exhaustive) -> select (exporter.steps.select) -> report (written even when nothing passes, inside the
atomic build directory) -> repository (exporter.steps.repository_stage). Every stage is timed
(exporter.stages.Stages) and shows its progress as every build does (exporter.progress).

A task supplies only what differs, as a :class:`TaskSpec` (exporter.build: classifiers, rerankers, PEFT adapters;
exporter.embedding_flow: sentence embedders; exporter.token_classification: taggers); exporter.tasks registers
each one. Its gate is one interface for every task: a ``steps.Gate`` (a variant's file -> its ``steps.Verdict``)
that the task binds to its reference and the variant's precision."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from common.atomic import atomic_directory
from exporter import steps
from exporter.choices import Precision, Target
from exporter.config import BuildConfig
from exporter.memory import release_memory
from exporter.progress import progress_display
from exporter.result import BuildResult
from exporter.stages import Stages

log = logging.getLogger(__name__)


@dataclass
class Step:
    """One variant the task builds: its name (the report's key), its precision (the budgets its gate applies)
    and the task's own builder (what ``TaskSpec.make`` runs)."""

    name: str
    precision: Precision
    make: Any = None


@dataclass
class Run:
    """One build in progress: the config and checked inputs, where files go, the stage clock, and what the
    stages produced so far (the task's reference and exported graph, the variant records by name)."""

    config: BuildConfig
    inputs: Any
    out: Path
    scratch: Path
    stages: Stages
    reference: Any = None  # the task's reference outputs (what every gate compares against)
    reference_speed: Any = None
    base: Any = None  # the exported graph every variant starts from
    export_record: dict = field(default_factory=dict)
    state: Any = None  # whatever else the task keeps between its stages
    variants: dict[str, Any] = field(default_factory=dict)


class TaskSpec(Protocol):
    """What a task supplies to the pipeline; the sequence, gate order, selection, report and repository stage
    are the pipeline's. ``make`` builds and times one variant and returns (its record, whether it still needs
    its gate: False when it failed to build or its builder already gated it, as the int8 searches do)."""

    label: str  # how logs name the task's variants ("variant", "embedding variant", "tagger variant")

    def prepare(self, config: BuildConfig) -> Any: ...  # every input check that can fail, before slow work
    def weights_bytes(self, inputs: Any) -> int | None: ...  # the fp32 weights (the memory record's unit)
    def reference(self, run: Run) -> None: ...  # sets run.reference
    def measure_reference(self, run: Run) -> None: ...  # sets run.reference_speed (and frees the reference model)
    def export(self, run: Run) -> None: ...  # sets run.base (and run.export_record)
    def plan(self, run: Run) -> Sequence[Step]: ...  # the variants to build, in build order
    def make(self, run: Run, step: Step) -> tuple[Any, bool]: ...
    def gate(self, run: Run, step: Step) -> steps.Gate: ...
    def file(self, run: Run, record: Any) -> Path: ...  # the variant's file (what the gate opens)
    def candidate(self, run: Run, name: str, record: Any) -> steps.Candidate: ...
    # records the verdict (None: not gated, with the reason why)
    def judged(self, run: Run, record: Any, verdict: steps.Verdict | None, reason: str = "") -> None: ...
    def report(self, run: Run, selected: str | None) -> Any: ...
    def write_report(self, report: Any, out: Path, figure: bool = True) -> None: ...
    def write_repository(self, run: Run, report: Any) -> Path: ...


def build(config: BuildConfig, task: TaskSpec) -> BuildResult:
    """Run ``task`` through the pipeline. The report is written even when no variant passes; the selected file
    goes to the repository only once the build directory is in place (a failure there leaves the old one)."""
    inputs = task.prepare(config)
    for warning in getattr(inputs, "warnings", ()):
        log.warning("%s", warning)
    stages = Stages(task.weights_bytes(inputs))
    with progress_display(), tempfile.TemporaryDirectory(prefix="exporter-") as scratch, \
            atomic_directory(config.out) as out:
        run = Run(config, inputs, out, Path(scratch), stages)
        selected = build_variants(task, run)
        report = task.report(run, selected)
        if selected is None:
            log.error("no %s passed its gate: nothing is served, %s is left as it was", task.label,
                      config.repository or "the repository")
        task.write_report(report, out)
    if selected is not None and config.repository is not None:
        steps.repository_stage(report, lambda: task.write_repository(run, report),
                               lambda: task.write_report(report, config.out, figure=False), stages)
    return BuildResult(report, config.out)


def build_variants(task: TaskSpec, run: Run) -> str | None:
    """reference -> reference speed -> export -> variants -> select: the name of the variant to serve."""
    with run.stages("reference"):
        task.reference(run)
    with run.stages("reference-speed"):
        task.measure_reference(run)
    with run.stages("export"):
        task.export(run)
    run_variants(task, run, task.plan(run))
    return steps.select(candidates(task, run), run.config.target, run.config.variant)


def candidates(task: TaskSpec, run: Run) -> list[steps.Candidate]:
    return [task.candidate(run, name, record) for name, record in run.variants.items()]


def run_variants(task: TaskSpec, run: Run, todo: Sequence[Step]) -> dict[str, Any]:
    """Build and time every variant, then gate them in :func:`exporter.steps.preference`'s order (cpu: fastest
    first; gpu: fp16, fp32, the rest) until one the target serves passes. Each variant after it is recorded
    as not gated: selection takes the first passing variant of that same order, so its gate could not change
    what is served. --exhaustive gates every variant; the --variant named is always gated. Returns
    ``run.variants`` in build order."""
    pending = {}
    for step in todo:
        run.variants[step.name], needs_gate = task.make(run, step)
        release_memory()
        if needs_gate:
            pending[step.name] = step
    config, winner = run.config, None
    for cand in steps.preference(candidates(task, run), config.target):
        record = run.variants[cand.name]
        if cand.name in pending:
            if winner is None or config.exhaustive or cand.name == config.variant:
                with run.stages(f"{cand.name}-parity"):
                    task.judged(run, record, task.gate(run, pending[cand.name])(task.file(run, record)))
            else:
                reason = f"not gated: {outranked(config.target, winner)}"
                task.judged(run, record, None, reason)
                log.info("%s %s %s", task.label, cand.name, reason)
        cand = task.candidate(run, cand.name, record)
        if winner is None and cand.passed and cand.servable:
            winner = cand.name
    return run.variants


def outranked(target: Target, winner: str) -> str:
    """Why a variant after ``winner`` in selection's order was not gated."""
    if target is Target.GPU:
        return f"{winner} passed and the gpu target prefers it (--exhaustive gates every variant)"
    return f"slower than {winner}, which passed (--exhaustive gates every variant)"
