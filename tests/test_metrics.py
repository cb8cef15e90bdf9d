"""Warm start and model metrics on a real tritonserver (CPU target): every task's first request after ready,
the textclf_* metrics against what was served, the build baseline's gauges, and the dashboard and alert
rules against the metrics the server really exports.

One server (module scope) serves a classifier (with a build baseline), a multi-label model, a text-pair
model and an embedder; the first-request costs are measured in the fixture, right after ready.
"""
from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from serving_helpers import corpus_texts

from loadtest.warmstart import first_request_costs
from serving.client import TextClassifier
from serving.contract import Head, ServedModel
from serving.repository import RepositoryConfig, add_model, read_repository, write_repository
from serving.server import LocalTritonServer, ServerConfig

pytestmark = pytest.mark.server

LABELS = ("negative", "neutral", "positive")
BASELINE = {"label_share": {"negative": 0.5, "neutral": 0.3, "positive": 0.2}, "confidence_mean": 0.71, "rows": 10}
MODELS = ("classifier", "tags", "pairs", "embedder")


def _export_tiny_embedder(model_dir: Path, out: Path) -> Path:
    """The tiny sentence-transformers model as an ``embedding`` graph (mean pooling, L2-normalised)."""
    import torch
    from transformers import BertModel

    bert = BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=1)

    names = ["input_ids", "attention_mask", "token_type_ids"]
    dummy = torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        torch.onnx.export(Embed(), (dummy, dummy, torch.zeros_like(dummy)), str(out), input_names=names,
                          output_names=["embedding"], opset_version=17, dynamo=False,
                          dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "embedding": {0: "batch"}})
    return out


@pytest.fixture(scope="module")
def repository(tiny_onnx, tiny_checkpoint, tmp_path_factory) -> Path:
    from embedding_helpers import build_tiny_sentence_transformer

    root = tmp_path_factory.mktemp("metrics")
    config = RepositoryConfig(max_batch_size=16, encoder_instances=1, extra={"baseline": json.dumps(BASELINE)})
    repo = write_repository(root / "repo", onnx_model=tiny_onnx, tokenizer_dir=tiny_checkpoint,
                            id2label=dict(enumerate(LABELS)), config=config)
    plain = RepositoryConfig(max_batch_size=16, encoder_instances=1)
    add_model(repo, onnx_model=tiny_onnx, tokenizer_dir=tiny_checkpoint, config=plain,
              model=ServedModel(name="tags", head=Head.MULTI_LABEL, labels=LABELS, threshold=0.3))
    add_model(repo, onnx_model=tiny_onnx, tokenizer_dir=tiny_checkpoint, config=plain,
              model=ServedModel(name="pairs", labels=LABELS, text_pair=True))
    st = build_tiny_sentence_transformer(root / "st")
    add_model(repo, onnx_model=_export_tiny_embedder(st, root / "embedder.onnx"), tokenizer_dir=st, config=plain,
              model=ServedModel(name="embedder", head=Head.EMBEDDING, embedding_dim=32))
    return repo


@pytest.fixture(scope="module")
def served(repository):
    """(server, first-request costs measured right after ready, before any other request)."""
    models = {n: m.contract for n, m in read_repository(repository).models.items()}
    assert sorted(models) == sorted(MODELS)
    with LocalTritonServer(ServerConfig(repository, startup_timeout_s=180)) as srv:
        costs = first_request_costs(srv.http_url, models, steady=20)
        yield srv, costs


@pytest.fixture(scope="module")
def server(served):
    return served[0]


def _metrics_text(server) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        return resp.read().decode()


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(server) -> dict[tuple[str, frozenset], float]:
    """Every sample of the server's /metrics, named exactly as the server writes it (what Prometheus stores
    and PromQL selects): (name, labels) -> value. (prometheus_client's parser renames counter samples to
    ``<family>_total``, which Prometheus does not.)"""
    out = {}
    for line in _metrics_text(server).splitlines():
        match = _SAMPLE.match(line)
        if match:
            name, labels, number = match.groups()
            out[(name, frozenset(_LABEL.findall(labels or "")))] = float(number)
    return out


def settled(server, until=None, timeout_s: float = 30.0) -> dict[tuple[str, frozenset], float]:
    """A scrape once the textclf_* series stopped moving and ``until(samples)`` holds: the models send their
    metrics from a thread every 0.5 s, so a scrape right after a request may not hold it yet (and a busy
    machine can delay a send past one quiet interval, hence the condition on what the test sent)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        samples = scrape(server)
        ours = {k: v for k, v in samples.items() if k[0].startswith("textclf_")}
        if (ours == last and (until is None or until(samples))) or time.monotonic() > deadline:
            return samples
        last = ours
        time.sleep(0.7)


def rows_counted(before, **rows_by_model):
    """An ``until`` for settled: every model's textclf_rows_total moved by at least the rows sent to it."""
    return lambda samples: all(delta(samples, before, "textclf_rows_total", model=model) >= rows
                               for model, rows in rows_by_model.items())


def value(samples, name: str, agg=sum, **labels) -> float:
    """``agg`` of the samples of ``name`` whose labels include ``labels``: sum, as PromQL's ``sum`` over the
    series of every stub (each instance has series of its own, labels ``version`` and ``stub``); ``max`` for a
    gauge every instance sets to the same value."""
    wanted = set(labels.items())
    found = [v for (n, have), v in samples.items() if n == name and wanted <= have]
    return agg(found) if found else 0.0


def delta(after, before, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


# ------------------------------------------------------------------------------------------ warm start


def test_first_request_after_ready_costs_at_most_3x_the_steady_median(served, repository):
    """Per model, the first request after ready costs <= 3x the median of the next 20. A cold start is
    systematic: it shows on every start. A neighbour's CPU burst on this shared machine (a few ms against a
    ~1 ms request) is not: a model over 3x is measured again on up to two more fresh starts and must pass
    on one of them. (Without model_warmup every model is 20-30x on every start: the test can fail.)"""
    _, costs = served
    assert sorted(c.model for c in costs) == sorted(MODELS)
    contracts = {n: m.contract for n, m in read_repository(repository).models.items()}
    tries = {c.model: [c] for c in costs}
    for _ in range(2):
        slow = [m for m, seen in tries.items() if min(c.ratio for c in seen) > 3.0]
        if not slow:
            break
        with LocalTritonServer(ServerConfig(repository, startup_timeout_s=180)) as again:
            for c in first_request_costs(again.http_url, [contracts[m] for m in slow], steady=20):
                tries[c.model].append(c)
    slow = {m: [c.to_json() for c in seen] for m, seen in tries.items() if min(c.ratio for c in seen) > 3.0}
    assert not slow, f"first request > 3x the median of the next 20 on every start: {slow}"


def test_warmup_is_in_every_served_config(repository):
    """Every served model carries model_warmup samples (short and max-length text, every input)."""
    for name, info in read_repository(repository).models.items():
        warm = info.config.model_warmup
        assert [w.name for w in warm] == ["short", "long"], name
        for w in warm:
            assert sorted(w.inputs) == sorted(t.name for t in info.contract.inputs)


# ------------------------------------------------------------------------------------------ metrics


def _tokens(checkpoint: Path, texts, pairs=None, max_length: int = 128) -> tuple[list[int], list[bool]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    full = [len(tok.encode(t).ids if pairs is None else tok.encode(t, pairs[i]).ids) for i, t in enumerate(texts)]
    return [min(n, max_length) for n in full], [n > max_length for n in full]


def test_classifier_metrics_count_what_was_served(server, tiny_checkpoint):
    texts = corpus_texts(23, seed=5) + ["word " * 400]  # the last one is truncated
    before = settled(server)
    with TextClassifier(server.http_url, timeout_s=60) as client:
        predictions = client.classify(texts)
    after = settled(server, rows_counted(before, classifier=len(texts)))
    tokens, truncated = _tokens(tiny_checkpoint, texts)
    m = "classifier"
    assert delta(after, before, "textclf_rows_total", model=m) == len(texts)
    for label in LABELS:
        served = sum(p.label == label for p in predictions)
        assert delta(after, before, "textclf_predictions_total", model=m, label=label) == served, label
    assert delta(after, before, "textclf_confidence_count", model=m) == len(texts)
    assert delta(after, before, "textclf_confidence_sum", model=m) == pytest.approx(
        sum(max(p.probabilities.values()) for p in predictions), rel=1e-4)
    assert delta(after, before, "textclf_input_tokens_total", model=m) == sum(tokens)
    assert delta(after, before, "textclf_computed_tokens_total", model=m) == sum(tokens)  # rows alone: no padding
    assert delta(after, before, "textclf_input_tokens_sum", model=m) == sum(tokens)
    assert delta(after, before, "textclf_input_tokens_bucket", model=m, le="16.0") == sum(n <= 16 for n in tokens)
    assert delta(after, before, "textclf_truncated_rows_total", model=m) == sum(truncated) == 1
    assert delta(after, before, "textclf_windows_total", model=m) == len(texts)


def test_multi_label_counts_every_label_given_and_a_failed_request_counts_nothing(server):
    texts = corpus_texts(12, seed=6)
    before = settled(server)
    with TextClassifier(server.http_url, model="tags", timeout_s=60) as client:
        predictions = client.classify(texts)
    bad = {"inputs": [{"name": "TEXT", "shape": [2, 1], "datatype": "BYTES", "data": ["fine", "\udcff"]}]}
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/tags/infer",
                                     data=json.dumps(bad, ensure_ascii=False).encode("utf-8", "surrogatepass"),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(request, timeout=30)
    assert failed.value.code == 400
    after = settled(server, rows_counted(before, tags=len(texts)))
    given = [set(p.labels) for p in predictions]
    assert sum(len(g) for g in given) > len(texts)  # threshold 0.3 on 3 labels: some rows get several
    for label in LABELS:
        assert delta(after, before, "textclf_predictions_total", model="tags", label=label) == sum(
            label in g for g in given), label
    assert delta(after, before, "textclf_rows_total", model="tags") == len(texts)  # not the failed request's


def test_pair_and_embedder_metrics(server, tiny_checkpoint):
    from serving.client import Embedder

    texts, pairs = corpus_texts(5, seed=8), corpus_texts(5, seed=9)
    before = settled(server)
    with TextClassifier(server.http_url, model="pairs", timeout_s=60) as client:
        client.classify(texts, pairs)
    with Embedder(server.http_url, model="embedder", timeout_s=60) as client:
        vectors = client.embed(texts)
    after = settled(server, rows_counted(before, pairs=5, embedder=5))
    assert vectors.shape == (5, 32)
    assert delta(after, before, "textclf_input_tokens_total", model="pairs") == sum(
        _tokens(tiny_checkpoint, texts, pairs)[0])
    assert delta(after, before, "textclf_rows_total", model="embedder") == 5
    assert delta(after, before, "textclf_input_tokens_total", model="embedder") == sum(
        _tokens(tiny_checkpoint, texts)[0])
    assert not any(name.startswith("textclf_confidence") and ("model", "embedder") in labels
                   for name, labels in after)  # an embedder has no confidence


def test_baseline_gauges_carry_the_build_baseline(server):
    samples = scrape(server)
    for label, share in BASELINE["label_share"].items():
        assert value(samples, "textclf_baseline_label_share", max, model="classifier", label=label) == \
            pytest.approx(share)
    assert value(samples, "textclf_baseline_confidence_mean", max, model="classifier") == pytest.approx(0.71)
    assert not any(name == "textclf_baseline_confidence_mean" and ("model", "tags") in labels
                   for name, labels in samples)  # no baseline given


def test_every_series_belongs_to_one_stub(server):
    """Each instance's series carry the version it serves and its stub's pid, so no two instances share one
    (Triton 2.51 frees a shared series when the first of its instances unloads: docs/RELIABILITY.md)."""
    from serving.supervisor import instance_model, stub_processes

    stubs = {instance_model(name): str(proc.pid) for name, proc in stub_processes(server.process.pid).items()}
    ours = [dict(labels) for name, labels in scrape(server) if name.startswith("textclf_")]
    assert sorted(stubs) == sorted(MODELS) and ours
    assert all(labels["version"] == "1" and labels["stub"] == stubs[labels["model"]] for labels in ours), ours[:3]


# --------------------------------------------------------------------------------- dashboard and rules


def _selectors(expr) -> set[str]:
    """Metric names an expression selects (promql_parser's tree)."""
    import promql_parser as pp

    if isinstance(expr, pp.VectorSelector):
        return {expr.name}
    if isinstance(expr, pp.MatrixSelector):
        return _selectors(expr.vector_selector)
    if isinstance(expr, pp.BinaryExpr):
        return _selectors(expr.lhs) | _selectors(expr.rhs)
    if isinstance(expr, pp.Call):
        return set().union(*(_selectors(a) for a in expr.args))
    if isinstance(expr, (pp.AggregateExpr, pp.ParenExpr, pp.UnaryExpr, pp.SubqueryExpr)):
        return _selectors(expr.expr)
    return set()


def test_dashboard_and_rules_name_only_metrics_the_server_exports(server):
    import promql_parser

    from serving.manifests.monitoring import RECORDS, expressions

    with TextClassifier(server.http_url, timeout_s=60) as client:
        client.classify(corpus_texts(4, seed=3))
    exported = {name for name, _ in settled(server)}
    named = set()
    for expr in expressions():
        named |= _selectors(promql_parser.parse(expr.replace("$model", ".*")))
    assert {"nv_inference_request_summary_us", "textclf_baseline_label_share", "textclf_confidence_sum",
            "textclf_input_tokens_bucket", "textclf_windows_total"} <= named  # the walk finds nested selectors
    missing = sorted(named - exported - set(RECORDS))
    assert not missing, f"named by the dashboard or rules but not exported: {missing}"
