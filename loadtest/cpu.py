"""Who used the CPU during a load point: the client, tritonserver's core, and each python-backend stub
(tokenizer, encoder, postprocess), from the process tree's CPU times. On a 2-core machine this says
what limits the served numbers."""
from __future__ import annotations

import os
import time
from pathlib import Path


def _role(cmdline: list[str], root_pid: int, pid: int) -> str:
    if pid == root_pid:
        return "tritonserver"
    for arg in cmdline:
        if arg.endswith("/model.py"):
            return Path(arg).parent.parent.name  # <repo>/<model>/<version>/model.py
    return "other"


def snapshot(server_pid: int | None) -> dict[str, float]:
    """CPU seconds so far by role; 'client' is this process, '_wall' a monotonic clock."""
    import psutil

    out: dict[str, float] = {"_wall": time.monotonic(), "client": time.process_time()}
    if server_pid is None:
        return out
    try:
        root = psutil.Process(server_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            role = _role(p.cmdline(), server_pid, p.pid)
        except psutil.Error:
            continue
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def cores_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Average cores used by each role between two snapshots (1.0 = one core busy all the time)."""
    wall = after["_wall"] - before["_wall"]
    if wall <= 0:
        return {}
    used = {k: round((after[k] - before.get(k, 0.0)) / wall, 3) for k in after if k != "_wall"}
    used["total"] = round(sum(used.values()), 3)
    used["machine_cores"] = float(os.cpu_count() or 1)
    return used


def busy_processes(sample_s: float = 1.0, threshold: float = 10.0, limit: int = 5) -> list[dict]:
    """Other processes using more than ``threshold`` % of a core over ``sample_s``: noise for a benchmark."""
    import psutil

    me = os.getpid()
    procs = []
    for p in psutil.process_iter(["pid", "name"]):
        if p.pid == me:
            continue
        try:
            p.cpu_percent(None)
            procs.append(p)
        except psutil.Error:
            continue
    time.sleep(sample_s)
    busy = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
            if pct >= threshold:
                busy.append({"pid": p.pid, "cpu_percent": round(pct, 1), "cmd": " ".join(p.cmdline())[:120]})
        except psutil.Error:
            continue
    return sorted(busy, key=lambda b: -b["cpu_percent"])[:limit]
