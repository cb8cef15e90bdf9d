"""Safe defaults and failure handling that need no tritonserver: loopback, model control, pickle-free and
remote-code-free loading, tokenizer thread safety, the client's retry budget, the soak verdict.

The live halves (listening sockets, refused load/unload, size limits answered 400) are in
tests/test_reliability.py; the finetune side of "no pickle" is tests/test_finetune_train.py.
"""
from __future__ import annotations

import ast
import http.server
import json
import re
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "finetune", "exporter", "serving", "loadtest")


def package_sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


# -------------------------------------------------------------------------------- binding, model control


def test_server_defaults_are_loopback_and_model_control_explicit_behind_the_key(tmp_path):
    from serving.cli import build_parser
    from serving.server import LocalTritonServer, ServerConfig

    server = LocalTritonServer(ServerConfig(tmp_path))
    server.http_port, server.grpc_port, server.metrics_port = 1, 2, 3
    cmd = server.command(tmp_path)
    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert f"{flag}=127.0.0.1" in cmd
    # explicit model control (a new version or a dead stub's model is loaded alone), loading every model at
    # start; the repository API that does it is restricted to the admin key, which every start has
    assert [a for a in cmd if a.startswith("--model-control-mode=")] == ["--model-control-mode=explicit"]
    assert "--load-model=*" in cmd
    restricted = [a for a in cmd if a.startswith("--http-restricted-api=")]
    assert len(restricted) == 1 and "model-repository" in restricted[0].split(":")[0]
    args = build_parser(with_manifests=False).parse_args(["up"])
    assert args.host == "127.0.0.1" and not args.no_supervise


# ---------------------------------------------------------------------------------- no pickle, no remote code


def test_exporter_refuses_pickle_only_checkpoint(tiny_checkpoint, tmp_path):
    import shutil

    from exporter.errors import CheckpointError
    from exporter.inputs import load_checkpoint

    ck = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, ck)
    (ck / "model.safetensors").rename(ck / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model.bin\).*safetensors"):
        load_checkpoint(ck)


def test_no_source_enables_trust_remote_code():
    offenders = []
    for path in package_sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.value.lineno}")
    assert offenders == []


def test_remote_code_in_a_checkpoint_is_never_run(tiny_checkpoint, tmp_path):
    """A checkpoint whose config points at its own Python (auto_map) is refused, and that code never runs."""
    import shutil

    from exporter import parity

    ck = tmp_path / "remote"
    shutil.copytree(tiny_checkpoint, ck)
    marker = tmp_path / "code-ran"
    (ck / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n"
                                "from transformers import BertForSequenceClassification as EvilModel\n")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model_type"] = "evil-remote"
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"}
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception):  # noqa: B017 - transformers' own error: needs trust_remote_code=True
        parity.load_torch_model(ck)
    assert not marker.exists()


# ----------------------------------------------------------------------------------- tokenizer thread safety


def test_tokenizers_are_never_shared_across_threads():
    """The served tokenizer is one per model instance; the client has none; any module that tokenizes
    in-process either runs no threads or holds a lock (fast tokenizers: 'Already borrowed')."""
    shared = (ROOT / "serving" / "models" / "textmodel.py").read_text()
    # cpu models (classifier, embedder: textmodel.RowModel), the gpu model (batched.py): one tokenizer per instance
    assert re.search(r"class RowModel:(.|\n)*def initialize\(self, args\):(.|\n)*self\.tokenizer = length_tokenizer",
                     shared)
    for name in ("classifier.py", "embedder.py"):
        assert "textmodel.RowModel" in (ROOT / "serving" / "models" / name).read_text()
    gpu_src = (ROOT / "serving" / "models" / "batched.py").read_text()
    assert re.search(r"def initialize\(self, args\):(.|\n)*self\.tokenizer = textmodel\.length_tokenizer", gpu_src)
    assert "global" not in shared and re.search(r"def length_tokenizer(.|\n)*Tokenizer\.from_file", shared)
    client_src = (ROOT / "serving" / "client.py").read_text()
    assert "tokenizers" not in client_src and "AutoTokenizer" not in client_src
    tokenizing = [p for p in package_sources() if p.parent.name != "models"
                  and re.search(r"AutoTokenizer|from tokenizers import|pipeline\(", p.read_text(encoding="utf-8"))]
    assert tokenizing, "expected in-process tokenizer users (finetune, exporter, bench)"
    unsafe = []
    for path in tokenizing:
        src = path.read_text(encoding="utf-8")
        threaded = re.search(r"\bthreading\b|ThreadPoolExecutor", src)  # a process pool shares no tokenizer
        if threaded and not re.search(r"threading\.(R)?Lock\(|threading\.local\(", src):
            unsafe.append(str(path.relative_to(ROOT)))
    assert unsafe == []


# ------------------------------------------------------------------------------------ client retry budget


class _FakeTriton(http.server.BaseHTTPRequestHandler):
    """Answers the model config, then every inference with a fixed error."""

    status, message, infers = 503, "Exceeds maximum queue size", 0

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, {"name": "classifier", "max_batch_size": 8,
                         "parameters": {"labels": {"string_value": '["a", "b"]'}}})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).infers += 1
        self._send(self.status, {"error": self.message})


@pytest.fixture()
def fake_triton():
    def serve(status: int, message: str):
        handler = type("Handler", (_FakeTriton,), {"status": status, "message": message, "infers": 0})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"127.0.0.1:{server.server_address[1]}", handler

    servers: list = []
    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.mark.parametrize("status, message", [
    (503, "in ensemble 'classifier', Exceeds maximum queue size"),
    (500, "in ensemble 'classifier', Stub process 'encoder_0_0' is not healthy."),
])
def test_client_retries_within_its_budget_then_a_typed_error(fake_triton, status, message):
    from serving.client import TextClassifier
    from serving.errors import ServerUnavailableError

    url, handler = fake_triton(status, message)
    budget = 1.0
    start = time.perf_counter()
    with pytest.raises(ServerUnavailableError, match=re.escape(message[-20:])):
        with TextClassifier(url, timeout_s=budget, retries=100, backoff_s=0.05) as client:
            client.classify(["x"])
    elapsed = time.perf_counter() - start
    assert handler.infers > 2  # it did retry ...
    assert elapsed < budget + 0.5  # ... but never past its budget, despite retries=100


def test_other_server_errors_are_not_retried(fake_triton):
    from serving.client import TextClassifier
    from serving.errors import ClientError, ServerUnavailableError

    url, handler = fake_triton(500, "onnxruntime: some other failure")
    with pytest.raises(ClientError) as info:
        with TextClassifier(url, timeout_s=5, retries=5, backoff_s=0.05) as client:
            client.classify(["x"])
    assert not isinstance(info.value, ServerUnavailableError) and handler.infers == 1


# ------------------------------------------------------------------------------------------ soak verdict


def _soak_cfg(tmp_path, **kw):
    from loadtest.soak import SoakConfig

    return SoakConfig(repository=tmp_path, duration="100s", warmup="10s", window="20s", **kw)


def test_soak_verdict_passes_steady_figures(tmp_path):
    from loadtest.soak import verdict

    cfg = _soak_cfg(tmp_path)
    points = [(float(t), 50.0 + (t % 3)) for t in range(101)]
    rss = [(float(t), 400e6) for t in range(0, 101, 2)]
    result = verdict(cfg, 1000, 0, points, rss, 0.0, 100.0)
    assert result["passed"] and result["reasons"] == []
    assert result["p99_ms"]["drift"] == pytest.approx(0.0) and result["rss_mb"]["growth"] == pytest.approx(0.0)


@pytest.mark.parametrize("case, expect", [
    ("failures", "3 of 1000 requests failed"),
    ("p99", "p99 drifted +20.0%"),
    ("rss", "server RSS grew +15.0%"),
])
def test_soak_verdict_fails_on_each_condition(tmp_path, case, expect):
    from loadtest.soak import verdict

    cfg = _soak_cfg(tmp_path)
    p99 = [(float(t), 60.0 if case == "p99" and t >= 80 else 50.0) for t in range(101)]
    rss = [(float(t), 460e6 if case == "rss" and t >= 80 else 400e6) for t in range(0, 101, 2)]
    result = verdict(cfg, 1000, 3 if case == "failures" else 0, p99, rss, 0.0, 100.0)
    assert not result["passed"] and result["reasons"] == [next(r for r in result["reasons"] if expect in r)]


def test_soak_config_validation(tmp_path):
    from loadtest.errors import LoadtestError

    with pytest.raises(LoadtestError, match="too short"):
        _soak_cfg(tmp_path).__class__(repository=tmp_path, duration="30s", warmup="10s", window="20s")
    with pytest.raises(LoadtestError, match="load-fraction"):
        _soak_cfg(tmp_path, load_fraction=1.5)
    with pytest.raises(LoadtestError, match="not found"):
        _soak_cfg(tmp_path / "missing")


@pytest.mark.parametrize("status, message, retried", [
    ("StatusCode.NOT_FOUND", "Request for unknown model: 'classifier' has no available versions", True),
    ("400", "Request for unknown model: 'classifier' has no available versions", True),  # during shutdown
    ("StatusCode.NOT_FOUND", "Request for unknown model: 'nope' is not found", False),
    ("500", "in ensemble 'classifier', Stub process 'encoder_0_0' is not healthy.", True),
    ("500", "onnxruntime: bad things", False),
])
def test_transient_server_states_are_retryable_bad_requests_are_not(status, message, retried):
    from tritonclient.utils import InferenceServerException

    from serving.client import _Retry, classify_error
    from serving.errors import InvalidInputError, ServerUnavailableError

    error = classify_error(InferenceServerException(message, status=status), "h:1")
    if retried:
        assert isinstance(error, _Retry) and isinstance(error.error, ServerUnavailableError)
    else:
        assert not isinstance(error, _Retry)
        assert isinstance(error, InvalidInputError) == status.endswith("NOT_FOUND")


# ------------------------------------------------------------------------------------ supervisor canary


@pytest.mark.parametrize("status, message, restart_after", [
    (500, "in ensemble 'classifier', Stub process 'encoder_0_0' is not healthy.", 1),  # at once
    (503, "in ensemble 'classifier', Exceeds maximum queue size", 3),  # load: only 3 in a row
    (200, "", None),
])
def test_supervisor_canary_tells_a_broken_stub_from_load(fake_triton, status, message, restart_after):
    from types import SimpleNamespace

    from serving.server import ServerConfig
    from serving.supervisor import Supervisor, SupervisorConfig

    url, _ = fake_triton(status, message)
    sup = Supervisor(ServerConfig(Path(".")), SupervisorConfig(canary_failures=3, canary_timeout_s=2))
    server = SimpleNamespace(http_url=url)
    reasons = [sup._canary(server) for _ in range(3)]
    if restart_after is None:
        assert reasons == [None, None, None]
    else:
        assert reasons[restart_after - 1] and all(r is None for r in reasons[:restart_after - 1])
        assert message[-25:] in reasons[restart_after - 1]


def test_a_stop_is_clean_only_when_tritonserver_reported_nothing_in_flight():
    from serving.supervisor import _drained, instance_model

    waited = ('"Timeout 10: Found 0 model versions that have in-flight inferences"\n'
              '"Timeout 3: Found 1 live models and 0 in-flight non-inference requests"\n'
              '"failed to stop server: Internal - Exit timeout expired. Exiting immediately."')
    assert _drained(waited)
    assert not _drained(waited.replace("Found 0 model versions", "Found 1 model versions"))  # requests cut
    assert not _drained(waited.split("\n")[0])  # it did not time out: nothing to excuse
    assert instance_model("classifier_0_1") == "classifier" and instance_model("my_model_2_10") == "my_model"
