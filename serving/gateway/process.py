"""Running the gateway: in this process on uvicorn (``python -m serving gateway``), or as a child process
beside tritonserver that ``serving up --gateway-port`` starts, watches and restarts when it dies."""
from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from serving.errors import GatewayError
from serving.gateway.config import API_KEY_ENV, API_KEY_FILE_ENV, GatewayConfig
from serving.server import free_port, start_watchdog, stop_watchdog

log = logging.getLogger(__name__)

GRACE_S = 15.0  # a stopped gateway's time to finish its requests (uvicorn allows 10) before SIGKILL


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run_gateway(config: GatewayConfig) -> int:
    """Serve until SIGTERM/SIGINT (uvicorn's own handlers stop it gracefully); uvloop and httptools when
    installed, no access log (a line per request costs more than the translation)."""
    import uvicorn

    from serving.gateway.app import build_app

    app = build_app(config)
    uvicorn.run(app, host=config.host, port=config.port, loop="uvloop" if _have("uvloop") else "asyncio",
                http="httptools" if _have("httptools") else "h11", access_log=False, log_level="warning",
                server_header=False, timeout_graceful_shutdown=10)
    return 0


class GatewayProcess:
    """``python -m serving gateway`` as a child process; ``start`` waits until it answers ``/health``, a
    watcher thread restarts it when it exits (``restarts`` counts them) until ``stop``."""

    def __init__(self, config: GatewayConfig, *, startup_timeout_s: float = 60.0, check_interval_s: float = 1.0):
        if config.port == 0:
            config.port = free_port(config.host)
        self.config = config
        self.startup_timeout_s, self.check_interval_s = startup_timeout_s, check_interval_s
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._watchdog = None  # serving.watchdog: stops the gateway when this process dies, SIGKILL included
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"http://{host}:{self.config.port}"

    def command(self) -> list[str]:
        c = self.config
        return [sys.executable, "-m", "serving", "gateway", "--repository", str(Path(c.repository).absolute()),
                "--triton-url", c.triton_url, "--host", c.host, "--port", str(c.port),
                "--max-body-bytes", str(c.max_body_bytes), "--max-rows", str(c.max_rows),
                "--max-text-chars", str(c.max_text_chars), "--channels", str(c.channels),
                "--timeout", str(c.timeout_s)]

    def _spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in (API_KEY_ENV, API_KEY_FILE_ENV)}
        if self.config.api_key:
            env[API_KEY_ENV] = self.config.api_key  # the environment, not the command line (ps shows that)
        self.process = subprocess.Popen(self.command(), env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        stop_watchdog(self._watchdog)  # the watchdog of a gateway that died (it has exited by itself)
        self._watchdog = start_watchdog(self.process.pid, GRACE_S, what="gateway")
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise GatewayError(f"the gateway exited with code {self.process.returncode} during start-up")
            if self._answers():
                log.info("gateway ready at %s (pid %d)", self.url, self.process.pid)
                return
            time.sleep(0.1)
        self._terminate()
        raise GatewayError(f"the gateway did not answer at {self.url} within {self.startup_timeout_s:.0f} s")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # 503: it runs, tritonserver is not ready
        except OSError:
            return False

    def start(self) -> "GatewayProcess":
        self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="gateway-watcher", daemon=True)
        self._watcher.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.check_interval_s):
            proc = self.process
            if proc is None or proc.poll() is None:
                continue
            log.error("the gateway exited with code %s; restarting it", proc.returncode)
            try:
                self._spawn()
                self.restarts += 1
            except GatewayError as exc:
                log.error("could not restart the gateway: %s", exc)

    def _terminate(self) -> int | None:
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        stop_watchdog(self._watchdog)
        self._watchdog = None
        return proc.returncode

    def stop(self) -> int | None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=self.startup_timeout_s + 5)
        return self._terminate()

    def __enter__(self) -> "GatewayProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
