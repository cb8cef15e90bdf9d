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

A dead stub is recovered WITHOUT restarting tritonserver (``reload_models``, on by default): the server
runs under explicit model control, so the supervisor reloads only the model whose stub died through the
repository API with the admin key (serving.control: fresh stubs, the same version); the model's other
instances and every other model keep answering meanwhile. Only when that load fails, or the server
itself is gone (exit code, refused connection) or wedged (``canary_failures`` slow canaries in a row),
does it restart the whole server: it marks itself not ready (``ready`` is False and the status says
why), logs an error, stops the broken instance with a short exit timeout (SIGTERM,
``broken_exit_timeout_s``, then SIGKILL), removes the dead instance's python-backend shared-memory
regions, and starts a new tritonserver on the same ports. More than ``max_restarts`` restarts within
``restart_window_s`` is a crash loop: it gives up and ``wait`` raises ServerError.

New versions (``watch_repository``, on by default): on every check it looks at the repository's
``provenance.json``; when a build changed it, it verifies the whole repository against the recorded
hashes (serving.integrity) and the layout, then loads each model whose files changed, one at a time,
while the old version keeps answering (Triton loads the new version before it unloads the old one). A
repository that fails verification is refused with one log line and the old versions keep serving.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from serving.contract import DEFAULT_CLASSIFIER, http_infer_body, infer_path
from serving.errors import ServerError, ServingError
from serving.server import LocalTritonServer, ServerConfig, stop_signals

log = logging.getLogger(__name__)

STUB_NAME = "triton_python_backend_stub"
UNHEALTHY_STUB = "is not healthy"  # Triton 2.51: "Stub process '<instance>' is not healthy."
_INSTANCE = re.compile(r"^(.+)_\d+_\d+$")  # instance name <model>_<group>_<index>
_UNHEALTHY = re.compile(r"Stub process '([^']+)' is not healthy")


def instance_model(instance: str) -> str:
    """The model of a python-backend instance name (``classifier_0_1`` -> ``classifier``)."""
    match = _INSTANCE.match(instance)
    return match.group(1) if match else instance


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
    reload_models: bool = field(default=True, metadata={
        "help": "recover a dead python stub by reloading only its model through the repository API "
                "(explicit model control, admin key); off: restart the whole server"})
    watch_repository: bool = field(default=True, metadata={
        "help": "serve a new version written into the repository (verified against its provenance.json) "
                "without a command"})
    load_timeout_s: float = field(default=120.0, metadata={
        "help": "seconds one model load may take; a server that does not answer by then is restarted"})

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
    action: str = "restart"  # "restart" (the whole server) or "reload <model>" (one model, server kept)
    settled_at: float | None = None  # reload: the replaced instances' stubs gone too (restart: = recovered_at)

    @property
    def down_s(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.detected_at

    def as_dict(self) -> dict[str, Any]:
        return {"detected_at": self.detected_at, "reason": self.reason, "recovered_at": self.recovered_at,
                "down_s": self.down_s, "error": self.error, "action": self.action, "settled_at": self.settled_at}


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


def _live_stubs(pid: int) -> list[tuple[str, Any]]:
    """(instance name, process) of every live (not zombie) stub under tritonserver ``pid``; after a load an
    instance name can have two (the old instance's, still unloading, and the new one's)."""
    psutil = _psutil()
    found = []
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    for child in children:
        with contextlib.suppress(psutil.Error):
            if child.name() == STUB_NAME and child.status() != psutil.STATUS_ZOMBIE:
                cmd = child.cmdline()
                found.append((cmd[-2] if len(cmd) >= 3 else str(child.pid), child))
    return found


def _provenance_digest(repository: Path) -> str | None:
    """SHA-256 of the repository's provenance.json (None while it is missing, e.g. mid-swap)."""
    from serving.repository import PROVENANCE

    try:
        return hashlib.sha256((Path(repository) / PROVENANCE).read_bytes()).hexdigest()
    except OSError:
        return None


def _model_files(provenance: dict[str, Any], names: list[str]) -> dict[str, str]:
    """The recorded hashes of the files of the given model directories."""
    files = provenance.get("files") or {}
    return {rel: digest for rel, digest in files.items() if rel.split("/", 1)[0] in names}


_IN_FLIGHT = re.compile(r"Found (\d+) model versions that have in-flight inferences")


def _drained(log_text: str) -> bool:
    """Whether a stopping tritonserver reported no in-flight inference before its exit timeout expired."""
    found = _IN_FLIGHT.findall(log_text)
    return bool(found) and found[-1] == "0" and "Exit timeout expired" in log_text


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
        self._wedged: str | None = None  # set when a version load found the server not answering
        self._urls = ("", "", "")
        self._suspects: tuple[str, ...] = ()  # models whose stub the last check found dead
        self._repo_digest: str | None = None  # provenance.json of the repository being served
        self._repo_refused: str | None = None  # a changed provenance.json that failed verification
        self.loads: list[dict[str, Any]] = []  # versions loaded from the watched repository
        self._served_provenance: dict[str, Any] = {}  # the provenance.json of what is served
        self._leftovers: list[Any] = []  # stubs of replaced instances that Triton never finished unloading

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
                "loads": list(self.loads),
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
        self._repo_digest = _provenance_digest(self.server_config.repository)
        self._served_provenance = self._read_provenance()
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
            stubs = list(self._stubs.values())
        code = server.stop() if server is not None else None
        if code not in (0, None) and any(e.action != "restart" for e in self.events) and _drained(server.log_text()):
            log.warning("tritonserver used its whole exit timeout on the instance a reload replaced after its stub "
                        "died (Triton 2.51 never finishes unloading it); no request was in flight: a clean stop")
            code = 0
        psutil = _psutil()
        for proc in [*stubs, *self._leftovers]:  # the server is gone; a stub that outlived it serves nothing
            with contextlib.suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    log.warning("stub pid %d outlived tritonserver; killing it", proc.pid)
                    proc.kill()
        return code

    def __enter__(self) -> "Supervisor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _read_provenance(self) -> dict[str, Any]:
        from serving.repository import PROVENANCE

        try:
            return json.loads((Path(self.server_config.repository) / PROVENANCE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def wait(self, stop: Callable[[], bool], poll_s: float = 0.5) -> None:
        """Block until ``stop()`` is true; raise ServerError if the supervisor gave up."""
        while not stop():
            if self._fatal is not None:
                raise self._fatal
            time.sleep(poll_s)

    # -- checks
    def check_once(self) -> str | None:
        """One round of checks; the reason the server is broken, or None. A dead stub also names its
        model in ``self._suspects`` (reloading it may be enough)."""
        self._suspects = ()
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
                self._suspects = (instance_model(name),)
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
                found = _UNHEALTHY.search(text)
                self._suspects = (instance_model(found.group(1)) if found else self.config.canary_model,)
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
                if reason is None and self.config.watch_repository:
                    self.check_repository()
                    # a load that gets no answer means a wedged server (on 2.51 this was a metric series freed
                    # under the new instances, fixed in serving/models/metrics.py); a restart serves the newest
                    # version on disk
                    reason, self._wedged = self._wedged, None
            except Exception as exc:  # noqa: BLE001 - a bug in a check must not kill the watcher
                log.exception("supervisor check failed")
                reason = None
                del exc
            if reason is None or self._stop.is_set():
                continue
            try:
                self.recover(reason, self._suspects)
            except ServingError as exc:  # e.g. a repository that fails verification cannot be restarted
                self._fatal = exc
                log.error("supervisor gave up: %s", exc)
                return

    # -- recovery
    def recover(self, reason: str, models: tuple[str, ...] = ()) -> RestartEvent:
        """Reload ``models`` when that can fix it (a dead stub), else (or when the load fails) restart."""
        if models and self.config.reload_models:
            try:
                return self.reload(reason, models)
            except ServingError as exc:  # a failed load, or a repository that no longer verifies
                log.error("reloading %s failed (%s); restarting tritonserver", ", ".join(models), exc)
                reason = f"{reason}; reload failed: {exc}"
        return self.restart(reason)

    def _control(self, server: LocalTritonServer):
        from serving.control import ModelControl

        return ModelControl(server.http_url, server.admin_key, timeout_s=self.config.load_timeout_s)

    def _verify(self) -> None:
        """The repository still matches its provenance (code is about to be loaded from it)."""
        from serving.integrity import clear_bytecode, verify_repository
        from serving.repository import validate_repository

        if not self.server_config.skip_verify:
            clear_bytecode(self.server_config.repository)
            verify_repository(self.server_config.repository)
        validate_repository(self.server_config.repository)

    def reload(self, reason: str, models: tuple[str, ...]) -> RestartEvent:
        """Reload only ``models`` (fresh stubs, the same version); the server and other models keep serving."""
        event = RestartEvent(time.time(), reason, action=f"reload {', '.join(models)}")
        with self._restart_lock:
            server = self.server
            if server is None:
                raise ServerError("no server")
            log.error("%s; reloading model %s (tritonserver pid %d and the other models keep serving)", reason,
                      ", ".join(models), server.process.pid)
            self.events.append(event)
            try:
                self._verify()
                control = self._control(server)
                old = self._old_stubs(server, models)
                for name in models:
                    control.reload(name)
                event.recovered_at = time.time()  # fresh instances serve from here
                log.warning("model %s reloaded %.1f s after: %s", ", ".join(models), event.down_s, reason)
                self._settle(server, old)
            except ServingError as exc:  # RepositoryError and ModelControlError included
                event.error = str(exc)
                raise
            event.settled_at = time.time()
        if self.on_restart is not None:
            self.on_restart(self, event)
        return event

    def _old_stubs(self, server: LocalTritonServer, models) -> set[int]:
        """Pids of the live stubs of ``models`` before a load (the instances the load replaces)."""
        return {proc.pid for name, proc in _live_stubs(server.process.pid) if instance_model(name) in models}

    def _settle(self, server: LocalTritonServer, old: set[int]) -> None:
        """After a load: watch the new stubs, not the replaced instances' (``old`` pids), and remove the
        shared-memory regions of stubs that are gone. Measured on 2.51: when a stub died with requests in
        flight, the old instance never finishes unloading and its healthy stubs stay, serving nothing. They
        are left alone (killing one was followed by a tritonserver crash, boost lock_exception, twice in
        five tries) and stopped with the server."""
        deadline = time.time() + 5.0  # replaced instances unload within a second or two when nothing is stuck
        live = _live_stubs(server.process.pid)
        while any(proc.pid in old for _, proc in live) and time.time() < deadline:
            time.sleep(0.1)
            live = _live_stubs(server.process.pid)
        stubs = {name: proc for name, proc in live if proc.pid not in old}
        known = {p.pid for p in self._leftovers}
        leftover = [proc for _, proc in live if proc.pid in old and proc.pid not in known]
        in_use = set(_shm_regions({str(proc.pid): proc for _, proc in live}))
        with self._lock:
            previous, self._stubs, self._regions = self._regions, stubs, _shm_regions(stubs)
            self._leftovers = [p for p in self._leftovers if p.is_running()] + leftover
        if leftover:
            log.warning("stub(s) %s of the replaced instances still run (Triton 2.51 has not finished unloading "
                        "them); left alone until the server stops", ", ".join(str(p.pid) for p in leftover))
        for region in set(previous) - in_use:
            with contextlib.suppress(OSError):
                os.unlink(Path("/dev/shm") / region)

    def check_repository(self) -> list[str]:
        """Serve what a build wrote since the last look: verify the repository, then load each model whose
        files changed (its new version) while the old one keeps answering. Returns the models loaded."""
        from serving.errors import RepositoryError
        from serving.repository import read_repository

        digest = _provenance_digest(self.server_config.repository)
        if digest is None or digest in (self._repo_digest, self._repo_refused):
            return []
        with self._restart_lock:
            server = self.server
            if server is None:
                return []
            t0 = time.time()
            try:
                before = self._served_provenance
                self._verify()
                info = read_repository(self.server_config.repository)
            except RepositoryError as exc:
                self._repo_refused = digest
                log.error("the repository changed but is refused, the served versions stay: %s", exc)
                return []
            changed = [m for m in info.models.values()
                       if _model_files(info.provenance, m.model_names) != _model_files(before, m.model_names)]
            old = self._old_stubs(server, {n for m in changed for n in m.model_names})
            loaded = self._load_versions(server, changed, t0)
            if changed:
                self._settle(server, old)
            if len(loaded) < len(changed):
                self._repo_refused = digest  # retried when the repository changes again
            else:
                self._repo_digest, self._served_provenance = digest, info.provenance
        return loaded

    def _load_versions(self, server: LocalTritonServer, changed, t0: float) -> list[str]:
        """Load each changed model (its newest version); one that fails to load keeps its old version."""
        control, loaded = self._control(server), []
        for m in changed:
            try:
                seconds = control.load(m.name)
            except ServerError as exc:  # Triton keeps serving the loaded version when a load fails
                log.error("model %s: version %d failed to load, the served version stays: %s", m.name, m.version,
                          exc)
                if "cannot reach" in str(exc):  # no answer at all: the server is wedged (2.51, see below)
                    self._wedged = f"tritonserver stopped answering while loading {m.name} version {m.version}"
                continue
            loaded.append(m.name)
            self.loads.append({"model": m.name, "version": m.version, "seen_at": t0, "load_s": seconds,
                               "served_at": time.time()})
            log.warning("model %s: version %d verified and served (loaded in %.1f s, %.1f s after the "
                        "repository change was seen)", m.name, m.version, seconds, time.time() - t0)
        return loaded

    def restart(self, reason: str) -> RestartEvent:
        """Mark not ready, stop the broken instance quickly, start a new one on the same ports."""
        event = RestartEvent(time.time(), reason)
        with self._restart_lock:
            with self._lock:  # held briefly: status() must answer during a restart
                self._ready, self._reason = False, reason
            log.error("tritonserver is broken: %s; NOT READY, restarting it", reason)
            recent = [e for e in self.events if e.action == "restart"
                      and event.detected_at - e.detected_at < self.config.restart_window_s]
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
                self._repo_digest = _provenance_digest(self.server_config.repository)
                self._served_provenance = self._read_provenance()  # a start loads the repository as it is
                with self._lock:
                    self.server, self._stubs, self._regions = server, stubs, _shm_regions(stubs)
                    self._canary_misses = 0
                    self._ready, self._reason = True, ""
                event.recovered_at = event.settled_at = time.time()
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
        for child in [*stubs.values(), *self._leftovers]:
            with contextlib.suppress(psutil.Error):
                child.kill()
        self._leftovers = []
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
