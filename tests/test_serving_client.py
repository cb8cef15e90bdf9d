"""serving.client without tritonserver: error mapping, bounded retries, timeouts against fake endpoints."""
from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import socket
import threading
import time

import pytest
from tritonclient.utils import InferenceServerException

from serving.client import AsyncTextClassifier, TextClassifier, _Retry, classify_error
from serving.contract import DEFAULT_CLASSIFIER
from serving.errors import ClientError, InvalidInputError, RequestTimeoutError, ServerUnavailableError


@pytest.mark.parametrize("status, expected", [
    ("400", InvalidInputError), ("404", InvalidInputError), ("StatusCode.INVALID_ARGUMENT", InvalidInputError),
    ("StatusCode.DEADLINE_EXCEEDED", RequestTimeoutError), ("500", ClientError),
])
def test_error_mapping(status, expected):
    error = classify_error(InferenceServerException("msg", status=status), "host:1")
    assert type(error) is expected and "msg" in str(error)


@pytest.mark.parametrize("status", ["503", "StatusCode.UNAVAILABLE"])
def test_unavailable_is_retryable(status):
    error = classify_error(InferenceServerException("queue full", status=status), "host:1")
    assert isinstance(error, _Retry) and isinstance(error.error, ServerUnavailableError)
    assert isinstance(classify_error(ConnectionRefusedError(), "h:1"), _Retry)


@pytest.fixture()
def silent_port():
    """A TCP port that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_timeouts_are_typed_and_bounded(silent_port, protocol):
    url = f"127.0.0.1:{silent_port}"
    start = time.perf_counter()
    with pytest.raises(RequestTimeoutError):
        with TextClassifier(url, protocol=protocol, timeout_s=0.5, retries=3) as client:
            client.classify(["x"])

    async def run():
        async with AsyncTextClassifier(url, protocol=protocol, timeout_s=0.5, retries=3) as client:
            await client.classify(["x"])

    with pytest.raises(RequestTimeoutError):
        asyncio.run(run())
    assert time.perf_counter() - start < 5  # a timeout is not retried


@contextlib.contextmanager
def json_server(status: int, doc: dict, hits: list | None = None):
    """A plaintext HTTP server answering every GET with ``status`` and ``doc``; yields its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            if hits is not None:
                hits.append(self.path)
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        thread.join()


def test_unavailable_is_retried_with_bounded_backoff_then_raised():
    hits = []
    with json_server(503, {"error": "Server not ready"}, hits) as port:
        start = time.perf_counter()
        with pytest.raises(ServerUnavailableError, match="Server not ready"):
            with TextClassifier(f"127.0.0.1:{port}", retries=3, backoff_s=0.05) as client:
                client.classify(["x"])
        elapsed = time.perf_counter() - start
    assert len(hits) == 4 and all(h.startswith(f"/v2/models/{DEFAULT_CLASSIFIER}/config") for h in hits)
    assert 0.05 + 0.1 + 0.2 <= elapsed < 3


def test_an_answer_that_lacks_its_outputs_is_retried(protocol="http"):
    """Seen on Triton 2.51 as its python backend crashed under load: a 200 without the outputs. The client
    retries it (classification is idempotent) and, once the retries run out, says the server failed."""
    from serving.contract import ServedModel

    served = ServedModel(labels=("a", "b"))
    config = {"name": DEFAULT_CLASSIFIER, "max_batch_size": 8,
              "parameters": {k: {"string_value": v} for k, v in served.to_parameters().items()}}
    good = {"model_name": DEFAULT_CLASSIFIER, "outputs": [
        {"name": "LABEL", "datatype": "BYTES", "shape": [1, 1], "data": ["b"]},
        {"name": "PROBABILITIES", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]}]}
    answers = [{"model_name": DEFAULT_CLASSIFIER, "outputs": []}] * 2 + [good]

    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, doc):
            body = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 - http.server API
            self._send(config)

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send(answers.pop(0) if answers else {"model_name": DEFAULT_CLASSIFIER, "outputs": []})

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"127.0.0.1:{server.server_port}"
        with TextClassifier(url, retries=3, backoff_s=0.01) as client:
            [p] = client.classify(["x"])  # two empty answers, then a good one
        assert p.label == "b" and abs(p.probabilities["b"] - 0.75) < 1e-6
        with TextClassifier(url, retries=1, backoff_s=0.01) as client:
            with pytest.raises(ServerUnavailableError, match="lacks"):
                client.classify(["x"])
    finally:
        server.shutdown()


def test_texts_must_be_strings():
    with pytest.raises(InvalidInputError, match="strings"):
        TextClassifier("127.0.0.1:1").classify(["ok", b"bytes"])
    assert TextClassifier("127.0.0.1:1").classify([]) == []


def test_bad_protocol():
    with pytest.raises(ClientError, match="protocol"):
        TextClassifier("127.0.0.1:1", protocol="udp")


def test_retry_policy_yields_bounded_delays():
    from serving.client import RetryPolicy

    assert list(RetryPolicy(retries=5, backoff_s=0.1, backoff_max_s=0.3, timeout_s=60).delays()) == [
        0.1, 0.2, 0.3, 0.3, 0.3]
    assert list(RetryPolicy(retries=0).delays()) == []
    assert list(RetryPolicy(retries=9, backoff_s=1.0, timeout_s=2.5).delays()) == [1.0]  # 1 + 2 > 2.5 s


@pytest.fixture()
def plaintext_config_server():
    """A plaintext HTTP server answering a classifier's config the way Triton does."""
    from serving.contract import ServedModel

    config = {"name": DEFAULT_CLASSIFIER, "max_batch_size": 8,
              "parameters": {k: {"string_value": v} for k, v in
                             ServedModel(labels=("neg", "pos")).to_parameters().items()}}
    with json_server(200, config) as port:
        yield port


def test_https_is_tls_or_fails_never_plaintext(plaintext_config_server):
    """The same plaintext server: http:// reads the config, https:// must not (no silent downgrade)."""
    port = plaintext_config_server
    with TextClassifier(f"http://127.0.0.1:{port}") as client:
        assert client.metadata() == (8, ["neg", "pos"])
    with pytest.raises(ClientError):
        with TextClassifier(f"https://127.0.0.1:{port}", retries=1, backoff_s=0.01, timeout_s=3) as client:
            client.metadata()

    async def run(url):
        async with AsyncTextClassifier(url, retries=1, backoff_s=0.01, timeout_s=3) as client:
            return await client.metadata()

    assert asyncio.run(run(f"http://127.0.0.1:{port}")) == (8, ["neg", "pos"])
    with pytest.raises(ClientError):
        asyncio.run(run(f"https://127.0.0.1:{port}"))


def test_url_scheme_sets_protocol_and_tls():
    from serving.client import ClientConfig

    cfg = ClientConfig("grpcs://h:8001")
    assert cfg.protocol.value == "grpc" and cfg.endpoint.tls and cfg.url == "h:8001"
    assert ClientConfig("h:8000").endpoint.tls is False
    with pytest.raises(ClientError, match="grpc"):
        ClientConfig("grpc://h:8001", protocol="http")
