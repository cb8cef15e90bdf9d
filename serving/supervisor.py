"""A supervisor for the local tritonserver: notice a broken server and restart it on the same ports.

Why: on the bundled Triton 2.51 a python-backend stub that dies (OOM killer, ``kill -9``, a segfault in
a native library) is not restarted. The model keeps reporting ready while every request fails with 500
"Stub process '<model>_0_0' is not healthy", and a graceful shutdown then waits the whole exit timeout
(see DESIGN.md, "Known traps"). Nothing inside Triton recovers, so something outside must.

What it watches, every ``check_interval_s``:
- the tritonserver process (exit code);
- its ``triton_python_backend_stub`` children, recorded by instance name (``classifier_0_0``) at start-up:
  one gone or a zombie is a failure at once;
- a canary inference (one short text through the served model, over HTTP): a 500 that names an unhealthy
  stub, or no connection, is a failure; 503 (queue full) and a slow answer are load, not failure, unless
  ``canary_failures`` of them come in a row.

On a failure it marks itself not ready (``ready`` is False and the status says why), logs an error,
stops the broken instance with a short exit timeout (SIGTERM, ``broken_exit_timeout_s``, then SIGKILL),
removes the dead instance's python-backend shared-memory regions, and starts a new tritonserver on the
same ports. More than ``max_restarts`` restarts within ``restart_window_s`` is a crash loop: it gives up
and ``wait`` raises ServerError.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from serving.contract import DEFAULT_CLASSIFIER, http_infer_body, infer_path
from serving.errors import ServerError
from serving.server import LocalTritonServer, ServerConfig, stop_signals

log = logging.getLogger(__name__)

STUB_NAME = "triton_python_backend_stub"
UNHEALTHY_STUB = "is not healthy"  # Triton 2.51: "Stub process '<instance>' is not healthy."


def canary_request(repository: Path, model: str | None, text: str) -> tuple[str, bytes]:
    """The canary's model and HTTP body: ``model``, else a model the repository serves (``classifier`` when it
    serves one), asked for every output with the inputs its contract takes (a text pair too for a reranker)."""
    from serving.errors import ServingError
    from serving.repository import read_repository

    try:
        served = read_repository(repository).models
    except (ServingError, OSError):
        served = {}
    name = model or (DEFAULT_CLASSIFIER if DEFAULT_CLASSIFIER in served or not served else sorted(served)[0])
    pairs = [text] if name in served and served[name].contract.text_pair else None
    return name, json.dumps(http_infer_body([text], pairs, outputs=())).encode()


@dataclass
class SupervisorConfig:
    """How often to check, what counts as broken, and how hard to try to recover."""

    check_interval_s: float = field(default=2.0, metadata={"help": "seconds between supervisor checks"})
    canary: bool = field(default=True,
                         metadata={"help": "classify a canary text on every check (detects a dead python stub)"})
    canary_model: str | None = field(default=None, metadata={
        "help": "model the canary request goes to (default: one the repository serves, 'classifier' first)"})
    canary_text: str = field(default="supervisor canary", metadata={"help": "text of the canary request"})
    canary_timeout_s: float = field(default=10.0, metadata={"help": "seconds a canary may take"})
    canary_failures: int = field(default=3,
                                 metadata={"help": "slow / 503 canaries in a row before a restart (a stub error "
                                                   "restarts at once)"})
    broken_exit_timeout_s: float = field(default=2.0, metadata={"help": "seconds a broken server may take to stop"})
    max_restarts: int = field(default=5,
                              metadata={"help": "restarts allowed within --restart-window before giving up"})
    restart_window_s: float = field(default=600.0, metadata={"help": "seconds over which restarts are counted"})

    def __post_init__(self) -> None:
        if self.check_interval_s <= 0 or self.canary_timeout_s <= 0 or self.broken_exit_timeout_s < 0:
            raise ServerError("check_interval_s and canary_timeout_s must be > 0, broken_exit_timeout_s >= 0")
        if self.canary_failures < 1 or self.max_restarts < 0 or self.restart_window_s <= 0:
            raise ServerError("canary_failures must be >= 1, max_restarts >= 0, restart_window_s > 0")


@dataclass
class RestartEvent:
    """One recovery: when the failure was seen, why, and how long the service was down."""

    detected_at: float  # time.time()
    reason: str
    recovered_at: float | None = None
    error: str | None = None

    @property
    def down_s(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.detected_at

    def as_dict(self) -> dict[str, Any]:
        return {"detected_at": self.detected_at, "reason": self.reason, "recovered_at": self.recovered_at,
                "down_s": self.down_s, "error": self.error}


def _psutil():
    import psutil

    return psutil


def stub_processes(pid: int) -> dict[str, Any]:
    """The python-backend stubs under tritonserver ``pid``, keyed by instance name (e.g. ``classifier_0_0``)."""
    psutil = _psutil()
    stubs = {}
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    for child in children:
        try:
            if child.name() != STUB_NAME:
                continue
            cmd = child.cmdline()
        except psutil.Error:
            continue
        # argv: stub model.py shm_region shm_default shm_growth parent_pid backend_dir ipc_bytes INSTANCE KIND
        name = cmd[-2] if len(cmd) >= 3 else str(child.pid)
        stubs[name] = child
    return stubs


def _shm_regions(stubs: dict[str, Any]) -> list[str]:
    regions = []
    for proc in stubs.values():
        with contextlib.suppress(Exception):
            regions += [a for a in proc.cmdline() if a.startswith("triton_python_backend_shm_region")]
    return regions


class Supervisor:
    """Run a LocalTritonServer and keep it serving: ``with Supervisor(cfg) as sup: sup.http_url``."""

    def __init__(self, server_config: ServerConfig, config: SupervisorConfig | None = None,
                 on_restart: Callable[["Supervisor", RestartEvent], None] | None = None) -> None:
        self.server_config = server_config
        self.config = config or SupervisorConfig()
        self.on_restart = on_restart
        self.server: LocalTritonServer | None = None
        self.events: list[RestartEvent] = []
        self._ready = False
        self._reason = "not started"
        self._stubs: dict[str, Any] = {}
        self._regions: list[str] = []
        self._lock = threading.RLock()
        self._restart_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fatal: ServerError | None = None
        self._canary_misses = 0
        self._canary_req: tuple[str, bytes] | None = None
        self._urls = ("", "", "")

    # -- what a caller sees
    @property
    def ready(self) -> bool:
        return self._ready and self._fatal is None

    def status(self) -> dict[str, Any]:
        with self._lock:
            server = self.server
            return {
                "ready": self.ready,
                "reason": None if self.ready else (str(self._fatal) if self._fatal else self._reason),
                "pid": server.process.pid if server and server.process else None,
                "stubs": {name: proc.pid for name, proc in self._stubs.items()},
                "restarts": [e.as_dict() for e in self.events],
            }

    @property
    def admin_key(self) -> str | None:
        """The key of the restricted admin APIs (the same across restarts); None before start."""
        return self.server_config.admin_key if self.server is not None else None

    @property
    def http_url(self) -> str:
        return self._urls[0]

    @property
    def grpc_url(self) -> str:
        return self._urls[1]

    @property
    def metrics_url(self) -> str:
        return self._urls[2]

    # -- life cycle
    def start(self) -> "Supervisor":
        """Start tritonserver (ServerError if it cannot), pin its ports for restarts, start watching."""
        server = LocalTritonServer(self.server_config)
        server.start()
        # restarts reuse the ports and the admin key the first start picked (tools keep working)
        self.server_config = replace(self.server_config, http_port=server.http_port, grpc_port=server.grpc_port,
                                     metrics_port=server.metrics_port, admin_key=server.admin_key)
        self._urls = (server.http_url, server.grpc_url, server.metrics_url)  # the same after a restart
        with self._lock:
            self.server = server
            self._stubs = stub_processes(server.process.pid)
            self._regions = _shm_regions(self._stubs)  # recorded while alive: a dead stub's cmdline is gone
            self._ready, self._reason = True, ""
        log.info("supervising tritonserver pid %d (stubs: %s), checks every %.1f s", server.process.pid,
                 ", ".join(f"{n}={p.pid}" for n, p in sorted(self._stubs.items())) or "none",
                 self.config.check_interval_s)
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="triton-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int | None:
        """Stop watching, then stop the server gracefully (its full exit timeout); return its exit code."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.canary_timeout_s + 30)
            self._thread = None
        with self._restart_lock, self._lock:
            self._ready, self._reason = False, "stopped"
            server, self.server = self.server, None
        return server.stop() if server is not None else None

    def __enter__(self) -> "Supervisor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait(self, stop: Callable[[], bool], poll_s: float = 0.5) -> None:
        """Block until ``stop()`` is true; raise ServerError if the supervisor gave up."""
        while not stop():
            if self._fatal is not None:
                raise self._fatal
            time.sleep(poll_s)

    # -- checks
    def check_once(self) -> str | None:
        """One round of checks; the reason the server is broken, or None."""
        with self._lock:
            server, stubs = self.server, dict(self._stubs)
        if server is None or server.process is None:
            return "no server"
        code = server.process.poll()
        if code is not None:
            return f"tritonserver exited with code {code}"
        psutil = _psutil()
        for name, proc in sorted(stubs.items()):
            try:
                alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            if not alive:
                return f"python-backend stub '{name}' (pid {proc.pid}) is gone"
        if self.config.canary:
            return self._canary(server)
        return None

    def _canary(self, server: LocalTritonServer) -> str | None:
        if self._canary_req is None:  # read the repository once: the model the canary asks, and its inputs
            self._canary_req = canary_request(self.server_config.repository, self.config.canary_model,
                                              self.config.canary_text)
        model, body = self._canary_req
        req = urllib.request.Request(f"http://{server.http_url}{infer_path(model)}", data=body,
                                     headers={"Content-Type": "application/json"})  # inference: open
        hard, soft = None, None
        try:
            with urllib.request.urlopen(req, timeout=self.config.canary_timeout_s) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", "replace")[:300]
            if UNHEALTHY_STUB in text:
                hard = f"canary: {exc.code} {text}"
            else:
                soft = f"canary: {exc.code} {text}"
        except (TimeoutError, OSError) as exc:  # URLError is an OSError
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ConnectionRefusedError):
                hard = f"canary: connection refused ({server.http_url})"
            else:
                soft = f"canary: {type(reason).__name__}: {reason}"
        if hard:
            return hard
        if soft:
            self._canary_misses += 1
            log.warning("%s (%d of %d before a restart)", soft, self._canary_misses, self.config.canary_failures)
            return soft if self._canary_misses >= self.config.canary_failures else None
        self._canary_misses = 0
        return None

    def _watch(self) -> None:
        while not self._stop.wait(self.config.check_interval_s):
            try:
                reason = self.check_once()
            except Exception as exc:  # noqa: BLE001 - a bug in a check must not kill the watcher
                log.exception("supervisor check failed")
                reason = None
                del exc
            if reason is None or self._stop.is_set():
                continue
            try:
                self.restart(reason)
            except ServerError as exc:
                self._fatal = exc
                log.error("supervisor gave up: %s", exc)
                return

    # -- recovery
    def restart(self, reason: str) -> RestartEvent:
        """Mark not ready, stop the broken instance quickly, start a new one on the same ports."""
        event = RestartEvent(time.time(), reason)
        with self._restart_lock:
            with self._lock:  # held briefly: status() must answer during a restart
                self._ready, self._reason = False, reason
            log.error("tritonserver is broken: %s; NOT READY, restarting it", reason)
            recent = [e for e in self.events if event.detected_at - e.detected_at < self.config.restart_window_s]
            self.events.append(event)
            if len(recent) >= self.config.max_restarts:
                event.error = f"{len(recent)} restarts within {self.config.restart_window_s:.0f} s"
                raise ServerError(f"tritonserver keeps failing ({event.error}); last failure: {reason}")
            self._kill_broken()
            last: ServerError | None = None
            for attempt in range(3):
                server = LocalTritonServer(self.server_config)
                try:
                    server.start()
                except ServerError as exc:  # e.g. a port still held by a dying process
                    last = exc
                    log.warning("restart attempt %d failed: %s", attempt + 1, exc)
                    time.sleep(1.0)
                    continue
                stubs = stub_processes(server.process.pid)
                with self._lock:
                    self.server, self._stubs, self._regions = server, stubs, _shm_regions(stubs)
                    self._canary_misses = 0
                    self._ready, self._reason = True, ""
                event.recovered_at = time.time()
                log.warning("tritonserver restarted (pid %d) %.1f s after: %s", server.process.pid,
                            event.down_s, reason)
                break
            else:
                event.error = str(last)
                raise ServerError(f"could not restart tritonserver after: {reason}: {last}")
        if self.on_restart is not None:
            self.on_restart(self, event)
        return event

    def _kill_broken(self) -> None:
        with self._lock:
            server, stubs, regions = self.server, dict(self._stubs), list(self._regions)
            self.server, self._stubs, self._regions = None, {}, []
        if server is None:
            return
        proc = server.process
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.config.broken_exit_timeout_s)
            except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
                log.warning("broken tritonserver pid %d did not stop in %.1f s; killing it", proc.pid,
                            self.config.broken_exit_timeout_s)
                proc.kill()
                proc.wait()
        psutil = _psutil()
        for child in stubs.values():
            with contextlib.suppress(psutil.Error):
                child.kill()
        server.stop()
        for region in regions:
            with contextlib.suppress(OSError):
                os.unlink(Path("/dev/shm") / region)


def supervise_forever(config: ServerConfig, supervisor_config: SupervisorConfig | None = None,
                      on_ready=None) -> int:
    """Like ``serving.server.serve_forever``, with the supervisor restarting a broken server.

    SIGTERM/SIGINT stop it gracefully (accepted requests finish within the exit timeout) -> 0; a crash
    loop the supervisor gives up on -> ServerError.
    """
    with stop_signals() as stop:
        supervisor = Supervisor(config, supervisor_config)
        supervisor.start()
        try:
            if on_ready is not None:
                on_ready(supervisor.server)
            supervisor.wait(lambda: stop["signal"] is not None)
            log.info("signal %s: stopping tritonserver", signal.Signals(stop["signal"]).name)
        finally:
            code = supervisor.stop()
        return 0 if code in (0, None) else 1
