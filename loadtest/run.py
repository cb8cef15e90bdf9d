"""`python -m loadtest run`: headless Locust as a subprocess, then summary.json, a PNG and a table."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.atomic import atomic_directory
from common.provenance import versions
from loadtest.errors import LoadtestError
from loadtest.report import plot_history, read_history, read_locust_failures, read_locust_stats
from loadtest.serve import served
from serving.contract import DEFAULT_CLASSIFIER, Protocol

log = logging.getLogger(__name__)

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
PREFIX = "locust"


USER_CLASS = {Protocol.HTTP: "TritonHttpUser", Protocol.GRPC: "TritonGrpcUser"}
CLIENT_USER_CLASS = "TritonClientUser"  # through serving.client and its retries (either protocol)


def parse_protocol(value: str | Protocol) -> Protocol:
    """``http`` or ``grpc``; anything else is a user error."""
    try:
        return Protocol(value)
    except ValueError as exc:
        raise LoadtestError(f"protocol must be http or grpc, got {value!r}") from exc


def parse_duration(text: str | int | float) -> float:
    """Seconds from ``90``, ``90s``, ``2m``, ``1h30m`` (Locust's -t syntax)."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        s = text.strip().lower()
        if re.fullmatch(r"\d+(\.\d+)?", s):
            seconds = float(s)
        else:
            parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", s)
            if not parts or "".join(n + u for n, u in parts) != s:
                raise LoadtestError(f"bad duration {text!r} (use e.g. 30s, 2m, 1h30m)")
            seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise LoadtestError(f"duration must be positive, got {text!r}")
    return seconds


def default_out(prefix: str) -> Path:
    return Path("results") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


@dataclass
class RunConfig:
    """One headless Locust run against a served classifier."""

    users: int = field(default=32, metadata={"help": "simulated users"})
    spawn_rate: float = field(default=8.0, metadata={"help": "users started per second"})
    duration: str = field(default="60s", metadata={"help": "run length, e.g. 60s, 5m"})
    protocol: Protocol = field(default=Protocol.HTTP, metadata={"help": "wire protocol"})
    texts_per_request: int = field(default=1, metadata={"help": "texts per request"})
    start_server: bool = field(default=False, metadata={"help": "start a local tritonserver on --repository"})
    repository: Path = field(default=Path("model_repository"),
                             metadata={"help": "repository served by --start-server"})
    host: str | None = field(default=None,
                             metadata={"help": "server URL: http://HOST:PORT (http) or HOST:PORT (grpc)"})
    texts: Path | None = field(default=None,
                               metadata={"help": "CSV with a text column (default data/test.csv, else the corpus)"})
    out: Path | None = field(default=None, metadata={"help": "report directory (default results/loadtest-<time>/)"})
    processes: int | None = field(default=None,
                                  metadata={"help": "Locust worker processes (distributed mode; -1: one per core)"})
    request_rate: float = field(default=0.0, metadata={"help": "requests/s per user (0: closed loop)"})
    fail_on_error: bool = field(default=False, metadata={"help": "exit 1 if any request failed"})
    model_name: str = field(default=DEFAULT_CLASSIFIER, metadata={"help": "served model name"})
    client_retries: int = field(default=0, metadata={
        "help": "> 0: users send through serving.client with this many retries (TritonClientUser), so a "
                "request fails only when the client gives up"})
    request_timeout: float = field(default=30.0, metadata={"help": "seconds before a request counts as failed"})
    duration_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.protocol = parse_protocol(self.protocol)
        self.duration_s = parse_duration(self.duration)
        if self.users < 1:
            raise LoadtestError("--users must be >= 1")
        if self.spawn_rate <= 0:
            raise LoadtestError("--spawn-rate must be > 0")
        if self.texts_per_request < 1:
            raise LoadtestError("--texts-per-request must be >= 1")
        if self.processes is not None and self.processes != -1 and self.processes < 1:
            raise LoadtestError("--processes must be >= 1 (or -1: one per CPU core)")
        if self.request_rate < 0:
            raise LoadtestError("--request-rate must be >= 0")
        if self.client_retries < 0 or self.request_timeout <= 0:
            raise LoadtestError("--client-retries must be >= 0 and --request-timeout > 0")
        if self.start_server and self.host:
            raise LoadtestError("give either --host or --start-server, not both")
        if not self.start_server and not self.host:
            raise LoadtestError("give --host URL of a running server, or --start-server")
        if self.start_server and not Path(self.repository).is_dir():
            raise LoadtestError(f"repository {self.repository} not found (run `python -m exporter build` first)")
        if self.texts is not None and not Path(self.texts).is_file():
            raise LoadtestError(f"texts file {self.texts} not found")
        self.repository = Path(self.repository)
        if self.out is None:
            self.out = default_out("loadtest")
        self.out = Path(self.out)


def locust_command(cfg: RunConfig, host: str, workdir: Path) -> list[str]:
    """The Locust command line for ``cfg`` writing its CSV/HTML/log into ``workdir``."""
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(cfg.users), "-r", f"{cfg.spawn_rate:g}", "-t", f"{cfg.duration_s:g}s",
        "--host", host, "--csv", str(workdir / PREFIX), "--csv-full-history", "--json-file", str(workdir / PREFIX),
        "--html", str(workdir / "report.html"), "--only-summary",
        "--exit-code-on-error", "0", "--stop-timeout", "10",
        "--loglevel", "WARNING", "--logfile", str(workdir / "locust.log"),
        "--texts-per-request", str(cfg.texts_per_request), "--model-name", cfg.model_name,
        "--request-rate", f"{cfg.request_rate:g}", "--request-timeout", f"{cfg.request_timeout:g}",
    ]
    if cfg.client_retries:
        cmd += ["--client-retries", str(cfg.client_retries)]
    if cfg.texts is not None:
        cmd += ["--texts", str(Path(cfg.texts).absolute())]
    if cfg.processes is not None:
        cmd += ["--processes", str(cfg.processes)]
    cmd.append(CLIENT_USER_CLASS if cfg.client_retries else USER_CLASS[cfg.protocol])
    return cmd


def _child_env() -> dict[str, str]:
    """The environment for Locust: the repository root importable (for `loadtest.*`), hubs offline."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_locust(cfg: RunConfig, host: str, workdir: Path) -> int:
    """Run Locust to completion; its stdout/stderr go to ``workdir/locust.out``. Return its exit code."""
    cmd = locust_command(cfg, host, workdir)
    log.info("locust: %d users (%s), %s texts/request, %gs against %s",
             cfg.users, cfg.protocol.value, cfg.texts_per_request, cfg.duration_s, host)
    log.debug("command: %s", " ".join(cmd))
    timeout = cfg.duration_s + 120 + cfg.users / cfg.spawn_rate
    with open(workdir / "locust.out", "wb") as out:
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=_child_env(), timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise LoadtestError(f"locust did not finish within {timeout:.0f}s") from exc
    if proc.returncode != 0:
        tail = (workdir / "locust.out").read_text(errors="replace")[-800:]
        raise LoadtestError(f"locust exited with {proc.returncode}: {tail.strip().splitlines()[-1:] or ''}")
    return proc.returncode


def summarize(cfg: RunConfig, workdir: Path, host: str, wall_s: float, server: dict[str, Any] | None) -> dict:
    """summary.json content from Locust's final stats (and its failures CSV)."""
    stats = read_locust_stats(workdir / f"{PREFIX}.json")
    total = stats["total"]
    return {
        "protocol": cfg.protocol.value,
        "host": host,
        "users": cfg.users,
        "spawn_rate": cfg.spawn_rate,
        "duration_s": cfg.duration_s,
        "processes": cfg.processes,
        "request_rate_per_user": cfg.request_rate,
        "texts_per_request": cfg.texts_per_request,
        "texts": str(cfg.texts) if cfg.texts else None,
        "requests": total["requests"],
        "failures": total["failures"],
        "failure_ratio": total["failure_ratio"],
        "requests_per_s": total["requests_per_s"],
        "texts_per_s": total["requests_per_s"] * cfg.texts_per_request,
        "latency_ms": total["latency_ms"],
        "per_name": stats["per_name"],
        "top_failures": read_locust_failures(workdir / f"{PREFIX}_failures.csv"),
        "server": server,
        "wall_s": round(wall_s, 2),
        "versions": versions(("locust", "tritonclient", "gevent", "grpcio", "numpy")),
    }


def run_loadtest(cfg: RunConfig) -> dict[str, Any]:
    """Run the whole load test into ``cfg.out`` atomically; return the summary (also summary.json)."""
    with contextlib.ExitStack() as stack:
        server_info = None
        host = cfg.host
        if cfg.start_server:
            endpoints = stack.enter_context(served(cfg.repository))
            host = endpoints.url(cfg.protocol)
            server_info = {"repository": str(cfg.repository.absolute()), **endpoints.as_dict()}
        assert host is not None
        with atomic_directory(cfg.out) as tmp:
            t0 = time.perf_counter()
            run_locust(cfg, host, tmp)
            summary = summarize(cfg, tmp, host, time.perf_counter() - t0, server_info)
            png = tmp / "throughput_latency.png"
            history = read_history(tmp / f"{PREFIX}_stats_history.csv")
            title = f"{cfg.protocol.value}, {cfg.users} users, {cfg.texts_per_request} texts/request"
            summary["plot"] = png.name if plot_history(history, png, title) else None
            summary["out"] = str(cfg.out.absolute())
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str) + "\n")
    log.info("wrote %s", cfg.out)
    return summary
