"""Sentence embeddings end to end: a tiny sentence-transformers-style model -> `exporter build --task embedding`
into a repository that already serves a tiny classifier -> one real tritonserver serves both."""
from __future__ import annotations

import asyncio
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from embedding_helpers import build_tiny_sentence_transformer
from serving.contract import DEFAULT_CLASSIFIER, DEFAULT_EMBEDDER, Head, ServedModel
from serving.errors import RepositoryError
from serving.integrity import IntegrityError, verify_repository
from serving.repository import (RepositoryConfig, Target, add_model, read_repository, validate_repository,
                                write_repository)
from serving.server import LocalTritonServer, ServerConfig
from serving_helpers import corpus_texts, torch_reference

LABELS = ["negative", "neutral", "positive"]
N_EVAL = 40
CHUNKED, CHUNK_OVERLAP, MAX_CHUNKS = "chunked", 6, 4  # a --long-text chunk embedder served beside the others


@pytest.fixture(scope="module")
def st_model(tmp_path_factory) -> Path:
    return build_tiny_sentence_transformer(tmp_path_factory.mktemp("st") / "model")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus_texts(N_EVAL + 40, seed=7)


@pytest.fixture(scope="module")
def eval_csv(texts, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "test.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows([t, "x"] for t in texts)
    return path


@pytest.fixture(scope="module")
def built(st_model, eval_csv, tiny_onnx, tiny_checkpoint, tmp_path_factory) -> dict:
    """The classifier repository, then `python -m exporter build --task embedding` adding the embedder."""
    from exporter.cli import main

    root = tmp_path_factory.mktemp("both")
    repo = write_repository(root / "repo", onnx_model=tiny_onnx, tokenizer_dir=tiny_checkpoint,
                            id2label=dict(enumerate(LABELS)),
                            config=RepositoryConfig(max_batch_size=16, encoder_instances=1))
    classifier_files = {k: v for k, v in json.loads((repo / "provenance.json").read_text())["files"].items()}
    code = main(["build", str(st_model), "--task", "embedding", "--eval-data", str(eval_csv), "--out",
                 str(root / "build"), "--repository", str(repo), "--precisions", "fp32",
                 "--no-openvino", "--eval-size", str(N_EVAL)])
    files = {k: v for k, v in json.loads((repo / "provenance.json").read_text())["files"].items()}
    chunked = main(["build", str(st_model), "--task", "embedding", "--eval-data", str(eval_csv), "--out",
                    str(root / "build-chunked"), "--repository", str(repo), "--precisions", "fp32",
                    "--no-openvino", "--eval-size", str(N_EVAL), "--model-name", CHUNKED, "--long-text", "chunk",
                    "--chunk-overlap", str(CHUNK_OVERLAP), "--max-chunks", str(MAX_CHUNKS)])
    return {"code": code, "repo": repo, "out": root / "build", "classifier_files": classifier_files,
            "chunked_code": chunked, "chunked_out": root / "build-chunked", "files_before_chunked": files}


@pytest.fixture(scope="module")
def server(built):
    assert built["code"] == 0 and built["chunked_code"] == 0
    with LocalTritonServer(ServerConfig(built["repo"], startup_timeout_s=180)) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(st_model, texts) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(st_model), device="cpu")
    return np.asarray(model.encode(texts, batch_size=32, convert_to_numpy=True), dtype=np.float32)


# ----------------------------------------------------------------------------------------- build


def test_build_adds_the_embedder_beside_the_classifier(built):
    from exporter.artifacts import read_embedding_report

    info = read_repository(built["repo"])
    assert sorted(info.models) == [CHUNKED, DEFAULT_CLASSIFIER, DEFAULT_EMBEDDER]
    embedder = info.model(DEFAULT_EMBEDDER).contract
    assert (embedder.head, embedder.embedding_dim, embedder.chunked) == (Head.EMBEDDING, 32, False)
    assert validate_repository(built["repo"], Target.CPU) == [CHUNKED, DEFAULT_CLASSIFIER, DEFAULT_EMBEDDER]
    verify_repository(built["repo"])  # the provenance hashes cover every model
    files = info.provenance["files"]
    assert all(files[k] == v for k, v in built["classifier_files"].items())  # the classifier is untouched
    assert all(files[k] == v for k, v in built["files_before_chunked"].items())  # so is the first embedder
    served = info.provenance["served"]  # one record per served model, each with its versions
    assert set(served) == {CHUNKED, DEFAULT_CLASSIFIER, DEFAULT_EMBEDDER}
    assert served[DEFAULT_EMBEDDER]["version"] == 1 and set(served[DEFAULT_EMBEDDER]["versions"]) == {"1"}
    report = read_embedding_report(built["out"])
    assert report.selected == "fp32" and report.variants["fp32"].gate.min_cosine >= 0.99999
    assert report.repository == str(built["repo"].absolute())
    # the one pipeline's stages, timed as the classifier's are (exporter.pipeline)
    assert {"reference", "reference-speed", "export", "fp32-build", "fp32-speed", "fp32-parity",
            "repository"} <= set(report.stage_seconds)
    assert (built["out"] / "report.md").is_file() and (built["out"] / "report.png").is_file()


def test_adding_refuses_a_tampered_repository_and_another_target(built, tmp_path):
    repo = shutil.copytree(built["repo"], tmp_path / "repo")
    m = read_repository(repo).model(DEFAULT_EMBEDDER)
    sources = tmp_path / "sources"  # outside the repository: a rebuild replaces the version they came from
    shutil.copytree(m.tokenizer_dir, sources / "tokenizer")
    shutil.copy2(m.onnx_path, sources / "model.onnx")
    kwargs = dict(onnx_model=sources / "model.onnx", tokenizer_dir=sources / "tokenizer", model=m.contract)
    with pytest.raises(RepositoryError, match="target"):
        add_model(repo, config=RepositoryConfig(target=Target.GPU, max_length=64), **kwargs)
    named_like_the_classifier = dict(kwargs, model=ServedModel(name=DEFAULT_CLASSIFIER, head=Head.EMBEDDING,
                                                               embedding_dim=32))
    with pytest.raises(RepositoryError, match="already serves a single_label_classification model"):
        add_model(repo, config=RepositoryConfig(max_length=64), **named_like_the_classifier)
    add_model(repo, config=RepositoryConfig(max_length=64, encoder_instances=1), **kwargs)  # replaces itself
    assert sorted(read_repository(repo).models) == [CHUNKED, DEFAULT_CLASSIFIER, DEFAULT_EMBEDDER]
    verify_repository(repo)
    (repo / DEFAULT_CLASSIFIER / "1" / "model.py").write_text("# changed\n")
    with pytest.raises(IntegrityError):
        add_model(repo, config=RepositoryConfig(max_length=64), **kwargs)


def test_task_embedding_needs_eval_data(st_model, tmp_path, capsys):
    from exporter.cli import main

    assert main(["build", str(st_model), "--task", "embedding", "--out", str(tmp_path / "b")]) == 2
    assert "--eval-data" in capsys.readouterr().err


def test_chunked_embedder_options_are_checked_at_its_max_seq_length(st_model, eval_csv, tmp_path, capsys):
    """The tiny model's max_seq_length is 64 (windows of 62 tokens): an overlap over 31 is one line, before any
    export; the gpu target refuses --long-text chunk."""
    from exporter.cli import main

    base = ["build", str(st_model), "--task", "embedding", "--eval-data", str(eval_csv), "--out", str(tmp_path / "b"),
            "--repository", str(tmp_path / "r"), "--long-text", "chunk"]
    assert main(base + ["--chunk-overlap", "32"]) == 2
    assert "chunk-overlap 32 is over half a window (62 tokens at max-length 64)" in capsys.readouterr().err
    assert main(base + ["--target", "gpu"]) == 2
    assert "cpu target" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------- served


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_embedding_equals_sentence_transformers(server, texts, reference, protocol):
    from serving.client import Embedder

    url = server.http_url if protocol == "http" else server.grpc_url
    with Embedder(url, protocol=protocol) as client:
        got = client.embed(texts)
        assert client.dim == 32
    assert got.shape == reference.shape and got.dtype == np.float32
    assert np.abs(got - reference).max() < 1e-5


def test_a_long_text_is_embedded_as_sentence_transformers_truncates_it(server, st_model, texts):
    """Texts of 20,000 and 100,000 characters, a 50,000-character word, 50,000 spaces then words: served =
    sentence-transformers on the whole text (it truncates at max_seq_length; the model cuts before tokenizing)."""
    from sentence_transformers import SentenceTransformer

    from serving.client import Embedder

    words = " ".join(texts)
    long_texts = [(words * (n // len(words) + 1))[:n] for n in (20_000, 100_000)] + ["w" * 50_000,
                                                                                    " " * 50_000 + words]
    want = SentenceTransformer(str(st_model), device="cpu").encode(long_texts, convert_to_numpy=True)
    with Embedder(server.http_url, timeout_s=60) as client:
        got = client.embed(long_texts)
    assert np.abs(got - want).max() < 1e-5


def test_a_texts_embedding_does_not_depend_on_its_neighbours(server, texts):
    from serving.client import AsyncEmbedder, Embedder

    with Embedder(server.http_url) as client:
        alone = np.stack([client.embed(t)[0] for t in texts[:6]])
        among = client.embed(texts[:6] + texts[20:40])[:6]

    async def concurrent():
        async with AsyncEmbedder(server.grpc_url, protocol="grpc") as aclient:
            rows = await asyncio.gather(*(aclient.embed([t, *texts[30:38]]) for t in texts[:6]))
        return np.stack([r[0] for r in rows])

    assert np.abs(alone - among).max() <= 1e-6
    assert np.abs(alone - asyncio.run(concurrent())).max() <= 1e-6


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_load_generator_checks_an_embedders_vectors(server, texts, protocol):
    """loadtest's asyncio closed loop (bench, profile, peer comparison) drives an embedding model: every answer
    is decoded as vectors of the served dim (not refused for lacking LABEL)."""
    from loadtest.clients import closed_loop

    url = server.http_url if protocol == "http" else server.grpc_url
    res = closed_loop(protocol, url, texts, None, concurrency=2, texts_per_request=3, duration_s=0.5, warmup_s=0.0,
                      model=DEFAULT_EMBEDDER)
    assert res.failures == 0 and res.requests > 0 and res.rows == 3 * res.requests, res.first_error


def test_the_classifier_still_answers(server, texts, tiny_checkpoint):
    from serving.client import TextClassifier

    ref_probs, ref_labels = torch_reference(tiny_checkpoint, texts)
    with TextClassifier(server.http_url) as client:
        predictions = client.classify(texts)
    assert [p.label for p in predictions] == ref_labels
    probs = np.array([[p.probabilities[label] for label in LABELS] for p in predictions])
    assert np.abs(probs - ref_probs).max() < 1e-4


def test_cli_embed(server, capsys):
    from serving.cli import main

    assert main(["embed", "--url", server.grpc_url, "--protocol", "grpc", "--json", "good day", ""]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in rows] == ["good day", ""] and all(len(r["embedding"]) == 32 for r in rows)
    assert main(["embed", "--url", server.http_url, "a table row"]) == 0
    out = capsys.readouterr().out
    assert "a table row" in out and "32" in out
    assert main(["embed", "--url", server.http_url, "--model", DEFAULT_CLASSIFIER, "x"]) != 0


# ------------------------------------------------------------------------------------ --long-text chunk


def _chunk_texts(texts: list[str]) -> list[str]:
    """Texts of 0 to 300 words: one window (the empty text too) up to more than MAX_CHUNKS windows."""
    words = " ".join(texts).split()
    return [" ".join(words[:k]) for k in (0, 4, 12, 40, 60, 90, 300)]


def _chunked_reference(st_model: Path, texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """The definition, by sentence-transformers/PyTorch here: each text's reference windows (exporter.chunking)
    through the model's Transformer and Pooling modules (not its Normalize), averaged, then L2-normalised as its
    Normalize module does; and each text's window count."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from exporter.chunking import ChunkConfig, window_batches

    model = SentenceTransformer(str(st_model), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    windows, counts = window_batches(AutoTokenizer.from_pretrained(st_model), texts, None, 64,
                                     ChunkConfig(CHUNK_OVERLAP, MAX_CHUNKS))
    with torch.no_grad():
        pooled = [model[1](model[0]({k: torch.from_numpy(v) for k, v in w.items()}))["sentence_embedding"][0]
                  for w in windows]
    edges = np.cumsum([0, *counts])
    means = [torch.stack(pooled[a:b]).double().mean(0) for a, b in zip(edges[:-1], edges[1:])]
    return np.stack([torch.nn.functional.normalize(m, dim=0).numpy() for m in means]), counts


def _served_chunked(url: str, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    import tritonclient.http as http

    from serving.contract import EMBEDDING, WINDOWS, infer_inputs, requested_outputs

    with http.InferenceServerClient(url, network_timeout=120) as client:
        res = client.infer(CHUNKED, infer_inputs(http, texts), outputs=requested_outputs(http, [EMBEDDING, WINDOWS]))
    return res.as_numpy(EMBEDDING), res.as_numpy(WINDOWS).reshape(-1)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_chunked_embedder_serves_the_mean_of_its_windows_before_normalisation(server, built, st_model, texts):
    """--long-text chunk for an embedder: the build gates the definition on long texts; served = the mean of the
    windows' pooled vectors (PyTorch), then normalised; WINDOWS counts the windows (capped at --max-chunks); a
    text's vector is the same alone and among others; a truncating build answers multi-window texts otherwise."""
    from sentence_transformers import SentenceTransformer

    from exporter.artifacts import read_embedding_report
    from serving.client import Embedder

    report = read_embedding_report(built["chunked_out"])
    assert report.selected == "fp32" and report.variants["fp32"].gate.min_cosine >= 0.99999
    assert report.settings["long_text"] == "chunk" and report.settings["windows"] > report.n_texts > N_EVAL
    chunk_texts = _chunk_texts(texts)
    want, counts = _chunked_reference(st_model, chunk_texts)
    assert max(counts) == MAX_CHUNKS and min(counts) == 1 and len(set(counts)) >= 3  # the check can fail
    got, windows = _served_chunked(server.http_url, chunk_texts)
    alone = np.stack([_served_chunked(server.http_url, [t])[0][0] for t in chunk_texts])
    with Embedder(server.grpc_url, protocol="grpc", model=CHUNKED) as client:
        assert client.served_model().chunked
        among = client.embed(texts[:5] + chunk_texts + texts[5:10])[5:-5]
    assert _cosines(got, want).min() >= 0.99999 and np.abs(got - want).max() < 1e-5, np.abs(got - want).max()
    assert windows.tolist() == counts
    assert np.abs(alone - got).max() <= 1e-6 and np.abs(among - got).max() <= 1e-6
    truncated = SentenceTransformer(str(st_model), device="cpu").encode(chunk_texts, convert_to_numpy=True)
    multi = np.array(counts) > 1
    assert _cosines(truncated, want)[multi].max() < 0.9999 and _cosines(truncated, want)[~multi].min() >= 0.99999


# ------------------------------------------------------------------------------- load test and bench


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_locust_picks_the_embedding_users_for_an_embedding_model(server, eval_csv, scheme, tmp_path):
    import subprocess
    import sys

    from loadtest.report import read_locust_stats
    from loadtest.run import LOCUSTFILE, _child_env

    host = f"http://{server.http_url}" if scheme == "http" else f"grpc://{server.grpc_url}"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "2", "-r", "2", "-t", "3s",
           "--host", host, "--texts", str(eval_csv), "--texts-per-request", "3", "--model-name", DEFAULT_EMBEDDER,
           "--csv", str(tmp_path / "l"), "--json-file", str(tmp_path / "l")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), timeout=120)
    assert out.returncode == 0, (out.stdout + out.stderr)[-1500:]
    wanted = "TritonEmbedHttpUser" if scheme == "http" else "TritonEmbedGrpcUser"
    assert f"running {wanted}" in out.stderr + out.stdout
    total = read_locust_stats(tmp_path / "l.json")["total"]  # Locust's final stats (its CSV lags the end)
    assert total["requests"] > 0 and total["failures"] == 0


def test_bench_task_embedding(built, server, st_model, eval_csv, tmp_path):
    """encode, the ceiling, the served embedder and a peer (our gateway's OpenAI /v1/embeddings, started
    apart, as --peer-url measures infinity or any OpenAI-compatible server) side by side: every side at every
    shape in --rounds interleaved rounds."""
    from loadtest.bench import BenchConfig, run_bench
    from serving.gateway.config import GatewayConfig
    from serving.gateway.process import GatewayProcess

    with GatewayProcess(GatewayConfig(repository=built["repo"], triton_url=server.grpc_url, port=0,
                                      api_key=None)) as gateway:
        cfg = BenchConfig(checkpoint=st_model, build=built["out"], repository=built["repo"], texts=eval_csv,
                          n_texts=40, threads=1, batch_size=8, concurrency=(2,), texts_per_request=4,
                          single_text_concurrency=2, served_seconds=0.5, warmup_seconds=0.0, ceiling_processes=1,
                          out=tmp_path / "bench", task="embedding", peer_url=f"{gateway.url}/v1",
                          peer_api="openai", peer_model=DEFAULT_EMBEDDER, rounds=2)
        result = run_bench(cfg)
    names = [r["name"] for r in result["results"]]
    assert names[0] == "sentence-transformers encode b8" and names[1].startswith("ceiling onnxruntime fp32")
    assert {n for n in names[2:]} == {f"{side} c2 x{k}" for side in ("served http", "served grpc", "peer openai")
                                      for k in (4, 1)}
    assert all(len(r["detail"]["rounds_rows_per_s"]) == 2 and r["detail"]["failures"] == 0
               for r in result["results"][2:])
    assert all(r["accuracy"] > 0.99999 for r in result["results"])  # min cosine to sentence-transformers
    assert all(r["ratio_to_ceiling"] is not None for r in result["results"][1:])
    assert (tmp_path / "bench" / "bench.md").is_file() and (tmp_path / "bench" / "bench.png").is_file()


@pytest.mark.server
def test_gpu_target_serves_the_embedder_beside_the_classifier(built, texts, reference, tiny_onnx, tiny_checkpoint,
                                                              tmp_path):
    """The GPU target's one batched model serves the embedder (named apart) as built, on the CPU provider here:
    equal to sentence-transformers, and a text's embedding does not depend on its sub-batch neighbours."""
    from serving.client import AsyncEmbedder, Embedder
    from serving.models import token_batch

    repo = write_repository(tmp_path / "gpu", onnx_model=tiny_onnx, tokenizer_dir=tiny_checkpoint,
                            id2label=dict(enumerate(LABELS)), config=RepositoryConfig(target=Target.GPU))
    served = ServedModel(name="search", head=Head.EMBEDDING, embedding_dim=32)
    add_model(repo, onnx_model=built["out"] / "fp32.onnx", tokenizer_dir=built["out"] / "tokenizer", model=served,
              config=RepositoryConfig(target=Target.GPU, max_length=64))
    info = read_repository(repo)
    assert sorted(info.models) == [DEFAULT_CLASSIFIER, "search"] and info.model("search").parts == {}
    assert (repo / "search" / "1" / "model.py").read_text() == (
        Path(__file__).parents[1] / "serving" / "models" / "batched.py").read_text()
    assert validate_repository(repo, Target.GPU) == [DEFAULT_CLASSIFIER, "search"]
    verify_repository(repo)
    with LocalTritonServer(ServerConfig(repo, startup_timeout_s=180)) as srv:
        with Embedder(srv.http_url, model="search") as client:
            got = client.embed(texts)
            alone = np.stack([client.embed(t)[0] for t in texts[:6]])

        async def concurrent():
            async with AsyncEmbedder(srv.grpc_url, protocol="grpc", model="search") as aclient:
                rows = await asyncio.gather(*(aclient.embed([t, *texts[30:45]]) for t in texts[:6]))
            return np.stack([r[0] for r in rows])

        among = asyncio.run(concurrent())
        record = token_batch.parse_records(srv.log_text())
    assert got.shape == reference.shape and np.abs(got - reference).max() < 1e-5
    assert np.abs(alone - among).max() <= 1e-5 and np.abs(alone - got[:6]).max() <= 1e-5
    assert record.rows == len(texts) + 6 + 6 * 16 and record.real_tokens <= record.computed_tokens


def test_supervisor_canary_asks_the_embedder_of_an_embedder_only_repository(built, server, tmp_path):
    """Issue 19: the canary asked `classifier` whatever the repository served, so `serving up` restarted an
    embedder-only repository again and again. It now asks a model the repository serves, for all its outputs."""
    from serving.supervisor import Supervisor, canary_request

    only = tmp_path / "repo"
    shutil.copytree(built["repo"] / DEFAULT_EMBEDDER, only / DEFAULT_EMBEDDER)
    assert set(read_repository(only).models) == {DEFAULT_EMBEDDER}
    model, body = canary_request(only, None, "canary")
    assert model == DEFAULT_EMBEDDER and "outputs" not in json.loads(body)
    assert canary_request(built["repo"], None, "canary")[0] == DEFAULT_CLASSIFIER  # classifier first when served
    # the request as the supervisor sends it is answered by the server (a missing model would be 'broken')
    assert Supervisor(ServerConfig(only))._canary(server) is None
    assert Supervisor(ServerConfig(only), _canary_config("absent"))._canary(server) is not None


def _canary_config(model: str):
    from serving.supervisor import SupervisorConfig

    return SupervisorConfig(canary_model=model, canary_failures=1, canary_timeout_s=5)
