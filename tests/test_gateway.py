"""The gateway end to end: the `openai` package and `huggingface_hub.InferenceClient` against the real gateway
process in front of a real tritonserver serving four tiny models (classifier, embedder, multi-label tags,
text-pair reranker); every answer is compared with what the KServe path (gRPC straight to Triton) gives."""
from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from gateway_helpers import TAGS, build_gateway_repository, kserve
from serving.contract import EMBEDDING, LOGITS, PROBABILITIES, SCORE
from serving.errors import GatewayError
from serving.gateway.config import API_KEY_ENV, API_KEY_FILE_ENV, GatewayConfig, key_from_environment
from serving_helpers import corpus_texts, read_endpoints

pytestmark = pytest.mark.server

KEY = "test-key-0123456789abcdef"
LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def repo(tiny_checkpoint, tiny_onnx, tmp_path_factory):
    return build_gateway_repository(tmp_path_factory.mktemp("gw"), tiny_checkpoint, tiny_onnx)


@pytest.fixture(scope="module")
def stack(repo):
    """(tritonserver, gateway process): the gateway with a key and small caps, so that each cap is testable."""
    from serving.gateway.process import GatewayProcess
    from serving.server import LocalTritonServer, ServerConfig

    with LocalTritonServer(ServerConfig(repo, startup_timeout_s=180)) as server:
        config = GatewayConfig(repository=repo, triton_url=server.grpc_url, port=0, api_key=KEY,
                               max_body_bytes=256 * 1024, max_rows=40, max_text_chars=50_000)
        with GatewayProcess(config) as gateway:
            yield server, gateway


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus_texts(24, seed=11)


@pytest.fixture()
def http(stack):
    with httpx.Client(base_url=stack[1].url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


def _served(stack, model, texts, pairs=None, outputs=()):
    return kserve(stack[0].grpc_url, model, texts, pairs, outputs)


# ----------------------------------------------------------------------------------------- openai


def test_openai_embeddings_float_and_base64_equal_the_kserve_path(stack, texts):
    import openai
    from transformers import AutoTokenizer

    client = openai.OpenAI(base_url=stack[1].url + "/v1", api_key=KEY, max_retries=0)
    expected = _served(stack, "embedder", texts, outputs=(EMBEDDING,))[EMBEDDING]
    as_float = client.embeddings.create(model="embedder", input=texts, encoding_format="float")
    got = np.asarray([d.embedding for d in as_float.data], dtype=np.float32)
    np.testing.assert_array_max_ulp(got, expected, maxulp=1)  # float32 -> shortest decimal -> float64 -> float32
    assert [d.index for d in as_float.data] == list(range(len(texts))) and as_float.model == "embedder"
    as_b64 = client.embeddings.create(model="embedder", input=texts, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in as_b64.data]
    np.testing.assert_array_equal(np.asarray(decoded), expected)
    tok = AutoTokenizer.from_pretrained(stack[0].config.repository / "embedder" / "1" / "tokenizer")
    tokens = sum(len(ids) for ids in tok(texts, truncation=True, max_length=64)["input_ids"])
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens == tokens
    one = client.embeddings.create(model="embedder", input=texts[0])  # the client asks for base64, decodes it
    np.testing.assert_array_equal(np.asarray(one.data[0].embedding, dtype=np.float32), expected[0])  # base64: exact


def test_openai_models_and_errors(stack, http):
    import openai

    client = openai.OpenAI(base_url=stack[1].url + "/v1", api_key=KEY, max_retries=0)
    assert sorted(m.id for m in client.models.list()) == ["classifier", "embedder", "reranker", "tags"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack[1].url + "/v1", api_key="wrong-key-0123456789", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="nope", input="x")
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as wrong_kind:
        client.embeddings.create(model="classifier", input="x")
    assert "not an embedding model" in wrong_kind.value.body["message"]
    r = http.post("/v1/embeddings", json={"model": "embedder", "input": [[101, 102]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# ----------------------------------------------------------------------------- huggingface_hub + TEI


@pytest.fixture()
def loopback_hub():
    """huggingface_hub refuses every request under HF_HUB_OFFLINE (conftest): let it reach loopback only."""
    import requests
    from huggingface_hub import configure_http_backend

    class LoopbackOnly(requests.adapters.HTTPAdapter):
        def send(self, request, *args, **kwargs):
            assert httpx.URL(request.url).host == "127.0.0.1", f"not loopback: {request.url}"
            return super().send(request, *args, **kwargs)

    def session():
        s = requests.Session()
        s.mount("http://", LoopbackOnly())
        s.mount("https://", LoopbackOnly())
        return s

    configure_http_backend(session)
    yield
    configure_http_backend()


def test_huggingface_hub_feature_extraction_and_text_classification(stack, texts, loopback_hub):
    from huggingface_hub import InferenceClient

    url = stack[1].url
    expected = _served(stack, "embedder", texts[:3], outputs=(EMBEDDING,))[EMBEDDING]
    for base in (url + "/embed", url):  # the route, and TEI's root route (the embedder is the default)
        got = InferenceClient(base_url=base, api_key=KEY).feature_extraction(texts[0])
        np.testing.assert_allclose(np.asarray(got).reshape(-1), expected[0], rtol=0, atol=1e-6)
    probs = _served(stack, "classifier", texts[:1], outputs=(PROBABILITIES,))[PROBABILITIES][0]
    answer = InferenceClient(base_url=url + "/predict", api_key=KEY).text_classification(texts[0])
    assert [a.label for a in answer] == [LABELS[j] for j in np.argsort(-probs, kind="stable")]
    assert [a.score for a in answer] == pytest.approx(sorted(probs.tolist(), reverse=True), abs=1e-6)
    top = InferenceClient(base_url=url + "/predict?model=tags", api_key=KEY).text_classification(texts[0], top_k=2)
    assert len(top) == 2 and top[0].label in TAGS


def test_embed_normalizes_and_batches_beyond_max_batch_size(stack, http, texts):
    many = (texts * 2)[:36]  # more rows than max_batch_size 16: split into chunks, in order
    expected = _served(stack, "embedder", many, outputs=(EMBEDDING,))[EMBEDDING]
    r = http.post("/embed", json={"inputs": many})
    assert r.status_code == 200
    got = np.asarray(r.json(), dtype=np.float32)
    np.testing.assert_allclose(got, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_predict_every_label_sorted_and_multi_label_sigmoid(stack, http, texts):
    out = _served(stack, "tags", texts[:4], outputs=(PROBABILITIES, LOGITS))
    r = http.post("/predict?model=tags", json={"inputs": texts[:4]})
    assert r.status_code == 200
    for row, probs, logits in zip(r.json(), out[PROBABILITIES], out[LOGITS]):
        assert [x["label"] for x in row] == [TAGS[j] for j in np.argsort(-probs, kind="stable")]
        assert sorted(x["score"] for x in row) == pytest.approx(sorted(1 / (1 + np.exp(-logits))), abs=1e-6)
    assert any(abs(sum(x["score"] for x in row) - 1) > 0.05 for row in r.json())  # sigmoid, not a softmax
    raw = http.post("/predict?model=tags", json={"inputs": texts[0], "raw_scores": True}).json()
    assert sorted(x["score"] for x in raw) == pytest.approx(sorted(out[LOGITS][0].tolist()), abs=1e-5)
    single = http.post("/predict", json={"inputs": texts[0]}).json()
    assert {x["label"] for x in single} == set(LABELS) and sum(x["score"] for x in single) == pytest.approx(1, 1e-4)


def test_rerank_sorted_with_indices_from_the_pair_model(stack, http, texts):
    query, docs = texts[0], texts[1:7]
    raw = _served(stack, "reranker", [query] * len(docs), docs, outputs=(SCORE,))[SCORE].reshape(-1)
    r = http.post("/rerank", json={"query": query, "texts": docs, "return_text": True, "top_n": 4})
    assert r.status_code == 200
    order = np.argsort(-raw, kind="stable")[:4]
    assert [x["index"] for x in r.json()] == order.tolist()
    assert [x["score"] for x in r.json()] == pytest.approx((1 / (1 + np.exp(-raw[order]))).tolist(), abs=1e-6)
    assert [x["text"] for x in r.json()] == [docs[i] for i in order]
    scores = http.post("/rerank", json={"query": query, "texts": docs, "raw_scores": True}).json()
    assert sorted(x["score"] for x in scores) == pytest.approx(sorted(raw.tolist()), abs=1e-5)
    pair = http.post("/predict?model=reranker", json={"inputs": [query, docs[0]]}).json()
    assert pair[0]["score"] == pytest.approx(float(raw[0]), abs=1e-5)
    bad = http.post("/rerank?model=classifier", json={"query": query, "texts": docs})
    assert bad.status_code == 400 and bad.json()["error_type"] == "Validation"


def test_tokenize_info_health_and_the_key(stack, http):
    from tokenizers import Tokenizer

    text = "Gateways speak OpenAI " * 200  # 4,400 characters: far above the server's old 2,048 cap
    r = http.post("/tokenize", json={"inputs": [text, "héllo wörld"], "add_special_tokens": True})
    assert r.status_code == 200
    tok = Tokenizer.from_file(str(stack[0].config.repository / "embedder" / "1" / "tokenizer" / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    enc = tok.encode("héllo wörld")
    row = r.json()[1]
    assert [t["id"] for t in row] == enc.ids
    assert [t["special"] for t in row] == [bool(m) for m in enc.special_tokens_mask]
    assert [(t["start"], t["stop"]) for t in row[1:-1]] == enc.offsets[1:-1] and row[0]["start"] is None
    assert len(r.json()[0]) > 600
    info = http.get("/info").json()
    assert info["model_id"] == "embedder" and info["max_input_length"] == 64 and len(info["models"]) == 4
    assert http.get("/info?model=tags").json()["model_type"]["classifier"]["multi_label"] is True
    assert httpx.get(stack[1].url + "/health").status_code == 200  # no key needed
    for method, path in (("GET", "/info"), ("POST", "/embed"), ("GET", "/v1/models"), ("POST", "/")):
        r = httpx.request(method, stack[1].url + path, json={"inputs": "x"})
        assert r.status_code == 401, path
        r = httpx.request(method, stack[1].url + path, json={"inputs": "x"}, headers={"Authorization": "Bearer x"})
        assert r.status_code == 401, path
    assert "error_type" in httpx.post(stack[1].url + "/embed", json={}).json()


def test_caps_and_bad_input_each_one_clear_4xx(http, texts):
    cases = [
        (dict(content=b"x" * (300 * 1024)), 413, "262144 bytes"),  # body cap
        (dict(json={"inputs": ["a"] * 41}), 413, "at most 40"),  # rows
        (dict(json={"inputs": ["a" * 50_001]}), 413, "50000"),  # text size
        (dict(content=b"{not json"), 400, "not valid JSON"),
        (dict(json={"inputs": []}), 400, "empty"),
        (dict(json={"inputs": 3}), 422, "string"),
        (dict(json={"inputs": texts[0], "truncate": False, "normalize": True}), None, None),
        (dict(json={"inputs": "word " * 200, "truncate": False}), 413, "tokens"),
    ]
    for kwargs, status, words in cases:
        r = http.post("/embed", **kwargs)
        if status is None:
            assert r.status_code == 200
            continue
        assert r.status_code == status, (kwargs.get("json"), r.text)
        assert set(r.json()) == {"error", "error_type"} and words in r.json()["error"]
    assert http.post("/predict", json={"inputs": [["a", "b"]]}).status_code == 422  # pairs to a 1-text model
    assert http.post("/embed?model=missing", json={"inputs": "a"}).status_code == 404


# ------------------------------------------------------------------------------------ config, `up`


def test_api_key_from_environment_and_file(tmp_path, monkeypatch):
    assert key_from_environment({}) is None
    assert key_from_environment({API_KEY_ENV: " k" * 9}) == ("k " * 9).strip()
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    assert key_from_environment({API_KEY_FILE_ENV: str(path)}) == KEY
    monkeypatch.setenv(API_KEY_FILE_ENV, str(path))
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert GatewayConfig(repository=tmp_path).api_key == KEY
    with pytest.raises(GatewayError, match="at least 16"):
        GatewayConfig(repository=tmp_path, api_key="short")
    with pytest.raises(GatewayError, match="port"):
        GatewayConfig(repository=tmp_path, port=70000)


def test_serving_up_runs_and_restarts_the_gateway(repo):
    """`serving up --gateway-port` starts the gateway beside tritonserver and brings it back when it dies."""
    from serving.server import free_port

    port = free_port()
    env = {**os.environ, API_KEY_ENV: KEY}
    proc = subprocess.Popen([sys.executable, "-m", "serving", "up", "--repository", str(repo), "--http-port", "0",
                             "--grpc-port", "0", "--metrics-port", "0", "--gateway-port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = read_endpoints(proc, timeout=180)
        while "gateway" not in lines:
            key, value = proc.stdout.readline().split(None, 1)
            lines[key] = value.strip()
        assert lines["gateway"].startswith(f"http://127.0.0.1:{port} ") and "key required" in lines["gateway"]
        url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {KEY}"}
        assert httpx.post(url + "/predict", json={"inputs": "fine"}, headers=headers).status_code == 200
        pid = int(lines["gateway"].split("pid ")[1].split(";")[0])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.post(url + "/predict", json={"inputs": "back"}, headers=headers).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail("the gateway did not come back")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_a_killed_serving_up_takes_its_gateway_with_it(repo):
    """`kill -9` of `serving up --gateway-port`: the gateway child and tritonserver are gone within seconds
    (a serving.watchdog beside each sees the pipe close); before, the gateway lived on, holding its port."""
    import psutil

    from serving.server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serving", "up", "--repository", str(repo), "--http-port", "0",
                             "--grpc-port", "0", "--metrics-port", "0", "--gateway-port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, API_KEY_ENV: KEY})
    left = []
    try:
        lines = read_endpoints(proc, timeout=180)
        while "gateway" not in lines:
            key, value = proc.stdout.readline().split(None, 1)
            lines[key] = value.strip()
        children = [psutil.Process(int(lines["gateway"].split("pid ")[1].split(";")[0])),
                    psutil.Process(int(lines["pid"]))]
        proc.kill()
        killed = time.monotonic()
        proc.wait()
        while time.monotonic() < killed + 15 and any(_running(p) for p in children):
            time.sleep(0.1)
        gone_after = time.monotonic() - killed
        left = [p for p in children if _running(p)]
    finally:
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
    assert not left and gone_after < 10, ([p.pid for p in left], gone_after)


def _running(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_locust_users_of_every_route(stack, tmp_path):
    """loadtest/locust_gateway.py against the gateway: each route's user runs, no failure."""
    import csv
    from pathlib import Path

    locustfile = Path(__file__).resolve().parents[1] / "loadtest" / "locust_gateway.py"
    env = {**os.environ, API_KEY_ENV: KEY}
    done = subprocess.run([sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "-u", "4", "-r", "4",
                           "-t", "4s", "--host", stack[1].url, "--texts-per-request", "3", "--csv",
                           str(tmp_path / "gw"), "--only-summary"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "gw_stats.csv", newline="") as fh:
        rows = {r["Name"]: r for r in csv.DictReader(fh)}
    for name in ("/v1/embeddings x3", "/embed x3", "/predict x3", "/rerank x3"):
        assert int(rows[name]["Request Count"]) > 0 and int(rows[name]["Failure Count"]) == 0, (name, rows.get(name))


def test_compose_service_and_image_of_the_gateway():
    """The compose service runs the gateway hardened, beside triton, on loopback, its key a Docker secret."""
    from pathlib import Path

    import yaml

    docker = Path(__file__).resolve().parents[1] / "serving" / "docker"
    compose = yaml.safe_load((docker / "docker-compose.yml").read_text())
    gw = compose["services"]["gateway"]
    assert gw["command"][:4] == ["python", "-m", "serving", "gateway"] and "triton:8001" in gw["command"]
    assert gw["ports"] == ["${TRITON_BIND:-127.0.0.1}:8080:8080"] and gw["read_only"] is True
    assert gw["cap_drop"] == ["ALL"] and gw["user"].split(":")[0] != "0"
    assert gw["environment"][API_KEY_FILE_ENV] == "/run/secrets/textclf_api_key"
    assert "textclf_api_key" in compose["secrets"] and gw["depends_on"]["triton"]["condition"] == "service_healthy"
    assert next(v for v in gw["volumes"] if v["target"] == "/models")["read_only"] is True
    dockerfile = (docker / "Dockerfile.gateway").read_text()
    assert "USER 1000:1000" in dockerfile and '"numpy<2"' in dockerfile


def test_backend_errors_reach_the_client_without_internal_detail(http):
    """tritonserver's own INVALID_ARGUMENT message passes; anything else becomes a generic line."""
    from tritonclient.utils import InferenceServerException

    from serving.gateway.backend import backend_error

    bad = backend_error(InferenceServerException("TEXT must be BYTES [rows, 1]", status="StatusCode.INVALID_ARGUMENT"))
    assert (bad.status, bad.kind, str(bad)) == (422, "validation", "TEXT must be BYTES [rows, 1]")
    busy = backend_error(InferenceServerException("queue full", status="StatusCode.UNAVAILABLE"))
    assert busy.status == 503 and "queue" not in str(busy)
    inner = backend_error(InferenceServerException("/models/x/1/model.py line 3: KeyError",
                                                   status="StatusCode.INTERNAL"))
    assert inner.status == 502 and "model.py" not in str(inner) and "gateway log" in str(inner)
    r = http.get("/nope")
    assert r.status_code == 404 and r.json()["error_type"] == "Validation"
    r = http.get("/embed")
    assert r.status_code == 405 and "not allowed" in r.json()["error"]
    assert http.get("/v1/nope").json()["error"]["type"] == "invalid_request_error"
