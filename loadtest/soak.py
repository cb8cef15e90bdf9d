"""`python -m loadtest soak`: hold 70 % of the measured saturation for a long time and look for decay.

Steps (each logged with its time):
1. start tritonserver on the repository (LocalTritonServer: loopback, free ports);
2. saturation: a short closed-loop Locust run (no wait) -> requests/s;
3. soak: Locust with constant-throughput users whose rates add up to ``load_fraction`` of it, while a
   thread samples the resident memory (RSS) of tritonserver and its python-backend stubs with psutil;
4. verdict: it fails on any failed request, on p99 drift over ``max_p99_drift`` (the first window after
   warm-up vs the last window) or on RSS growth over ``max_rss_growth`` (same windows).

Chaos (``--chaos``): the server runs under the supervisor of ``serving up`` (serving.supervisor), the soak's
users send through ``serving.client`` with its retry policy (``TritonClientUser``), and a thread kills a
random python-backend stub with SIGKILL every ``chaos_interval`` and tritonserver itself once, half-way.
The verdict: every request answered correctly (0 failed after the client's retries) and every kill
recovered; each kill's outage (kill -> the supervisor's recovery: a reload of one model, or a restart of
the server) is recorded, the longest in ``chaos.longest_outage_s``. p99 drift and memory are reported but
not judged (the outages spike the p99, and a restart starts the memory over).

Window p99: Locust's history holds, every second, the p99 of the last ~10 s of requests; a window's p99
is the median of those rows inside it (robust to one slow second on a shared machine).
Everything lands in ``out`` (default results/soak-<time>/): summary.json, the Locust CSVs and reports,
rss.csv, and a plot.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from common.atomic import atomic_directory
from common.provenance import versions
from loadtest import progress
from loadtest.errors import LoadtestError
from loadtest.run import RunConfig, default_out, parse_duration, parse_protocol, run_locust, summarize
from serving.contract import Endpoint, Protocol
from serving.errors import ServingError
from serving.server import LocalTritonServer, ServerConfig
from serving.supervisor import Supervisor, SupervisorConfig, stub_processes

log = logging.getLogger(__name__)


@dataclass
class SoakConfig:
    repository: Path = field(default=Path("model_repository"), metadata={"help": "repository served during the soak"})
    duration: str = field(default="600s", metadata={"help": "soak length, e.g. 600, 10m"})
    saturation_duration: str = field(default="30s", metadata={"help": "closed-loop run that measures saturation"})
    saturation_users: int = field(default=16, metadata={"help": "users of the saturation run"})
    users: int = field(default=16, metadata={"help": "constant-throughput users of the soak"})
    load_fraction: float = field(default=0.7, metadata={"help": "share of saturation to hold"})
    protocol: Protocol = field(default=Protocol.HTTP, metadata={"help": "wire protocol"})
    texts_per_request: int = field(default=1, metadata={"help": "texts per request"})
    texts: Path | None = field(default=None,
                               metadata={"help": "CSV with a text column (default data/test.csv, else the corpus)"})
    warmup: str = field(default="60s", metadata={"help": "ignored at the start before the first window"})
    window: str = field(default="60s", metadata={"help": "length of the first and last windows compared"})
    max_p99_drift: float = field(default=0.10,
                                 metadata={"help": "largest allowed p99 growth, last vs first window (fraction)"})
    max_rss_growth: float = field(default=0.10,
                                  metadata={"help": "largest allowed server memory growth, last vs first window "
                                                    "(fraction)"})
    sample_interval_s: float = field(default=2.0, metadata={"help": "seconds between memory samples"})
    out: Path | None = field(default=None, metadata={"help": "report directory (default results/soak-<time>/)"})
    chaos: bool = field(default=False, metadata={
        "help": "kill -9 a python stub every --chaos-interval and tritonserver once, under the supervisor; users "
                "retry through serving.client; judge 0 lost requests and record the longest outage"})
    chaos_interval: str = field(default="120s", metadata={"help": "time between stub kills with --chaos"})
    client_retries: int = field(default=12, metadata={"help": "--chaos: retries of each user's client"})
    request_timeout: float = field(default=60.0, metadata={
        "help": "--chaos: seconds a request may take with its retries before it counts as lost"})
    seed: int = field(default=0, metadata={"help": "--chaos: which stub each kill picks"})
    duration_s: float = field(init=False, default=0.0)
    warmup_s: float = field(init=False, default=0.0)
    window_s: float = field(init=False, default=0.0)
    chaos_interval_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.protocol = parse_protocol(self.protocol)
        self.duration_s = parse_duration(self.duration)
        self.warmup_s = parse_duration(self.warmup) if str(self.warmup) not in ("0", "0s") else 0.0
        self.window_s = parse_duration(self.window)
        parse_duration(self.saturation_duration)
        if self.warmup_s + 2 * self.window_s > self.duration_s:
            raise LoadtestError(f"duration {self.duration_s:g}s is too short for warm-up {self.warmup_s:g}s "
                                f"and two {self.window_s:g}s windows")
        if not 0 < self.load_fraction <= 1:
            raise LoadtestError("--load-fraction must be in (0, 1]")
        if self.users < 1 or self.saturation_users < 1 or self.texts_per_request < 1:
            raise LoadtestError("--users, --saturation-users and --texts-per-request must be >= 1")
        if self.max_p99_drift <= 0 or self.max_rss_growth <= 0 or self.sample_interval_s <= 0:
            raise LoadtestError("--max-p99-drift, --max-rss-growth and the sample interval must be > 0")
        self.repository = Path(self.repository)
        if not self.repository.is_dir():
            raise LoadtestError(f"repository {self.repository} not found (run `python -m exporter build` first)")
        if self.texts is not None and not Path(self.texts).is_file():
            raise LoadtestError(f"texts file {self.texts} not found")
        self.out = Path(self.out) if self.out is not None else default_out("soak")
        self.chaos_interval_s = parse_duration(self.chaos_interval)
        if self.chaos and self.chaos_interval_s >= self.duration_s:
            raise LoadtestError(f"--chaos-interval {self.chaos_interval} leaves no kill within {self.duration}")
        if self.client_retries < 0 or self.request_timeout <= 0:
            raise LoadtestError("--client-retries must be >= 0 and --request-timeout > 0")


# ----------------------------------------------------------------------------------------- memory


def process_tree_rss(pid: int) -> dict[str, int]:
    """RSS in bytes of ``pid`` ('tritonserver') and of each child (stub instance name or pid)."""
    import psutil

    proc = psutil.Process(pid)
    out = {"tritonserver": proc.memory_info().rss}
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmd = child.cmdline()
            name = cmd[-2] if child.name() == "triton_python_backend_stub" and len(cmd) >= 3 else str(child.pid)
            out[name] = child.memory_info().rss
    return out


class RssSampler(threading.Thread):
    """Sample the RSS of a process tree every ``interval`` seconds until stopped (``pid`` may be a function:
    the server's pid now, which a restart changes)."""

    def __init__(self, pid: int | Callable[[], int | None], interval: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.loadavg: list[float] = []  # 1-minute load average: how shared the machine was
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                pid = self.pid() if callable(self.pid) else self.pid
                self.samples.append((time.time(), process_tree_rss(pid)))
            with contextlib.suppress(OSError):
                self.loadavg.append(os.getloadavg()[0])
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=self.interval + 5)


# ------------------------------------------------------------------------------------------- chaos


def chaos_plan(interval_s: float, duration_s: float) -> list[tuple[float, str]]:
    """(seconds into the soak, "stub" | "server"): a stub every ``interval_s`` and the server once, half an
    interval after the stub kill nearest the middle (so two recoveries never overlap)."""
    stubs = [k * interval_s for k in range(1, int(duration_s // interval_s) + 1) if k * interval_s < duration_s - 10]
    server = (int(duration_s / 2 // interval_s) + 0.5) * interval_s
    if server >= duration_s - 10:
        server = duration_s / 2
    return sorted([(t, "stub") for t in stubs] + [(server, "server")])


class Chaos(threading.Thread):
    """Kill -9 what the plan says, when it says, in the server a Supervisor runs; record each kill."""

    def __init__(self, supervisor, plan: list[tuple[float, str]], seed: int = 0) -> None:
        super().__init__(name="chaos", daemon=True)
        self.supervisor, self.plan, self.rng = supervisor, plan, random.Random(seed)
        self.kills: list[dict[str, Any]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        t0 = time.time()
        for at, kind in self.plan:
            if self._stop_event.wait(max(0.0, t0 + at - time.time())):
                return
            self._kill(kind, at)

    def _kill(self, kind: str, at: float) -> None:
        server = self.supervisor.server
        if server is None or not self.supervisor.ready:
            log.warning("chaos: the server is not ready at %.0f s; %s kill skipped", at, kind)
            self.kills.append({"kind": kind, "at_s": at, "skipped": True})
            return
        if kind == "server":
            target, pid = "tritonserver", server.process.pid
        else:
            stubs = stub_processes(server.process.pid)
            target = self.rng.choice(sorted(stubs))
            pid = stubs[target].pid
        killed_at = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.kills.append({"kind": kind, "at_s": at, "target": target, "pid": pid, "killed_at": killed_at})
        log.warning("chaos: kill -9 %s (pid %d) at %.0f s", target, pid, at)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def outcomes(self, events) -> list[dict[str, Any]]:
        """Each kill with the supervisor's recovery of it (the first event seen after it): its action and
        the outage, kill -> recovered (a reload: the model serves from fresh stubs; a restart: ready)."""
        out, used = [], set()
        for kill in self.kills:
            found = None
            if not kill.get("skipped"):
                found = next((i for i, e in enumerate(events)
                              if i not in used and e.detected_at >= kill["killed_at"] - 0.5), None)
            event = events[found] if found is not None else None
            used.add(found)
            outage = event.recovered_at - kill["killed_at"] if event is not None and event.recovered_at else None
            out.append({**kill, "action": event.action if event else None, "reason": event.reason if event else None,
                        "outage_s": outage})
        return out

    @staticmethod
    def unplanned(events, kills: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Recoveries no kill explains (the server failed on its own), with their outage."""
        explained = {k["reason"] for k in kills if k.get("reason")}
        return [e.as_dict() for e in events if e.reason not in explained]


def chaos_verdict(requests: int, failures: int, kills: list[dict[str, Any]]) -> dict[str, Any]:
    """Pass when every request was answered correctly (after the client's retries) and every kill was
    recovered; the longest outage is recorded."""
    reasons = []
    if requests == 0:
        reasons.append("no requests were made")
    if failures:
        reasons.append(f"{failures} of {requests} requests lost (failed after the client's retries)")
    done = [k for k in kills if not k.get("skipped")]
    if not any(k["kind"] == "stub" for k in done) or not any(k["kind"] == "server" for k in done):
        reasons.append(f"the plan was not carried out: {[(k['kind'], k.get('skipped', False)) for k in kills]}")
    unrecovered = [k for k in done if k["outage_s"] is None]
    if unrecovered:
        reasons.append(f"{len(unrecovered)} kill(s) not recovered: {[k['target'] for k in unrecovered]}")
    outages = [k["outage_s"] for k in done if k["outage_s"] is not None]
    return {"passed": not reasons, "reasons": reasons, "kills": kills,
            "longest_outage_s": max(outages, default=None),
            "longest_stub_outage_s": max((k["outage_s"] for k in done if k["kind"] == "stub" and k["outage_s"]),
                                         default=None),
            "server_outage_s": next((k["outage_s"] for k in done if k["kind"] == "server"), None)}


# ----------------------------------------------------------------------------------------- verdict


def window_values(points: list[tuple[float, float]], start: float, end: float) -> list[float]:
    return [v for t, v in points if start <= t <= end and v is not None]


def drift(first: list[float], last: list[float]) -> float | None:
    """Relative change of the median from the first to the last window (None without data)."""
    if not first or not last:
        return None
    a, b = statistics.median(first), statistics.median(last)
    return (b - a) / a if a > 0 else None


def verdict(cfg: SoakConfig, requests: int, failures: int, p99_points: list[tuple[float, float]],
            rss_points: list[tuple[float, float]], t_start: float, t_end: float) -> dict[str, Any]:
    """The soak's pass/fail, its reasons and the figures behind them (times are seconds since the start)."""
    first = (t_start + cfg.warmup_s, t_start + cfg.warmup_s + cfg.window_s)
    last = (t_end - cfg.window_s, t_end)
    p99_first, p99_last = window_values(p99_points, *first), window_values(p99_points, *last)
    rss_first, rss_last = window_values(rss_points, *first), window_values(rss_points, *last)
    p99_drift, rss_growth = drift(p99_first, p99_last), drift(rss_first, rss_last)
    reasons = []
    if requests == 0:
        reasons.append("no requests were made")
    if failures:
        reasons.append(f"{failures} of {requests} requests failed")
    if p99_drift is None:
        reasons.append("no p99 figures in the first or last window")
    elif p99_drift > cfg.max_p99_drift:
        reasons.append(f"p99 drifted {p99_drift:+.1%} (limit {cfg.max_p99_drift:.0%})")
    if rss_growth is None:
        reasons.append("no memory samples in the first or last window")
    elif rss_growth > cfg.max_rss_growth:
        reasons.append(f"server RSS grew {rss_growth:+.1%} (limit {cfg.max_rss_growth:.0%})")
    return {
        "passed": not reasons, "reasons": reasons,
        "windows_s": {"first": [first[0] - t_start, first[1] - t_start], "last": [last[0] - t_start, last[1] - t_start]},
        "p99_ms": {"first": statistics.median(p99_first) if p99_first else None,
                   "last": statistics.median(p99_last) if p99_last else None, "drift": p99_drift},
        "rss_mb": {"first": statistics.median(rss_first) / 2**20 if rss_first else None,
                   "last": statistics.median(rss_last) / 2**20 if rss_last else None, "growth": rss_growth},
    }


def _plot(p99: list[tuple[float, float]], rss: list[tuple[float, float]], t0: float, png: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot([t - t0 for t, _ in p99], [v for _, v in p99], color="tab:red", label="p99 ms (10 s window)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("p99 ms")
    ax2 = ax.twinx()
    ax2.plot([t - t0 for t, _ in rss], [v / 2**20 for _, v in rss], color="tab:blue", label="server RSS MiB")
    ax2.set_ylabel("RSS MiB")
    ax.set_title(title)
    fig.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- run


def _history_p99(history_csv: Path) -> list[tuple[float, float]]:
    import csv

    if not history_csv.is_file():
        return []
    out = []
    with open(history_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row.get("Name") != "Aggregated" or not float(row.get("Total Request Count") or 0):
                continue
            with contextlib.suppress(TypeError, ValueError):
                p99 = float(row["99%"])
                if p99 > 0:
                    out.append((float(row["Timestamp"]), p99))
    return out


def _start_server(cfg: SoakConfig):
    """A LocalTritonServer; with ``--chaos`` a Supervisor (``serving up``'s recovery) running one."""
    try:
        if cfg.chaos:
            return Supervisor(ServerConfig(cfg.repository), SupervisorConfig(check_interval_s=1.0)).start()
        server = LocalTritonServer(ServerConfig(cfg.repository))
        server.start()
    except ServingError as exc:
        raise LoadtestError(f"could not start tritonserver: {exc}") from exc
    return server


def _server_pid(server) -> int | None:
    """tritonserver's pid now (a Supervisor's changes when it restarts the server)."""
    inner = getattr(server, "server", server)  # Supervisor.server, or the LocalTritonServer itself
    return inner.process.pid if inner is not None and inner.process is not None else None


def _server_host(server, protocol: Protocol) -> str:
    """The Locust host (with its scheme) of a LocalTritonServer for ``protocol``."""
    address = server.http_url if protocol is Protocol.HTTP else server.grpc_url
    return Endpoint(address, protocol).url


def _locust(run_cfg: RunConfig, host: str, workdir: Path, label: str) -> dict[str, Any]:
    """One Locust run with a progress bar; its summary."""
    t0 = time.perf_counter()
    with progress.timed(label, run_cfg.duration_s):
        run_locust(run_cfg, host, workdir)
    return summarize(run_cfg, workdir, host, time.perf_counter() - t0, None)


def _saturation(cfg: SoakConfig, host: str, workdir: Path) -> tuple[RunConfig, dict[str, Any]]:
    """A short closed-loop run: the saturating requests/s."""
    sat_cfg = RunConfig(users=cfg.saturation_users, spawn_rate=cfg.saturation_users,
                        duration=cfg.saturation_duration, protocol=cfg.protocol,
                        texts_per_request=cfg.texts_per_request, host=host, texts=cfg.texts, out=workdir)
    sat = _locust(sat_cfg, host, workdir, f"saturation ({cfg.saturation_users} closed-loop users)")
    if not sat["requests_per_s"] or sat["failures"]:
        raise LoadtestError(f"saturation run: {sat['requests']} requests, {sat['failures']} failed")
    return sat_cfg, sat


def _soak(cfg: SoakConfig, host: str, workdir: Path, server, rate: float):
    """Constant-throughput users at ``rate`` req/s each while the server's RSS is sampled (and, with
    ``--chaos``, its processes killed: the users then retry through serving.client)."""
    soak_cfg = RunConfig(users=cfg.users, spawn_rate=cfg.users, duration=f"{cfg.duration_s:g}s",
                         protocol=cfg.protocol, texts_per_request=cfg.texts_per_request, host=host,
                         texts=cfg.texts, out=workdir, request_rate=rate,
                         client_retries=cfg.client_retries if cfg.chaos else 0,
                         request_timeout=cfg.request_timeout if cfg.chaos else 30.0)
    sampler = RssSampler(lambda: _server_pid(server), cfg.sample_interval_s)
    chaos = Chaos(server, chaos_plan(cfg.chaos_interval_s, cfg.duration_s), cfg.seed) if cfg.chaos else None
    sampler.start()
    t_start = time.time()
    if chaos is not None:
        chaos.start()
    label = f"soak at {cfg.load_fraction:.0%} of saturation" + (" with chaos" if chaos else "")
    try:
        soak = _locust(soak_cfg, host, workdir, label)
    finally:
        t_end = time.time()
        sampler.stop()
        if chaos is not None:
            chaos.stop()
    return soak, sampler, t_start, t_end, chaos


def _write_rss(path: Path, samples: list[tuple[float, dict[str, int]]]) -> None:
    names = sorted({k for _, v in samples for k in v})
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("timestamp,total," + ",".join(names) + "\n")
        for t, v in samples:
            fh.write(f"{t:.3f},{sum(v.values())}," + ",".join(str(v.get(n, "")) for n in names) + "\n")


def _summary(cfg: SoakConfig, result: dict[str, Any], sat_cfg: RunConfig, sat: dict[str, Any], soak: dict[str, Any],
             sampler: RssSampler, rate: float) -> dict[str, Any]:
    return {
        **result,
        "saturation": {"requests_per_s": sat["requests_per_s"], "users": cfg.saturation_users,
                       "duration_s": sat_cfg.duration_s, "latency_ms": sat["latency_ms"]},
        "soak": {"target_requests_per_s": rate * cfg.users, "requests_per_s": soak["requests_per_s"],
                 "users": cfg.users, "rate_per_user": rate, "duration_s": cfg.duration_s,
                 "requests": soak["requests"], "failures": soak["failures"],
                 "latency_ms": soak["latency_ms"], "top_failures": soak["top_failures"]},
        "rss_samples": len(sampler.samples),
        "machine": {"cpus": os.cpu_count(),
                    "loadavg_1m_median": statistics.median(sampler.loadavg) if sampler.loadavg else None,
                    "loadavg_1m_max": max(sampler.loadavg, default=None)},
        "config": {**asdict(cfg), "protocol": cfg.protocol.value},
        "versions": versions(("locust", "tritonclient", "nvidia-pytriton", "onnxruntime", "numpy")),
        "out": str(cfg.out.absolute()),
    }


def _judge(cfg: SoakConfig, soak: dict[str, Any], p99, rss, t_start: float, t_end: float, chaos, server):
    """The verdict: drift and memory; with chaos, 0 lost requests and every kill recovered instead (the
    drift and memory figures stay in the summary, unjudged)."""
    result = verdict(cfg, soak["requests"], soak["failures"], p99, rss, t_start, t_end)
    if chaos is None:
        return result
    events = list(server.events)
    outcome = chaos_verdict(soak["requests"], soak["failures"], chaos.outcomes(events))
    outcome["unplanned"] = chaos.unplanned(events, outcome["kills"])
    result["unjudged"] = {"reasons": result["reasons"]}
    result.update(passed=outcome["passed"], reasons=outcome["reasons"], chaos=outcome)
    return result


def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    """Measure saturation, soak at ``load_fraction`` of it (with ``chaos``: kills), judge; the summary is
    also summary.json."""
    t_begin = time.perf_counter()

    def stage(msg: str) -> None:
        log.info("[%6.1f s] %s", time.perf_counter() - t_begin, msg)

    server = _start_server(cfg)
    stage(f"tritonserver ready (pid {_server_pid(server)}){' under the supervisor, chaos on' if cfg.chaos else ''}")
    host = _server_host(server, cfg.protocol)
    try:
        with atomic_directory(cfg.out) as tmp:
            (tmp / "saturation").mkdir()
            (tmp / "soak").mkdir()
            stage(f"saturation: {cfg.saturation_users} closed-loop users for {cfg.saturation_duration}")
            sat_cfg, sat = _saturation(cfg, host, tmp / "saturation")
            rate = cfg.load_fraction * sat["requests_per_s"] / cfg.users
            stage(f"saturation {sat['requests_per_s']:.1f} req/s (p99 {sat['latency_ms']['p99']} ms); soak at "
                  f"{rate * cfg.users:.1f} req/s = {cfg.users} users x {rate:.3f} req/s for {cfg.duration_s:g} s")
            soak, sampler, t_start, t_end, chaos = _soak(cfg, host, tmp / "soak", server, rate)
            if not cfg.chaos:
                server.check()  # still alive and ready after the soak
            elif not server.ready:
                raise LoadtestError(f"the server is not ready after the chaos soak: {server.status()['reason']}")
            stage("soak done; judging")
            p99 = _history_p99(tmp / "soak" / "locust_stats_history.csv")
            rss = [(t, sum(v.values())) for t, v in sampler.samples]
            result = _judge(cfg, soak, p99, rss, t_start, t_end, chaos, server)
            _write_rss(tmp / "rss.csv", sampler.samples)
            summary = _summary(cfg, result, sat_cfg, sat, soak, sampler, rate)
            title = f"soak at {cfg.load_fraction:.0%} of {sat['requests_per_s']:.0f} req/s"
            summary["plot"] = "soak.png" if _plot(p99, rss, t_start, tmp / "soak.png", title) else None
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    finally:
        server.stop()
    stage(f"{'PASSED' if summary['passed'] else 'FAILED'}: wrote {cfg.out}")
    return summary
