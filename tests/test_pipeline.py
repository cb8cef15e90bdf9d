"""The one build pipeline (exporter/pipeline.py) with a task that supplies only what differs: the stage sequence,
fastest-first gating that stops at the first pass, selection, the report written even when nothing passes, and
the repository stage only after a selection. The real tasks (classifier, embedder, tagger) run it end to end in
test_exporter.py, test_embedding*.py, test_tagger.py, test_tasks.py and test_adapters.py."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from exporter import pipeline
from exporter.choices import Precision
from exporter.config import BuildConfig
from exporter.pipeline import Run, Step
from exporter.steps import Candidate


@dataclass
class _Verdict:
    passed: bool
    reason: str = "measured"

    def brief(self) -> dict:
        return {"passed": self.passed, "reason": self.reason}


@dataclass
class _Task:
    """A task whose variants are small files, whose speed is given and whose gate reads the pass/fail table."""

    speeds: dict[str, float]
    passes: dict[str, bool]
    label: str = "toy variant"
    gated: list[str] = field(default_factory=list)

    def prepare(self, config):
        if not Path(config.checkpoint).is_dir():
            raise FileNotFoundError(config.checkpoint)  # checked before any stage runs
        return SimpleNamespace(warnings=["a warning"])

    def weights_bytes(self, inputs):
        return 1000

    def reference(self, run: Run) -> None:
        run.reference = "reference outputs"

    def measure_reference(self, run: Run) -> None:
        run.reference_speed = 1.0

    def export(self, run: Run) -> None:
        run.base = run.scratch / "base.bin"
        run.base.write_bytes(b"graph")

    def plan(self, run: Run) -> list[Step]:
        return [Step(name, Precision.FP32) for name in self.speeds]

    def make(self, run: Run, step: Step):
        path = run.out / f"{step.name}.bin"
        path.write_bytes(run.base.read_bytes())
        return {"file": path, "verdict": None, "reason": ""}, True

    def gate(self, run: Run, step: Step):
        def judge(path: Path) -> _Verdict:
            self.gated.append(path.stem)
            return _Verdict(self.passes[path.stem])
        return judge

    def file(self, run: Run, record) -> Path:
        return record["file"]

    def candidate(self, run: Run, name: str, record) -> Candidate:
        verdict = record["verdict"]
        return Candidate(name, "fp32", verdict is not None and verdict.passed, self.speeds[name])

    def judged(self, run: Run, record, verdict, reason: str = "") -> None:
        record["verdict"], record["reason"] = verdict, reason

    def report(self, run: Run, selected):
        return SimpleNamespace(selected=selected, repository=None, repository_error=None, stage_seconds={},
                               memory=None, reasons={n: r["reason"] for n, r in run.variants.items()})

    def write_report(self, report, out: Path, figure: bool = True) -> None:
        (out / "report.json").write_text(json.dumps({"selected": report.selected, "repository": report.repository,
                                                     "reasons": report.reasons}))

    def write_repository(self, run: Run, report) -> Path:
        repo = Path(run.config.repository)
        repo.mkdir()
        (repo / "served.bin").write_bytes((run.config.out / f"{report.selected}.bin").read_bytes())
        return repo


SPEEDS = {"fp32": 10.0, "fp16": 20.0, "int8": 30.0}


def _config(tmp_path: Path, **kw) -> BuildConfig:
    (tmp_path / "ck").mkdir(exist_ok=True)
    return BuildConfig(checkpoint=tmp_path / "ck", out=tmp_path / "out", repository=tmp_path / "repo", **kw)


def test_the_stage_sequence_gates_fastest_first_selects_reports_and_serves(tmp_path):
    task = _Task(SPEEDS, {"fp32": True, "fp16": True, "int8": False})
    result = pipeline.build(_config(tmp_path), task)
    assert task.gated == ["int8", "fp16"]  # fastest first, stopping at the first that passes
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert result.report.selected == report["selected"] == "fp16" and result.exit_code == 0
    assert report["reasons"]["fp32"] == "not gated: slower than fp16, which passed (--exhaustive gates every variant)"
    assert report["repository"] == str((tmp_path / "repo").absolute())  # saved again after the repository stage
    assert (tmp_path / "repo" / "served.bin").read_bytes() == b"graph"
    seconds = list(result.report.stage_seconds)
    assert seconds == ["reference", "reference-speed", "export", "int8-parity", "fp16-parity", "repository"]


def test_exhaustive_gates_every_variant_with_the_same_selection(tmp_path):
    task = _Task(SPEEDS, {"fp32": True, "fp16": True, "int8": False})
    result = pipeline.build(_config(tmp_path, exhaustive=True), task)
    assert sorted(task.gated) == sorted(SPEEDS) and result.report.selected == "fp16"


def test_nothing_passes_the_report_is_written_and_the_repository_left_alone(tmp_path):
    task = _Task(SPEEDS, {name: False for name in SPEEDS})
    result = pipeline.build(_config(tmp_path), task)
    assert task.gated == ["int8", "fp16", "fp32"] and result.exit_code == 1
    assert json.loads((tmp_path / "out" / "report.json").read_text())["selected"] is None
    assert not (tmp_path / "repo").exists()


def test_bad_input_fails_before_any_stage(tmp_path):
    config = BuildConfig(checkpoint=tmp_path / "missing", out=tmp_path / "out", repository=None)
    with pytest.raises(FileNotFoundError):
        pipeline.build(config, _Task(SPEEDS, {}))
    assert not (tmp_path / "out").exists()
