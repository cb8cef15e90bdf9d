"""The steps every build shares (exporter/steps.py): one select rule, one repository stage, one gate verdict,
used alike by the classifier, the embedder and the tagger; and Task derived from the contract's Head."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from exporter.artifacts import EmbeddingGate, EmbeddingSpeed, GateMode, ParityResult, SpeedResult, Variant
from exporter.build import ClassifierTask
from exporter.choices import Precision, Target, Task
from exporter.embedding_build import EmbeddingVariant
from exporter.embedding_flow import EmbeddingTask
from exporter.stages import Stages
from exporter.steps import Candidate, repository_stage, select
from exporter.token_classification import TaggerGate
from serving.contract import Head


def test_cpu_selects_the_fastest_servable_passing_variant():
    candidates = [Candidate("fp32", "fp32", True, 10.0), Candidate("fp16", "fp16", True, 30.0),
                  Candidate("int8_dynamic", "int8", True, 20.0), Candidate("int8_static", "int8", False, 99.0),
                  Candidate("fast_but_unservable", "int8", True, 500.0, servable=False)]
    assert select(candidates, Target.CPU) == "fp16"
    assert select([Candidate("a", "fp32", True, None), Candidate("b", "int8", True, 1.0)], Target.CPU) == "b"
    assert select([Candidate("a", "fp32", True, None)], Target.CPU) == "a"  # unmeasured ranks last, still served
    assert select([Candidate("a", "fp32", False, 1.0)], Target.CPU) is None
    assert select([], Target.CPU) is None


def test_gpu_prefers_fp16_then_fp32_whatever_the_speed():
    both = [Candidate("fp32", "fp32", True, 100.0), Candidate("fp16", "fp16", True, 1.0)]
    assert select(both, Target.GPU) == "fp16"
    assert select([both[0], Candidate("fp16", "fp16", False, 1.0)], "gpu") == "fp32"


class _Run:
    def __init__(self, target):
        self.config = type("Config", (), {"target": target})()


def _select(task, records, target=Target.CPU):
    """The pipeline's selection (exporter.pipeline.build_variants): steps.select over the task's candidates."""
    return select([task.candidate(_Run(target), name, record) for name, record in records.items()], target)


def test_every_task_selects_through_the_one_rule():
    """The classifier's, the embedder's and the tagger's variant records all go through steps.select."""
    ok = ParityResult(n_examples=1, passed=True, reason="ok", label_agreement=1.0)
    bad = ParityResult(n_examples=1, passed=False, reason="no", label_agreement=0.0)

    def speed(x):
        return SpeedResult(GateMode.PER_ROW, 1.0, 1.0, 1, x, 1)

    variants = {"fp32": Variant("fp32", "fp32", "fp32/model.onnx", 1, ok, speed(5.0)),
                "fp16": Variant("fp16", "fp16", "fp16/model.onnx", 1, bad, speed(50.0)),
                "int8_dynamic": Variant("int8_dynamic", "int8", "i/model.onnx", 1, ok, speed(9.0))}
    assert _select(ClassifierTask(), variants, Target.CPU) == "int8_dynamic"
    assert _select(ClassifierTask(), variants, Target.GPU) == "fp32"

    gate = _embedding_gate(True)
    emb = {"fp32": EmbeddingVariant("fp32", Precision.FP32, gate=gate, speed=EmbeddingSpeed(3.0, 1, 1)),
           "int8": EmbeddingVariant("int8", Precision.INT8, gate=gate, speed=EmbeddingSpeed(7.0, 1, 1))}
    assert _select(EmbeddingTask(), emb) == "int8" and _select(EmbeddingTask(), emb, Target.GPU) == "fp32"


def _embedding_gate(passed: bool) -> EmbeddingGate:
    return EmbeddingGate(n_texts=1, min_cosine=1.0, mean_cosine=1.0, max_norm_gap=0.0, topk_overlap=1.0, top_k=1,
                         nan_inf=False, budget_min_cosine=0.9, budget_min_topk_overlap=0.0, passed=passed,
                         reason="ok" if passed else "cosine")


def test_the_three_gate_records_are_verdicts():
    tagger_fail = TaggerGate("fp32", "fp32.onnx", passed=False, reasons=["token label agreement 0.5 < 0.99"])
    records = [ParityResult(n_examples=1, passed=True, reason="within budget", label_agreement=1.0),
               _embedding_gate(False), tagger_fail, TaggerGate("fp16", "fp16.onnx", passed=True)]
    for record in records:
        assert isinstance(record.passed, bool) and isinstance(record.reason, str)
        assert record.brief()["passed"] is record.passed
    assert tagger_fail.reason == "token label agreement 0.5 < 0.99"


@dataclass
class _Report:
    repository: str | None = None
    repository_error: str | None = None
    stage_seconds: dict = field(default_factory=dict)
    memory: object = None
    saved: list = field(default_factory=list)


def test_repository_stage_records_the_repository_or_the_error(tmp_path):
    report = _Report()
    assert repository_stage(report, lambda: tmp_path / "repo", lambda: report.saved.append(report.repository)) \
        == tmp_path / "repo"
    assert report.repository == str((tmp_path / "repo").absolute()) and report.saved == [report.repository]

    failed = _Report()

    def boom() -> Path:
        raise KeyboardInterrupt("stopped while writing")

    with pytest.raises(KeyboardInterrupt):
        repository_stage(failed, boom, lambda: failed.saved.append(failed.repository_error))
    assert failed.repository is None and failed.saved == ["KeyboardInterrupt: stopped while writing"]


def test_repository_stage_is_a_timed_stage_with_stages():
    stages, report = Stages(weights_bytes=1), _Report()
    repository_stage(report, lambda: Path("repo"), lambda: None, stages)
    assert "repository" in report.stage_seconds and report.memory is stages.memory


def test_task_derives_from_the_contract_head():
    """Every served head belongs to exactly one task; a new Head without a task fails here."""
    owners = {head: [task for task in Task if head in task.heads] for head in Head}
    assert all(len(tasks) == 1 for tasks in owners.values()), owners
    assert Task.of(Head.REGRESSION) is Task.CLASSIFICATION and Task.of("embedding") is Task.EMBEDDING
    assert Task.TOKEN_CLASSIFICATION.heads == (Head.TOKEN_CLASSIFICATION,)


def _config(checkpoint: Path, tmp_path: Path, **kw):
    from exporter.config import BuildConfig

    return BuildConfig(checkpoint=checkpoint, out=tmp_path / "build", repository=None, **kw)


def test_the_registry_has_a_flow_for_every_task_and_resolves_what_a_checkpoint_is(tmp_path):
    """exporter.tasks: one flow per Task; a ...ForTokenClassification checkpoint given as a classifier (the
    default task) goes to the tagger, an explicit --task to its own flow."""
    import json

    from exporter import tasks
    from exporter.build import build as build_classifier
    from exporter.token_classification import build_tagger

    assert set(tasks.FLOWS) == set(Task) and all(flow.task is task for task, flow in tasks.FLOWS.items())
    plain, tagger = tmp_path / "plain", tmp_path / "tagger"
    for folder, arch in ((plain, "BertForSequenceClassification"), (tagger, "BertForTokenClassification")):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"architectures": [arch]}))
    assert tasks.resolve(_config(plain, tmp_path)).build is build_classifier
    assert tasks.resolve(_config(tagger, tmp_path)).build is build_tagger
    assert tasks.resolve(_config(plain, tmp_path, task="token-classification")).build is build_tagger
    assert tasks.resolve(_config(plain, tmp_path, task="embedding")).task is Task.EMBEDDING


def test_build_runs_the_resolved_flow(tmp_path, monkeypatch):
    from exporter import tasks

    calls = []
    monkeypatch.setitem(tasks.FLOWS, Task.EMBEDDING, tasks.TaskFlow(Task.EMBEDDING, calls.append, str))
    config = _config(tmp_path, tmp_path, task="embedding")
    tasks.build(config)
    assert calls == [config]
