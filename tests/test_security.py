"""Security defaults (issue #11): restricted admin APIs on the real server, repository integrity, the
tritonserver-arguments builder and the hardened Docker files. One server for the module."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from serving.contract import DEFAULT_CLASSIFIER, http_infer_body, infer_path
from serving.errors import ServerError
from serving.integrity import IntegrityError, clear_bytecode, verify_repository
from serving.repository import RepositoryConfig, read_repository, write_repository
from serving.server import LocalTritonServer, ServerConfig
from serving.triton_args import (ADMIN_HEADER, RESTRICTED_APIS, TritonArgsError, TritonServerConfig,
                                 grpc_admin_header)

REPO_ROOT = Path(__file__).resolve().parents[1]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
RESTRICTED_BODY = "This API is restricted"

# (method, path, JSON body or None): the probes of issue #11 plus trace and statistics
HTTP_PROBES = [
    ("POST", "/v2/systemsharedmemory/region/x/register", {"key": "triton_python_backend_shm_region_x", "offset": 0,
                                                          "byte_size": 64}),
    ("GET", "/v2/systemsharedmemory/status", None),
    ("GET", "/v2/cudasharedmemory/status", None),
    ("POST", "/v2/logging", {}),
    ("POST", "/v2/repository/index", {}),
    ("GET", "/v2/trace/setting", None),
    ("GET", "/v2/models/stats", None),
]


@pytest.fixture(scope="module")
def repository(tiny_onnx, tiny_checkpoint, tmp_path_factory) -> Path:
    return write_repository(tmp_path_factory.mktemp("secure") / "model_repository", onnx_model=tiny_onnx,
                            tokenizer_dir=tiny_checkpoint, id2label=LABELS,
                            config=RepositoryConfig(max_batch_size=4, intra_op_threads=1))


@pytest.fixture(scope="module")
def server(repository):
    with LocalTritonServer(ServerConfig(repository, startup_timeout_s=120)) as srv:  # no key given: a random one
        yield srv


def _http(server, method: str, path: str, body=None, headers=None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else (b"{}" if method == "POST" else None)
    req = urllib.request.Request(f"http://{server.http_url}{path}", method=method, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# ----------------------------------------------------------------------------------- the real server

@pytest.mark.server
@pytest.mark.parametrize("method, path, body", HTTP_PROBES, ids=[p[1] for p in HTTP_PROBES])
def test_http_admin_api_refused_without_the_key_and_allowed_with_it(server, method, path, body):
    status, text = _http(server, method, path, body)
    assert status == 403 and RESTRICTED_BODY in text, (status, text)
    wrong = _http(server, method, path, body, {ADMIN_HEADER: "x" * 43})
    assert wrong[0] == 403
    status, text = _http(server, method, path, body, server.admin_headers())
    assert status != 403 and RESTRICTED_BODY not in text, (status, text)
    if method == "GET" or path.endswith("/index"):
        assert status == 200, text


def _grpc_probes(client):
    return {
        "register": lambda **kw: client.register_system_shared_memory("x", "triton_python_backend_shm_region_x", 64,
                                                                       **kw),
        "system_shm_status": lambda **kw: client.get_system_shared_memory_status(**kw),
        "cuda_shm_status": lambda **kw: client.get_cuda_shared_memory_status(**kw),
        "log_settings": lambda **kw: client.update_log_settings({"log_verbose_level": 0}, **kw),
        "repository_index": lambda **kw: client.get_model_repository_index(**kw),
        "trace": lambda **kw: client.get_trace_settings(**kw),
        "statistics": lambda **kw: client.get_inference_statistics(**kw),
    }


@pytest.mark.server
def test_grpc_admin_protocols_refused_without_the_key_and_allowed_with_it(server):
    """Triton 2.51 answers UNAVAILABLE (not PERMISSION_DENIED) and wants the metadata key
    'triton-grpc-protocol-<header>' (pinned: clients must not retry a refusal as an outage)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert grpc_admin_header() == "triton-grpc-protocol-" + ADMIN_HEADER
    for name, call in _grpc_probes(client).items():
        for headers in (None, {grpc_admin_header(): "x" * 43}, {ADMIN_HEADER: server.admin_key}):
            with pytest.raises(InferenceServerException) as info:
                call(headers=headers)
            assert info.value.status() == "StatusCode.UNAVAILABLE" and "restricted" in str(info.value), name
        try:
            call(headers=server.admin_headers("grpc"))
        except InferenceServerException as exc:  # register of a region that does not exist: refused, not restricted
            assert name == "register" and "restricted" not in str(exc), (name, exc)
    client.close()


@pytest.mark.server
def test_the_classifier_keeps_serving_anonymous_clients(server):
    """Inference, health, metadata and the model config (clients read labels from it) stay open."""
    import tritonclient.grpc as grpcclient

    from serving.contract import http_outputs, infer_inputs, requested_outputs

    for path in ("/v2/health/ready", "/v2", f"/v2/models/{DEFAULT_CLASSIFIER}",
                 f"/v2/models/{DEFAULT_CLASSIFIER}/config"):
        assert _http(server, "GET", path)[0] == 200, path
    status, text = _http(server, "POST", infer_path(), http_infer_body(["a fine day", "awful"]))
    assert status == 200, text
    assert len(http_outputs(json.loads(text))["LABEL"]) == 2
    client = grpcclient.InferenceServerClient(server.grpc_url)
    result = client.infer(DEFAULT_CLASSIFIER, infer_inputs(grpcclient, ["a fine day"]),
                          outputs=requested_outputs(grpcclient, ["LABEL"]))
    assert result.as_numpy("LABEL").size == 1
    assert client.get_model_config(DEFAULT_CLASSIFIER).config.name == DEFAULT_CLASSIFIER
    assert client.get_model_metadata(DEFAULT_CLASSIFIER).name == DEFAULT_CLASSIFIER
    client.close()


@pytest.mark.server
def test_supervisor_canary_passes_on_the_restricted_server(server):
    from serving.supervisor import Supervisor

    assert Supervisor(server.config)._canary(server) is None


# ----------------------------------------------------------------------------------- integrity

def _model_dir(repository: Path) -> Path:
    """The served model's version directory (where its python sources lie), as serving.repository reads it."""
    return read_repository(repository).model().onnx_path.parent


def _tampered(repository: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model_repository"
    shutil.copytree(repository, copy)
    with open(_model_dir(copy) / "model.py", "a", encoding="utf-8") as fh:
        fh.write("\nimport os  # planted\n")
    return copy


def test_serving_up_refuses_a_tampered_repository_naming_the_file(repository, tmp_path):
    tampered = _tampered(repository, tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "serving", "up", "--repository", str(tampered),
                           "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    last = proc.stderr.strip().splitlines()[-1]
    planted = (_model_dir(tampered) / "model.py").relative_to(tampered).as_posix()
    assert last.startswith("python -m serving: error:") and planted in last and "modified" in last
    assert "tritonserver ready" not in proc.stdout
    # --skip-verify (ServerConfig.skip_verify) is the way round for a person who knows why
    LocalTritonServer(ServerConfig(tampered, skip_verify=True))._check_repository()


def test_integrity_catches_missing_and_added_files_and_clears_bytecode(repository, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(repository, copy)
    clear_bytecode(copy)  # the module's server ran on it: the 2.51 stubs wrote __pycache__ there
    assert verify_repository(copy) == len(json.loads((copy / "provenance.json").read_text())["files"])
    version = _model_dir(copy)
    cache = version / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "model.cpython-311.pyc").write_bytes(b"planted")
    with pytest.raises(IntegrityError, match=r"__pycache__/model.cpython-311.pyc: not in provenance.json"):
        verify_repository(copy)
    assert clear_bytecode(copy) == 1 and verify_repository(copy)
    (version / "contract.py").unlink()
    with pytest.raises(IntegrityError, match=(version / "contract.py").relative_to(copy).as_posix() + ": missing"):
        verify_repository(copy)
    (copy / "provenance.json").unlink()
    with pytest.raises(IntegrityError, match="no provenance.json"):
        verify_repository(copy)


# ----------------------------------------------------------------------------------- keys and arguments

def test_admin_key_from_option_environment_or_random(repository, monkeypatch):
    monkeypatch.delenv("TRITON_ADMIN_KEY", raising=False)
    first, second = LocalTritonServer(ServerConfig(repository)), LocalTritonServer(ServerConfig(repository))
    assert len(first.admin_key) >= 32 and first.admin_key != second.admin_key  # random per start
    monkeypatch.setenv("TRITON_ADMIN_KEY", "k" * 20)
    assert LocalTritonServer(ServerConfig(repository)).admin_key == "k" * 20
    assert LocalTritonServer(ServerConfig(repository, admin_key="o" * 16)).admin_headers() == {ADMIN_HEADER: "o" * 16}
    with pytest.raises(ServerError, match="at least 16"):
        ServerConfig(repository, admin_key="short")
    monkeypatch.setenv("TRITON_ADMIN_KEY", "has:colon=and-more-chars")
    with pytest.raises(ServerError, match="TRITON_ADMIN_KEY"):
        LocalTritonServer(ServerConfig(repository)).admin_key  # noqa: B018 - the property validates


def test_one_builder_for_every_server(repository):
    """The local command line, the Deployment and KServe all carry the same restriction flags."""
    from serving import manifests as m

    local = LocalTritonServer(ServerConfig(repository, admin_key="a" * 32))
    local.http_port, local.grpc_port, local.metrics_port = 8000, 8001, 8002
    args = local.command(Path("/backends"))
    restriction = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={'a' * 32}"
    assert f"--http-restricted-api={restriction}" in args and f"--grpc-restricted-protocol={restriction}" in args
    config = m.ManifestConfig(image="r.example.com/t:1", repository_uri="s3://bucket/repo")
    pod_args = m.triton_args(config)
    assert {a.split("=", 1)[0] for a in pod_args[1:]} - {a.split("=", 1)[0] for a in args} == {"--allow-gpu-metrics"}
    assert f"--http-restricted-api={restriction.replace('a' * 32, '$(TRITON_ADMIN_KEY)')}" in pod_args
    assert TritonServerConfig(model_control_mode=None, strict_readiness=None, allow_metrics=None,
                              metrics_config=None).to_args_list() == []
    with pytest.raises(TritonArgsError):
        TritonServerConfig(restricted_apis=("shared-memory", "everything"))


def test_image_entrypoint_needs_a_key_and_restricts(tmp_path):
    script = REPO_ROOT / "serving" / "triton_args.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_ADMIN_KEY")}
    proc = subprocess.run([sys.executable, "-I", str(script), "exec"], capture_output=True, text=True, env=env,
                          timeout=30)
    assert proc.returncode == 2 and "TRITON_ADMIN_KEY" in proc.stderr
    from serving.triton_args import image_command

    cmd = image_command("k" * 32, ["--log-verbose=1"])
    assert cmd[:2] == ["/opt/nvidia/nvidia_entrypoint.sh", "tritonserver"] and cmd[-1] == "--log-verbose=1"
    assert any(a.startswith("--http-restricted-api=") for a in cmd)


def test_docker_files_are_hardened():
    docker = REPO_ROOT / "serving" / "docker"
    dockerfile = (docker / "Dockerfile").read_text()
    user = [ln.split()[1] for ln in dockerfile.splitlines() if ln.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert 'ENTRYPOINT ["python3", "/opt/textclf/triton_args.py", "exec"]' in dockerfile
    service = yaml.safe_load((docker / "docker-compose.yml").read_text())["services"]["triton"]
    assert all(p.startswith("${TRITON_BIND:-127.0.0.1}:") for p in service["ports"])
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert service["user"].split(":")[0] != "0" and "/tmp" in service["tmpfs"]
    assert service["environment"]["TRITON_ADMIN_KEY_FILE"] == "/run/secrets/triton_admin_key"
