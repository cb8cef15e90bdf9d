"""Issue 19 tasks end to end: a sentence-transformers CrossEncoder built as a reranker (saved activation and
max_length), and a second classifier under --model-name, into one repository beside a classifier; one real
tritonserver (and the gateway) serves them all; clients, CLIs and `serving models` address them by name."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import build_tiny_checkpoint, reused_exports
from serving.contract import DEFAULT_CLASSIFIER, DEFAULT_RERANKER, LOGITS, SCORE, Activation, Head, rank
from serving.repository import RepositoryConfig, read_repository, write_repository
from serving_helpers import corpus_texts, torch_reference

LABELS = ["negative", "neutral", "positive"]
SAVED_MAX_LENGTH = 96  # the CrossEncoder's max_length (the build's default would be 128)
N_EVAL = 24
SECOND = "sentiment_b"


def build_tiny_cross_encoder(out: Path, *, seed: int = 3) -> Path:
    """A random-init 1-output BERT saved by sentence-transformers as a CrossEncoder with a Sigmoid activation."""
    import torch
    from sentence_transformers import CrossEncoder

    base = build_tiny_checkpoint(out.parent / "ce-base", seed=seed, num_labels=1)
    model = CrossEncoder(str(base), num_labels=1, max_length=SAVED_MAX_LENGTH, activation_fn=torch.nn.Sigmoid(),
                         local_files_only=True)
    model.save(str(out))
    return out


def _pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    texts = corpus_texts(2 * n + 12, seed=seed)
    queries, docs = texts[:n], texts[n:2 * n]
    long_doc = " ".join(texts[2 * n:])  # past the saved max_length: truncation is gated and served
    return queries + [queries[0]], docs + [long_doc]


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("ce") / "model")


@pytest.fixture(scope="module")
def built(cross_encoder, tiny_checkpoint, tiny_onnx, tmp_path_factory, export_cache) -> dict:
    """classifier (written directly) + sentiment_b (exporter build --model-name) + reranker (exporter build)."""
    from exporter.cli import main

    root = tmp_path_factory.mktemp("tasks")
    repo = write_repository(root / "repo", onnx_model=tiny_onnx, tokenizer_dir=tiny_checkpoint,
                            id2label=dict(enumerate(LABELS)),
                            config=RepositoryConfig(max_batch_size=16, encoder_instances=1))
    queries, docs = _pairs(N_EVAL, 11)
    pairs_csv = root / "pairs.csv"
    with open(pairs_csv, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([["query", "document", "label"]] + [[q, d, "0.5"] for q, d in zip(queries, docs)])
    texts_csv = root / "texts.csv"
    with open(texts_csv, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([["text", "label"]] + [[t, LABELS[i % 3]] for i, t in
                                                        enumerate(corpus_texts(N_EVAL, seed=5))])
    common = ["--precisions", "fp32", "--no-openvino", "--eval-size", str(N_EVAL), "--repository", str(repo),
              "--instances", "1", "--speed-seconds", "0.2"]
    with reused_exports(export_cache):  # the tiny classifier's export: tests/test_exporter.py's
        codes = {"reranker": main(["build", str(cross_encoder), "--eval-data", str(pairs_csv), "--text-column",
                                   "query", "--text-pair-column", "document", "--out", str(root / "b1"), *common]),
                 SECOND: main(["build", str(tiny_checkpoint), "--eval-data", str(texts_csv), "--model-name", SECOND,
                               "--out", str(root / "b2"), *common])}
    return {"codes": codes, "repo": repo, "root": root}


@pytest.fixture(scope="module")
def stack(built):
    from serving.gateway.config import GatewayConfig
    from serving.gateway.process import GatewayProcess
    from serving.server import LocalTritonServer, ServerConfig

    assert built["codes"] == {"reranker": 0, SECOND: 0}
    with LocalTritonServer(ServerConfig(built["repo"], startup_timeout_s=180)) as server:
        with GatewayProcess(GatewayConfig(repository=built["repo"], triton_url=server.grpc_url, port=0)) as gateway:
            yield server, gateway


def test_the_repository_holds_two_classifiers_and_the_reranker_as_saved(built):
    info = read_repository(built["repo"])
    assert set(info.models) == {DEFAULT_CLASSIFIER, SECOND, DEFAULT_RERANKER}
    reranker = info.models[DEFAULT_RERANKER].contract
    assert reranker.head is Head.REGRESSION and reranker.text_pair and reranker.activation is Activation.SIGMOID
    assert [t.name for t in reranker.outputs] == [SCORE, LOGITS] and reranker.default_outputs == (SCORE,)
    params = info.models[DEFAULT_RERANKER].config.parameters
    assert int(params["max_length"].string_value) == SAVED_MAX_LENGTH  # the CrossEncoder's, not 128
    assert info.models[SECOND].contract.labels == tuple(LABELS)
    assert info.models[DEFAULT_CLASSIFIER].contract.activation is Activation.NONE  # other contracts unchanged
    assert "activation" not in info.models[DEFAULT_CLASSIFIER].config.parameters["contract"].string_value


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_score_equals_cross_encoder_predict(stack, cross_encoder, protocol):
    from sentence_transformers import CrossEncoder

    from serving.client import Reranker

    queries, docs = _pairs(12, 29)
    expected = CrossEncoder(str(cross_encoder), local_files_only=True).predict(list(zip(queries, docs)))
    assert np.ptp(expected) > 1e-3  # the activation is not saturated: a raw logit would be far off
    url = stack[0].http_url if protocol == "http" else stack[0].grpc_url.split("://")[-1]
    with Reranker(url, protocol=protocol) as client:
        served = np.array([client.rerank(q, [d])[0].score for q, d in zip(queries, docs)])
        ranked = client.rerank(queries[0], docs, top_k=5)
    np.testing.assert_allclose(served, expected, atol=2e-5)
    query_scores = CrossEncoder(str(cross_encoder), local_files_only=True).predict([(queries[0], d) for d in docs])
    assert [r.index for r in ranked] == [r.index for r in rank(list(query_scores), 5)]


def test_rank_orders_as_text_embeddings_inference():
    assert [(r.index, r.score) for r in rank([0.2, 0.9, 0.2, 0.5])] == [(1, 0.9), (3, 0.5), (0, 0.2), (2, 0.2)]
    assert [r.index for r in rank([0.2, 0.9, 0.5], top_k=2)] == [1, 2]
    with pytest.raises(ValueError):
        rank([0.1], top_k=0)


def test_gateway_rerank_uses_the_saved_activation(stack, cross_encoder):
    import httpx
    from sentence_transformers import CrossEncoder

    queries, docs = _pairs(6, 31)
    model = CrossEncoder(str(cross_encoder), local_files_only=True)
    expected = model.predict([(queries[0], d) for d in docs])
    logits = model.predict([(queries[0], d) for d in docs], activation_fn=__import__("torch").nn.Identity())
    with httpx.Client(base_url=stack[1].url, timeout=60) as http:
        got = http.post("/rerank", json={"query": queries[0], "texts": docs}).json()
        raw = http.post("/rerank", json={"query": queries[0], "texts": docs, "raw_scores": True}).json()
    assert [g["index"] for g in got] == [r.index for r in rank(list(expected))]
    np.testing.assert_allclose([g["score"] for g in got], np.sort(expected)[::-1], atol=2e-5)
    np.testing.assert_allclose([r["score"] for r in raw], np.sort(logits)[::-1], atol=1e-4)


def test_second_classifier_by_name_equals_pytorch(stack, tiny_checkpoint):
    from serving.client import TextClassifier

    texts = corpus_texts(10, seed=41)
    _, labels = torch_reference(tiny_checkpoint, texts)
    with TextClassifier(stack[0].http_url, model=SECOND) as client:
        assert [p.label for p in client.classify(texts)] == labels


def test_cli_rerank_and_models(stack, built, capsys):
    from serving.cli import main

    queries, docs = _pairs(4, 37)
    assert main(["rerank", queries[0], *docs, "--url", stack[0].http_url, "--top-k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 2 and out[0]["score"] >= out[1]["score"] and out[0]["text"] == docs[out[0]["index"]]
    assert main(["models", "--repository", str(built["repo"]), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {n: r["task"] for n, r in rows.items()} == {DEFAULT_CLASSIFIER: "classification",
                                                       SECOND: "classification", DEFAULT_RERANKER: "reranking"}
    assert rows[SECOND]["labels"] == LABELS and rows[DEFAULT_RERANKER]["version"] == "1"


def test_cross_encoder_without_a_pair_column_is_one_clear_line(cross_encoder, tmp_path, capsys):
    from exporter.cli import main

    data = tmp_path / "t.csv"
    data.write_text("text,label\na,0.5\n", encoding="utf-8")
    assert main(["build", str(cross_encoder), "--eval-data", str(data), "--out", str(tmp_path / "b"),
                 "--no-repository"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--text-pair-column" in err[0]


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_locust_picks_the_rerank_users_for_a_reranker(stack, built, scheme, tmp_path):
    import subprocess
    import sys

    from loadtest.report import read_locust_stats
    from loadtest.run import LOCUSTFILE, _child_env

    server = stack[0]
    host = f"http://{server.http_url}" if scheme == "http" else f"grpc://{server.grpc_url}"
    texts = tmp_path / "texts.csv"
    with open(texts, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([["text"]] + [[t] for t in corpus_texts(30, seed=43)])
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "2", "-r", "2", "-t", "3s",
           "--host", host, "--texts", str(texts), "--texts-per-request", "4", "--model-name", DEFAULT_RERANKER,
           "--csv", str(tmp_path / "l"), "--json-file", str(tmp_path / "l")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), timeout=120)
    assert out.returncode == 0, (out.stdout + out.stderr)[-1500:]
    wanted = "TritonRerankHttpUser" if scheme == "http" else "TritonRerankGrpcUser"
    assert f"running {wanted}" in out.stderr + out.stdout
    total = read_locust_stats(tmp_path / "l.json")["total"]  # Locust's final stats (its CSV lags the end)
    assert total["requests"] > 0 and total["failures"] == 0


def test_reranker_client_refuses_bad_arguments_before_any_request():
    from serving.client import Reranker
    from serving.errors import ClientError

    client = Reranker("127.0.0.1:9")  # nothing listens: a request would be a connection error instead
    for args in ((["q1", "q2"], ["d"]), ("q", ["d", 3]), ("q", ["d"], 0)):
        with pytest.raises(ClientError):
            client.rerank(*args)
    assert client.rerank("q", []) == []


def test_gpu_target_reranker_config_carries_score_and_logits(built, tmp_path):
    """The GPU target's one python model runs the same head_outputs: its config carries SCORE and LOGITS for a
    reranker, and the contract keeps the saved activation (validated offline here)."""
    from serving.repository import validate_repository

    info = read_repository(built["repo"]).models[DEFAULT_RERANKER]
    repo = write_repository(tmp_path / "gpu", onnx_model=info.onnx_path, tokenizer_dir=info.tokenizer_dir,
                            id2label={0: "negative"}, model=info.contract,
                            config=RepositoryConfig(target="gpu", max_length=SAVED_MAX_LENGTH))
    assert DEFAULT_RERANKER in validate_repository(repo, "gpu")
    gpu = read_repository(repo).models[DEFAULT_RERANKER]
    assert {o.name for o in gpu.config.output} == {SCORE, LOGITS}
    assert gpu.contract.activation is Activation.SIGMOID
