"""Multi-label and regression heads, and truncation side, end to end: the gate judges each head by its own
numbers, the build exports and gates them, and the real tritonserver serves them as PyTorch computes them."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from exporter import parity
from exporter.config import Budgets, Precision
from serving.contract import Head, ServedModel, decode_scores

LABELS = ("sports", "music", "food", "travel")
MAX_LENGTH = 32  # below the tiny models' 64 positions; many corpus rows reach it


# ------------------------------------------------------------------------------------------ the gate


def _ref(head: Head, n: int = 50, width: int = 4, seed: int = 0) -> parity.Reference:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (n, width)).astype(np.float32)
    if head is Head.MULTI_LABEL:
        labels = (rng.random((n, width)) < 0.4).astype(np.float32)
    else:
        labels = (logits[:, 0] + rng.normal(0, 0.5, n)).astype(np.float32)
    return parity.Reference(logits, labels, head)


def test_multi_label_gate_counts_every_label_at_the_threshold():
    ref = _ref(Head.MULTI_LABEL)
    same = parity.compare(Precision.FP32, ref, ref.logits.copy(), parity._sigmoid(ref.logits), Budgets())
    assert same.passed and same.label_agreement == 1.0 and same.head == Head.MULTI_LABEL.value
    assert same.max_prob_diff < 1e-6  # the reference probabilities are sigmoids, not a softmax
    flipped = ref.logits.copy()
    flipped[3, 2] = -flipped[3, 2] if flipped[3, 2] != 0 else 1.0  # one label of one row crosses 0.5
    rec = parity.compare(Precision.INT8, ref, flipped, parity._sigmoid(flipped), Budgets())
    assert rec.label_agreement == pytest.approx(1 - 1 / ref.logits.size)
    expected = parity.task_metrics((parity._sigmoid(flipped) >= 0.5).astype(int), ref.labels, 4, Head.MULTI_LABEL)
    assert rec.accuracy == expected["accuracy"] and rec.macro_f1 == expected["macro_f1"]
    strict = parity.compare(Precision.FP32, ref, flipped, parity._sigmoid(flipped), Budgets(fp32_max_abs=100))
    assert not strict.passed and "label agreement" in strict.reason


def test_multi_label_threshold_is_the_gates():
    ref = _ref(Head.MULTI_LABEL)
    high = parity.Reference(ref.logits, ref.labels, Head.MULTI_LABEL, threshold=0.9)
    assert not np.array_equal(parity.predictions(ref.logits, Head.MULTI_LABEL),
                              parity.predictions(ref.logits, Head.MULTI_LABEL, 0.9))
    assert high.metrics != ref.metrics


def test_regression_gate_is_max_abs_and_mae():
    ref = _ref(Head.REGRESSION, width=1)
    ok = parity.compare(Precision.FP32, ref, ref.logits.copy(), ref.logits.copy(), Budgets())
    assert ok.passed and ok.accuracy is None and ok.mae is not None and ok.pearson is not None
    off = ref.logits.copy()
    off[7, 0] += 0.5
    rec = parity.compare(Precision.FP32, ref, off, off, Budgets())
    assert not rec.passed and "max abs" in rec.reason and "agreement" not in rec.reason
    assert rec.label_agreement == pytest.approx(1 - 1 / len(off))  # recorded, not gated
    worse = ref.logits + np.sign(ref.logits - ref.labels[:, None]) * 0.5  # every prediction further off
    rec = parity.compare(Precision.INT8, ref, worse.astype(np.float32), worse, Budgets())
    assert not rec.passed and "MAE increase" in rec.reason and rec.mae_increase_pts > 0


def test_regression_and_multi_label_tuning_check_stop_on_flips():
    class Session:
        def __init__(self, out):
            self.out = out

        def get_inputs(self):
            return []

        def get_outputs(self):
            return [type("O", (), {"name": "logits"})()]

        def run(self, names, feed):
            return [self.out[feed["rows"]]]

    batches = [{"rows": slice(i, i + 10)} for i in range(0, 40, 10)]
    ref = _ref(Head.MULTI_LABEL, n=40)
    sess = Session(-ref.logits)  # every label flipped
    sess.get_inputs = lambda: [type("I", (), {"name": "rows"})()]
    rec = parity.tuning_check(sess, batches, ref, Budgets())
    assert rec.early_stop and not rec.passed and rec.head == Head.MULTI_LABEL.value and rec.n_examples == 10
    ref = _ref(Head.REGRESSION, n=40, width=1)
    sess = Session(ref.logits + 10.0)  # regression: no label flips to stop on; the MAE judges all rows
    sess.get_inputs = lambda: [type("I", (), {"name": "rows"})()]
    rec = parity.tuning_check(sess, batches, ref, Budgets())
    assert not rec.early_stop and not rec.passed and "MAE increase" in rec.reason


def test_contract_decodes_scores_and_refuses_classify_on_regression():
    from serving.contract import ContractError, SCORE, decode_classification

    model = ServedModel(head=Head.REGRESSION, labels=("LABEL_0",))
    assert [t.name for t in model.outputs] == [SCORE]
    assert decode_scores(model, {SCORE: np.array([[1.5], [-2.0]], np.float32)}) == [1.5, -2.0]
    with pytest.raises(ContractError, match="regression"):
        decode_classification(model, {SCORE: np.zeros((1, 1))})
    with pytest.raises(ContractError, match="not regression"):
        decode_scores(ServedModel(labels=("a", "b")), {SCORE: np.zeros((1, 1))})


# ------------------------------------------------------------------------------------- build + serve


def _write_data(ck: Path, root: Path, head: Head, n: int = 160, pairs: bool = False) -> None:
    from checkpoint_factory import corpus

    rng = random.Random(1)
    texts, seconds = corpus(n, seed=5), corpus(n, seed=6)
    data = root / "data"
    data.mkdir()
    for name, lo, hi in (("test", 0, 80), ("validation", 80, 120), ("train", 120, n)):
        with open(data / f"{name}.csv", "w", encoding="utf-8") as fh:
            fh.write("text,pair,label\n" if pairs else "text,label\n")
            for t, second in zip(texts[lo:hi], seconds[lo:hi]):
                if head is Head.MULTI_LABEL:
                    label = "|".join(rng.sample(LABELS, rng.randint(0, 2)))
                elif head is Head.REGRESSION:
                    label = f"{rng.uniform(-1, 1):.4f}"
                else:
                    label = str(rng.randint(0, 1))
                fh.write(f"\"{t}\",\"{second}\",{label}\n" if pairs else f"\"{t}\",{label}\n")
    (ck / "metrics.json").write_text(json.dumps({"data_dir": str(data), "test": {}}))


def _build(tmp: Path, arch_checkpoint, head: Head, *, pairs: bool = False, extra: tuple = (),
           **options) -> tuple[Path, Path, dict]:
    import shutil

    from exporter.cli import main

    src = arch_checkpoint("bert", **options)
    ck = tmp / "checkpoint"
    shutil.copytree(src, ck)
    _write_data(ck, tmp, head, pairs=pairs)
    extra = (["--text-pair-column", "pair"] if pairs else []) + list(extra)
    rc = main([str(a) for a in ["build", ck, "--out", tmp / "build", "--repository", tmp / "repo", "--precisions",
                                "fp32", "--max-length", MAX_LENGTH, "--speed-seconds", "0.1", "--eval-size", "80",
                                "--calibration-size", "16", "--tuning-size", "16", "--no-openvino", *extra]])
    report = json.loads((tmp / "build" / "report.json").read_text())
    assert rc == 0, report["variants"]["fp32"]["parity"]["reason"]
    return ck, tmp / "repo", report


def _torch(ck: Path, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ck)
    model = AutoModelForSequenceClassification.from_pretrained(ck).eval()
    seconds = pairs or [None] * len(texts)
    with torch.inference_mode():
        return np.concatenate([model(**tok([t], None if p is None else [p], truncation=True, max_length=MAX_LENGTH,
                                           return_tensors="pt")).logits.numpy() for t, p in zip(texts, seconds)])


def _long_text(chars: int = 500) -> str:
    from checkpoint_factory import corpus

    words = " ".join(corpus(12, seed=9))
    return (words * (chars // len(words) + 1))[:chars]  # far over MAX_LENGTH tokens


@pytest.mark.server
def test_multi_label_left_truncation_built_gated_and_served(tmp_path, arch_checkpoint, reuse_exports):
    """A multi-label checkpoint whose tokenizer truncates on the left: the build gates it (with rows over
    max_length), the served PROBABILITIES are sigmoids, LABEL the JSON set >= 0.5, and the served logits of
    a long text equal PyTorch's (the served tokenizer truncates on the left too)."""
    from serving.client import TextClassifier
    from serving.server import LocalTritonServer, ServerConfig

    ck, repo, report = _build(tmp_path, arch_checkpoint, Head.MULTI_LABEL, num_labels=4, labels=LABELS,
                              problem_type="multi_label_classification", truncation_side="left")
    fp32 = report["variants"]["fp32"]["parity"]
    assert fp32["head"] == Head.MULTI_LABEL.value and fp32["passed"]
    from exporter.build import LONG_ROWS

    read = int(next(w for w in report["warnings"] if w.startswith("only ")).split()[1])  # rows of test.csv
    assert report["reference"]["n_examples"] == read + LONG_ROWS  # rows joined to reach truncation
    from checkpoint_factory import corpus

    texts = corpus(20, seed=3) + [_long_text(), _long_text(100_000), " " * 50_000 + _long_text()]
    want = _torch(ck, texts)
    with LocalTritonServer(ServerConfig(repo, startup_timeout_s=120)) as srv:
        with TextClassifier(srv.http_url, timeout_s=60, return_logits=True) as client:
            served = client.served_model()
            preds = client.classify(texts)
    assert served.head is Head.MULTI_LABEL and served.threshold == 0.5
    got = np.array([p.logits for p in preds])
    np.testing.assert_allclose(got, want, atol=1e-4)
    sig = 1 / (1 + np.exp(-want))
    for pred, row in zip(preds, sig):
        assert pred.labels == tuple(LABELS[j] for j in np.flatnonzero(row >= 0.5))
        np.testing.assert_allclose([pred.probabilities[x] for x in LABELS], row, atol=1e-4)
    # right truncation would have served other logits on the long text: the check can fail
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ck)
    assert tok.truncation_side == "left"
    right = tok([texts[-1]], truncation=True, max_length=MAX_LENGTH)["input_ids"][0]
    tok.truncation_side = "right"
    assert right != tok([texts[-1]], truncation=True, max_length=MAX_LENGTH)["input_ids"][0]


@pytest.mark.server
def test_regression_built_gated_and_served(tmp_path, arch_checkpoint, reuse_exports):
    from serving.client import TextClassifier
    from serving.server import LocalTritonServer, ServerConfig

    ck, repo, report = _build(tmp_path, arch_checkpoint, Head.REGRESSION, num_labels=1, problem_type="regression")
    fp32 = report["variants"]["fp32"]["parity"]
    assert fp32["head"] == Head.REGRESSION.value and fp32["passed"] and fp32["mae"] is not None
    assert report["reference"]["accuracy"] is None and report["reference"]["mae"] is not None
    from checkpoint_factory import corpus

    texts = corpus(20, seed=4) + [_long_text(), _long_text(20_000), "w" * 50_000]
    want = _torch(ck, texts)[:, 0]
    with LocalTritonServer(ServerConfig(repo, startup_timeout_s=120)) as srv:
        with TextClassifier(srv.http_url, timeout_s=60, return_logits=True) as client:
            scores = client.score(texts)
            assert client.served_model().head is Head.REGRESSION
    np.testing.assert_allclose(scores, want, atol=1e-4)


@pytest.mark.server
def test_text_pairs_built_gated_and_served(tmp_path, arch_checkpoint, reuse_exports, capsys):
    """--text-pair-column: the served model takes TEXT_PAIR, encodes pairs as the checkpoint's tokenizer does
    (token_type_ids of the second text: BERT), and the client and `serving classify --pair` send pairs."""
    from checkpoint_factory import corpus

    from serving.cli import main
    from serving.client import TextClassifier
    from serving.contract import TEXT_PAIR
    from serving.server import LocalTritonServer, ServerConfig

    ck, repo, report = _build(tmp_path, arch_checkpoint, Head.SINGLE_LABEL, pairs=True, labels=("no", "yes"))
    assert report["variants"]["fp32"]["parity"]["passed"]
    texts, pairs = corpus(10, seed=7) + [_long_text(), _long_text(3_000)], corpus(11, seed=8) + [_long_text(2_500)]
    want = _torch(ck, texts, pairs)
    assert np.abs(want - _torch(ck, texts)).max() > 1e-3  # the pair changes the answer: the check can fail
    with LocalTritonServer(ServerConfig(repo, startup_timeout_s=120)) as srv:
        with TextClassifier(srv.http_url, timeout_s=60, return_logits=True) as client:
            assert client.served_model().text_pair and TEXT_PAIR in [t.name for t in client.served_model().inputs]
            got = np.array([p.logits for p in client.classify(texts, pairs)])
        capsys.readouterr()  # the build's report
        assert main(["classify", "--url", srv.http_url, "--json", texts[0], texts[1],
                     "--pair", pairs[0], "--pair", pairs[1]]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert main(["classify", "--url", srv.http_url, texts[0], "--pair", pairs[0], "--pair", pairs[1]]) == 2
    np.testing.assert_allclose(got, want, atol=1e-4)
    probs = np.exp(want[:2]) / np.exp(want[:2]).sum(1, keepdims=True)
    assert [r["label"] for r in rows] == [("no", "yes")[int(j)] for j in probs.argmax(1)]


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.parametrize("case", ["multi_label_left_truncation", "regression", "text_pairs"])
def test_gpu_target_serves_every_head_as_pytorch(tmp_path, arch_checkpoint, case):
    """The GPU target's batched model (ONNX Runtime's CPU provider here) serves the same build's ONNX with the
    contract of every head: multi-label (left truncation), regression, text pairs; logits equal PyTorch's."""
    from checkpoint_factory import corpus
    from transformers import AutoConfig

    from serving.client import TextClassifier
    from serving.repository import RepositoryConfig, Target, read_repository, write_repository
    from serving.server import LocalTritonServer, ServerConfig

    options = {"multi_label_left_truncation": dict(num_labels=4, labels=LABELS, truncation_side="left",
                                                   problem_type="multi_label_classification"),
               "regression": dict(num_labels=1, problem_type="regression"),
               "text_pairs": dict(labels=("no", "yes"))}[case]
    head = {"multi_label_left_truncation": Head.MULTI_LABEL, "regression": Head.REGRESSION}.get(case, Head.SINGLE_LABEL)
    ck, cpu_repo, _ = _build(tmp_path, arch_checkpoint, head, pairs=case == "text_pairs", **options)
    built = read_repository(cpu_repo).model()
    gpu = write_repository(tmp_path / "gpu", onnx_model=built.onnx_path, tokenizer_dir=built.tokenizer_dir,
                           id2label=AutoConfig.from_pretrained(ck).id2label, model=built.contract,
                           config=RepositoryConfig(target=Target.GPU, max_length=MAX_LENGTH, max_batch_tokens=256))
    texts = corpus(20, seed=3) + [_long_text()]
    pairs = corpus(21, seed=8) if case == "text_pairs" else None
    want = _torch(ck, texts, pairs)
    with LocalTritonServer(ServerConfig(gpu, startup_timeout_s=120)) as srv:
        with TextClassifier(srv.http_url, timeout_s=60, return_logits=True) as client:
            assert client.served_model() == built.contract
            if head is Head.REGRESSION:
                got = np.array(client.score(texts))[:, None]
            else:
                got = np.array([p.logits for p in client.classify(texts, pairs)])
    np.testing.assert_allclose(got, want, atol=1e-4)


# ------------------------------------------------------------------------------------ --long-text chunk


def _chunk_reference(ck: Path, texts: list[str], pairs: list[str] | None, overlap: int, max_chunks: int):
    """(averaged window logits, windows per text): the chunked definition run by PyTorch (exporter/chunking.py)."""
    from transformers import AutoTokenizer

    from exporter.chunking import ChunkConfig, average_rows, window_batches

    windows, counts = window_batches(AutoTokenizer.from_pretrained(ck), texts, pairs, MAX_LENGTH,
                                     ChunkConfig(overlap, max_chunks))
    return average_rows(parity.torch_logits(parity.load_torch_model(ck), windows), counts), counts


def _served_chunked(url: str, model: ServedModel, texts: list[str], pairs: list[str] | None = None):
    import tritonclient.http as http

    from serving.contract import LOGITS, SCORE, WINDOWS, infer_inputs, requested_outputs

    names = [SCORE if model.head is Head.REGRESSION else LOGITS, WINDOWS]
    with http.InferenceServerClient(url, network_timeout=120) as client:
        res = client.infer(model.name, infer_inputs(http, texts, pairs), outputs=requested_outputs(http, names))
    return res.as_numpy(names[0]).reshape(len(texts), -1), res.as_numpy(WINDOWS).reshape(-1)


def _chunk_texts(seed: int) -> list[str]:
    """Texts of 0 to ~300 words: one window up to more than --max-chunks."""
    from checkpoint_factory import corpus

    words = " ".join(corpus(120, seed=seed)).split()
    return [" ".join(words[:k]) for k in (0, 4, 12, 20, 30, 45, 300)]


@pytest.mark.server
@pytest.mark.parametrize("head", [
    pytest.param("pairs", id="single-label-text-pairs"),
    pytest.param("multi_left", id="multi-label-left-truncation", marks=pytest.mark.slow),
    pytest.param("regression", id="regression", marks=pytest.mark.slow)])
def test_chunked_build_is_gated_and_served_as_the_reference_definition(tmp_path, arch_checkpoint, reuse_exports, head):
    """--long-text chunk: the build gates the chunked answers (long rows of several windows), the served
    logits/scores equal PyTorch's average over the reference windows, WINDOWS counts them (capped at
    --max-chunks), and a text's answer is the same alone and among other texts (batch neighbours)."""
    from serving.server import LocalTritonServer, ServerConfig

    options = {"pairs": dict(labels=("no", "yes")),
               "multi_left": dict(num_labels=4, labels=LABELS, problem_type="multi_label_classification",
                                  truncation_side="left"),
               "regression": dict(num_labels=1, problem_type="regression")}[head]
    kind = {"pairs": Head.SINGLE_LABEL, "multi_left": Head.MULTI_LABEL, "regression": Head.REGRESSION}[head]
    overlap, max_chunks = 6, 4
    ck, repo, report = _build(tmp_path, arch_checkpoint, kind, pairs=head == "pairs", **options,
                              extra=["--long-text", "chunk", "--chunk-overlap", overlap, "--max-chunks", max_chunks])
    assert report["variants"]["fp32"]["parity"]["passed"]
    texts = _chunk_texts(seed=12)
    pairs = _chunk_texts(seed=13) if head == "pairs" else None
    want, counts = _chunk_reference(ck, texts, pairs, overlap, max_chunks)
    assert max(counts) == max_chunks and min(counts) == 1 and len(set(counts)) >= 3  # the check can fail
    with LocalTritonServer(ServerConfig(repo, startup_timeout_s=120)) as srv:
        with __import__("serving.client", fromlist=["TextClassifier"]).TextClassifier(srv.http_url) as client:
            served = client.served_model()
        got, windows = _served_chunked(srv.http_url, served, texts, pairs)
        alone = [_served_chunked(srv.http_url, served, [t], None if pairs is None else [pairs[i]])[0][0]
                 for i, t in enumerate(texts)]
    assert served.chunked
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert windows.tolist() == counts
    np.testing.assert_allclose(np.array(alone), got, atol=1e-6)  # independent of batch neighbours
    truncated = _torch(ck, texts, pairs)  # the truncating answer differs on multi-window rows
    assert np.abs(truncated - want)[np.array(counts) > 1].max() > 1e-3
