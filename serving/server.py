"""`LocalTritonServer`: the real tritonserver bundled in `nvidia-pytriton`, run on this machine's CPU.

The python backend needs a stub built for the running Python; it is copied next to a copy of
`libtriton_python.so` in a private backend directory. The stub embeds libpython, so the server gets
`LD_LIBRARY_PATH` with the interpreter's LIBDIR and `PYTHONPATH` with its site-packages (see DESIGN.md).
Endpoints bind 127.0.0.1 unless asked otherwise; port 0 picks a free port.

Security (docs/SECURITY.md): the repository is checked against the hashes in its provenance.json before
anything loads from it, and the admin APIs (shared memory, model repository, logging, trace, statistics)
are restricted to a header key: the configured one, else ``TRITON_ADMIN_KEY``, else a random key per start.
``server.admin_headers()`` gives the header a tool sends. The bundled Triton 2.51 has published CVEs fixed
only in NGC 25.07+: keep it on loopback.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from serving.errors import RepositoryError, ServerError
from serving.triton_args import (ADMIN_HEADER, TritonArgsError, TritonServerConfig, check_admin_key,
                                 grpc_admin_header, key_from_environment, new_admin_key)

log = logging.getLogger(__name__)

_LOAD_FAILED = re.compile(r"failed to load '([^']+)' version \d+: (.*)")
_INDEX_ROW = re.compile(r"^\|\s*(\S+)\s*\|\s*\d+\s*\|\s*(UNAVAILABLE: .*?)\s*\|\s*$")


@dataclass
class ServerConfig:
    """How to run the local server. A port of 0 means: pick a free one."""

    repository: Path = field(metadata={"help": "model repository to serve"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (loopback only by default)"})
    http_port: int = field(default=0, metadata={"help": "HTTP port; 0 picks a free port"})
    grpc_port: int = field(default=0, metadata={"help": "gRPC port; 0 picks a free port"})
    metrics_port: int = field(default=0, metadata={"help": "Prometheus metrics port; 0 picks a free port"})
    log_file: Path | None = field(default=None, metadata={"help": "server log (default: a temporary file)"})
    startup_timeout_s: float = field(default=120.0,
                                     metadata={"help": "seconds to wait for the server and every model"})
    exit_timeout_s: int = field(default=10, metadata={"help": "seconds tritonserver may take to stop"})
    log_verbose: int = field(default=0, metadata={"help": "tritonserver --log-verbose level"})
    validate: bool = field(default=True,
                           metadata={"help": "check the repository offline (serving.repository layout) before "
                                             "starting"})
    extra_args: tuple[str, ...] = field(default_factory=tuple, metadata={"help": "more tritonserver arguments"})
    admin_key: str | None = field(default=None, repr=False, metadata={
        "help": "key of the restricted admin APIs, sent as header 'triton-admin-key' (default: $TRITON_ADMIN_KEY, "
                "else a random key per start); see docs/SECURITY.md"})
    skip_verify: bool = field(default=False, metadata={
        "help": "start even if the repository differs from the hashes in its provenance.json (know why)"})

    def __post_init__(self) -> None:
        self.repository = Path(self.repository)
        if self.log_file is not None:
            self.log_file = Path(self.log_file)
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ServerError(f"{name} must be in 0..65535, got {port}")
        if self.startup_timeout_s <= 0 or self.exit_timeout_s < 0:
            raise ServerError("startup_timeout_s must be > 0 and exit_timeout_s >= 0")
        if self.admin_key is not None:
            try:
                check_admin_key(self.admin_key)
            except TritonArgsError as exc:
                raise ServerError(str(exc)) from None


def tritonserver_dir() -> Path:
    """The `pytriton/tritonserver` directory of the installed nvidia-pytriton wheel."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed; it provides the tritonserver binary")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise ServerError(f"no tritonserver binary in {root / 'bin'}")
    return root


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host if host not in ("0.0.0.0", "") else "127.0.0.1", 0))
        return sock.getsockname()[1]


def _prepare_backends(root: Path, workdir: Path) -> Path:
    """A private backend directory: python backend + the stub for this Python version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no python-backend stub for Python {version}")
    backends = workdir / "backends"
    shutil.copytree(root / "backends", backends, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    return backends


def _server_env() -> dict[str, str]:
    env = os.environ.copy()
    libdirs = [sysconfig.get_config_var("LIBDIR") or ""]
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        libs = Path(list(spec.submodule_search_locations)[0]).parent / "nvidia_pytriton.libs"
        if libs.is_dir():
            libdirs.append(str(libs))
    env["LD_LIBRARY_PATH"] = os.pathsep.join([d for d in libdirs if d] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    paths = sysconfig.get_paths()
    site = [paths["purelib"], paths["platlib"]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(site + [env.get("PYTHONPATH", "")])).rstrip(":")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("TRITON_ADMIN_KEY", None)  # the server gets the key on its command line, its stubs need not
    return env


def start_watchdog(pid: int, grace_s: float, what: str = "tritonserver") -> tuple[subprocess.Popen, int] | None:
    """serving.watchdog beside the process ``pid`` (``what``: tritonserver, or the gateway; the leader of its own
    process group): it stops that process, then kills what is left of its group (stubs), when this process
    dies or closes the returned pipe end. (the watchdog, the pipe's write end), or None if it could not start
    (logged)."""
    read, write = os.pipe()  # not inheritable: only this process holds the write end
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", str(Path(__file__).with_name("watchdog.py")), str(read),
                                 str(pid), f"{grace_s:g}"], pass_fds=(read,), stdin=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError as exc:
        os.close(write)
        log.warning("no watchdog for %s pid %d: %s", what, pid, exc)
        return None
    finally:
        os.close(read)
    return proc, write


def stop_watchdog(watchdog: tuple[subprocess.Popen, int] | None) -> None:
    """Close the watchdog's pipe (it kills what is left of the server's group, then exits) and reap it."""
    if watchdog is None:
        return
    proc, write = watchdog
    os.close(write)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def model_errors(log_text: str) -> dict[str, str]:
    """Model name -> its load error, parsed from a tritonserver log."""
    errors: dict[str, str] = {}
    for line in log_text.splitlines():
        match = _LOAD_FAILED.search(line)
        if match:
            errors.setdefault(match.group(1), match.group(2).strip())
            continue
        match = _INDEX_ROW.match(line.strip())
        if match:
            errors.setdefault(match.group(1), match.group(2).strip())
    return errors


class LocalTritonServer:
    """Start tritonserver on a repository; ``with LocalTritonServer(cfg) as server: server.http_url``."""

    def __init__(self, config: ServerConfig | Path | str, **kwargs) -> None:
        self.config = config if isinstance(config, ServerConfig) else ServerConfig(Path(config), **kwargs)
        self.process: subprocess.Popen | None = None
        self.start_seconds: float | None = None
        self._workdir: Path | None = None
        self._log_path: Path | None = None
        self._log_handle = None
        self.http_port = self.grpc_port = self.metrics_port = 0
        self._admin_key: str | None = None
        self._watchdog: tuple[subprocess.Popen, int] | None = None

    # -- the admin key (restricted APIs)
    @property
    def admin_key(self) -> str:
        """The key of this start: configured, else $TRITON_ADMIN_KEY, else random (fixed at start)."""
        if self._admin_key is None:
            key = self.config.admin_key or key_from_environment()
            if key:
                try:
                    check_admin_key(key)
                except TritonArgsError as exc:
                    raise ServerError(f"TRITON_ADMIN_KEY: {exc}") from None
            self._admin_key = key or new_admin_key()
        return self._admin_key

    @property
    def admin_header(self) -> str:
        return ADMIN_HEADER

    def admin_headers(self, protocol: str = "http") -> dict[str, str]:
        """The header (HTTP) or metadata (gRPC: ``triton-grpc-protocol-`` prefix) that opens the admin APIs."""
        name = grpc_admin_header(ADMIN_HEADER) if str(getattr(protocol, "value", protocol)) == "grpc" else ADMIN_HEADER
        return {name: self.admin_key}

    # -- endpoints
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def log_text(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(encoding="utf-8", errors="replace")

    # -- life cycle
    def triton_config(self, backends: Path) -> TritonServerConfig:
        """The tritonserver flags of this start (serving.triton_args builds the command line)."""
        cfg = self.config
        return TritonServerConfig(
            model_repository=str(cfg.repository.absolute()), backend_directory=str(backends),
            exit_on_error=True, exit_timeout_secs=cfg.exit_timeout_s,
            http_address=cfg.host, http_port=self.http_port, grpc_address=cfg.host, grpc_port=self.grpc_port,
            metrics_address=cfg.host, metrics_port=self.metrics_port, log_verbose=cfg.log_verbose,
            admin_key=self.admin_key, model_control_mode="explicit", load_model="*",
        )

    def command(self, backends: Path) -> list[str]:
        binary = str(tritonserver_dir() / "bin" / "tritonserver")
        return [binary, *self.triton_config(backends).to_args_list(), *self.config.extra_args]

    def start(self) -> "LocalTritonServer":
        """Start the server and wait until it and every model are ready; raise ServerError if not."""
        if self.process is not None:
            raise ServerError("server already started")
        cfg = self.config
        self._check_repository()
        self._pick_ports()
        self._workdir = Path(tempfile.mkdtemp(prefix="tritonserver-"))
        backends = _prepare_backends(tritonserver_dir(), self._workdir)
        self._log_path = cfg.log_file.absolute() if cfg.log_file else self._workdir / "tritonserver.log"
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self._log_path.stat().st_size if self._log_path.exists() else 0
        self._log_handle = open(self._log_path, "ab")
        cmd = self.command(backends)
        log.info("starting tritonserver on %s (http %d, grpc %d, metrics %d), log %s",
                 cfg.host, self.http_port, self.grpc_port, self.metrics_port, self._log_path)
        log.debug("command: %s", " ".join(cmd).replace(self.admin_key, "***"))
        t0 = time.perf_counter()
        self.process = subprocess.Popen(
            cmd, stdout=self._log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=_server_env(), cwd=self._workdir, start_new_session=True)
        # stops it (and kills its stubs) when this process dies, however it dies and whichever thread started
        # it: a parent-death signal would fire when that THREAD ends (the supervisor restarts from its own)
        self._watchdog = start_watchdog(self.process.pid, cfg.exit_timeout_s + 5)
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.perf_counter() - t0
        log.info("tritonserver ready in %.1f s: http %s, grpc %s", self.start_seconds, self.http_url, self.grpc_url)
        return self

    def _check_repository(self) -> None:
        """Integrity (hashes of provenance.json) unless skipped, then the offline layout check."""
        from serving.integrity import clear_bytecode, verify_repository
        from serving.repository import validate_repository

        cfg = self.config
        if not cfg.repository.is_dir():
            raise (RepositoryError if cfg.validate else ServerError)(f"repository not found: {cfg.repository}")
        if cfg.skip_verify:
            log.warning("not verifying %s against its provenance.json (skip_verify)", cfg.repository)
        else:
            clear_bytecode(cfg.repository)  # derived, never trusted: the stubs write it again
            verify_repository(cfg.repository)  # IntegrityError (a RepositoryError) naming the file
        if cfg.validate:
            validate_repository(cfg.repository)  # RepositoryError: a clear line before any server starts

    def _pick_ports(self) -> None:
        taken: set[int] = set()
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self.config, name)
            while port == 0 or port in taken:
                port = free_port(self.config.host)
            taken.add(port)
            setattr(self, name, port)

    def _new_log(self) -> str:
        return self.log_text()[self._log_offset:] if self._log_offset else self.log_text()

    def _failure(self, what: str) -> ServerError:
        text = self._new_log()
        errors = model_errors(text)
        if errors:
            detail = "; ".join(f"model '{m}' failed to load: {e}" for m, e in errors.items())
        else:
            tail = [ln for ln in text.strip().splitlines() if ln.strip()][-3:]
            detail = " | ".join(tail) or "no log output"
        return ServerError(f"tritonserver {what}: {detail} (log: {self._log_path})")

    def _wait_ready(self, t0: float) -> None:
        deadline = t0 + self.config.startup_timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise self._failure(f"exited with code {code} during start-up")
            if self._ready():
                not_ready = self._models_not_ready()
                if not not_ready:
                    return
            errors = model_errors(self._new_log())
            if errors:  # a model failed; with --exit-on-error the server is about to exit
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=self.config.exit_timeout_s + 5)
                raise self._failure("could not load every model")
            if time.perf_counter() > deadline:
                raise self._failure(f"not ready after {self.config.startup_timeout_s:.0f} s")
            time.sleep(0.2)

    def _http(self, method: str, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://{self.http_url}{path}", method=method,
                                     data=b"{}" if method == "POST" else None, headers=self.admin_headers())
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (OSError, urllib.error.URLError):
            return 0, b""

    def _ready(self) -> bool:
        return self._http("GET", "/v2/health/ready")[0] == 200

    def _models_not_ready(self) -> list[str]:
        """Models with no READY version (the index lists each version; an old one may be UNLOADING)."""
        status, body = self._http("POST", "/v2/repository/index")
        if status != 200:
            return ["<repository index unavailable>"]
        rows = json.loads(body)
        ready = {m.get("name") for m in rows if m.get("state") == "READY"}
        return sorted({m.get("name", "?") for m in rows} - ready)

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check(self) -> None:
        """Raise ServerError if the server process has died or is no longer ready."""
        if self.process is None:
            raise ServerError("server not started")
        code = self.process.poll()
        if code is not None:
            raise self._failure(f"died with exit code {code}")
        if not self._ready():
            raise self._failure("is running but not ready")

    def stop(self) -> int | None:
        """SIGTERM, wait up to the exit timeout (+5 s), then SIGKILL; return the exit code."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=self.config.exit_timeout_s + 5)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not stop within %d s; killing it", self.config.exit_timeout_s + 5)
                    self.process.kill()
                    self.process.wait()
            code = self.process.returncode
        stop_watchdog(self._watchdog)
        self._watchdog = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._workdir is not None:
            if self.config.log_file is None and code not in (0, None):
                shutil.rmtree(self._workdir / "backends", ignore_errors=True)
                log.info("tritonserver log kept at %s", self._log_path)
            else:
                shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code

    def __enter__(self) -> "LocalTritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def stop_signals():
    """Record SIGTERM/SIGINT in the yielded dict (``stop["signal"]``) instead of dying; restore on exit."""
    stop: dict[str, int | None] = {"signal": None}

    def handler(signum, _frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, prev in old.items():
            signal.signal(sig, prev)


def serve_forever(config: ServerConfig, on_ready=None) -> int:
    """Run the server until SIGTERM/SIGINT (then stop it gracefully) or until it dies (non-zero)."""
    with stop_signals() as stop:
        server = LocalTritonServer(config)
        server.start()
        try:
            if on_ready is not None:
                on_ready(server)
            while stop["signal"] is None:
                if not server.is_alive():
                    raise server._failure(f"died with exit code {server.process.returncode}")
                time.sleep(0.5)
            log.info("signal %s: stopping tritonserver", signal.Signals(stop["signal"]).name)
        finally:
            code = server.stop()
        return 0 if code in (0, None) else 1
