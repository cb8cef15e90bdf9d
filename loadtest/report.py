"""Readers and writers for load-test reports: Locust's final stats -> summary dict, history -> PNG, Markdown tables."""
from __future__ import annotations

import collections
import csv
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from loadtest.errors import LoadtestError

log = logging.getLogger(__name__)

AGGREGATED = "Aggregated"


def _num(value: Any) -> float | None:
    """A CSV cell as a float; None for blanks and Locust's 'N/A'."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def read_locust_stats(stats_json: Path) -> dict[str, Any]:
    """Totals and per-name rows from the final stats Locust writes at shutdown (``--json-file PREFIX`` ->
    ``PREFIX.json``, one entry per request name: every request of the run). Its ``_stats.csv`` is rewritten
    on a timer and not at shutdown, so it misses the end of a run (1,280 of 1,524 requests in one run here;
    none at all in a short run under load). The total merges the entries as Locust's ``StatsEntry.extend``
    does and the percentiles follow its rule (``calculate_response_time_percentile``); locust itself is not
    imported here, as importing it monkey-patches this process for gevent."""
    try:
        entries = json.loads(Path(stats_json).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LoadtestError(f"Locust wrote no final stats ({stats_json}): {exc}") from exc
    starts = [e["start_time"] for e in entries if e.get("start_time")]
    lasts = [e["last_request_timestamp"] for e in entries if e.get("last_request_timestamp")]
    span = max(lasts) - min(starts) if starts and lasts else 0.0
    return {"total": _entry(_merged(entries), span), "per_name": [_entry(e, span) for e in entries]}


def _merged(entries: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The entries' total, as Locust's ``StatsEntry.extend`` adds them up."""
    total: dict[str, Any] = {key: sum(e.get(key) or 0 for e in entries) for key in (
        "num_requests", "num_none_requests", "num_failures", "total_response_time", "total_content_length")}
    mins = [e["min_response_time"] for e in entries if e.get("min_response_time") is not None]
    times: collections.Counter = collections.Counter()
    for e in entries:
        times.update(e.get("response_times") or {})
    return {**total, "name": AGGREGATED, "method": "", "response_times": dict(times),
            "max_response_time": max((e.get("max_response_time") or 0 for e in entries), default=0),
            "min_response_time": min(mins, default=None)}


def _percentile(response_times: Mapping[str, int], count: int, percent: float) -> float | None:
    """Locust's percentile over its rounded response-time histogram (ms -> requests)."""
    within, seen = int(count * percent), 0
    for ms in sorted(response_times, key=float, reverse=True):
        seen += response_times[ms]
        if count - seen <= within:
            return float(ms)
    return None


def _entry(e: Mapping[str, Any], span: float) -> dict[str, Any]:
    """One entry of Locust's final stats as the summary's row (rates over the run's span, as Locust's totals)."""
    requests, failures = e.get("num_requests") or 0, e.get("num_failures") or 0
    timed = requests - (e.get("num_none_requests") or 0)
    times = e.get("response_times") or {}
    return {
        "type": e.get("method") or "",
        "name": e.get("name") or "",
        "requests": requests,
        "failures": failures,
        "failure_ratio": failures / requests if requests else 0.0,
        "requests_per_s": requests / span if span > 0 else 0.0,
        "failures_per_s": failures / span if span > 0 else 0.0,
        "latency_ms": {
            "avg": (e.get("total_response_time") or 0) / timed if timed > 0 else None,
            "min": e.get("min_response_time"),
            "p50": _percentile(times, requests, 0.50),
            "p95": _percentile(times, requests, 0.95),
            "p99": _percentile(times, requests, 0.99),
            "max": e.get("max_response_time") if requests else None,
        },
        "avg_response_bytes": e.get("total_content_length", 0) / requests if requests else None,
    }


def read_locust_failures(failures_csv: Path, limit: int = 10) -> list[dict[str, Any]]:
    """The most frequent failure messages from ``<prefix>_failures.csv`` (empty when there were none)."""
    if not failures_csv.is_file():
        return []
    with open(failures_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    rows.sort(key=lambda r: -int(_num(r.get("Occurrences")) or 0))
    return [{"name": r.get("Name"), "error": r.get("Error"), "occurrences": int(_num(r.get("Occurrences")) or 0)}
            for r in rows[:limit]]


def read_history(history_csv: Path) -> list[dict[str, float | None]]:
    """Aggregated rows of ``<prefix>_stats_history.csv``: t (s since first row), rps, fps, p50/p95/p99 ms."""
    if not history_csv.is_file():
        return []
    with open(history_csv, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("Name") == AGGREGATED]
    if not rows:
        return []
    t0 = _num(rows[0]["Timestamp"]) or 0.0
    out = []
    for r in rows:
        seen = (_num(r.get("Total Request Count")) or 0) > 0  # before the first answer percentiles read 0
        out.append({
            "t": (_num(r["Timestamp"]) or t0) - t0,
            "users": _num(r.get("User Count")),
            "rps": _num(r.get("Requests/s")),
            "fps": _num(r.get("Failures/s")),
            **{k: _num(r.get(col)) if seen else None for k, col in (("p50", "50%"), ("p95", "95%"), ("p99", "99%"))},
        })
    return out


def plot_history(history: Sequence[Mapping[str, float | None]], png: Path, title: str) -> bool:
    """Throughput and latency percentiles over time into ``png``; False when there is nothing to plot."""
    if not history:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [h["t"] for h in history]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax1.plot(t, [h["rps"] or 0.0 for h in history], label="requests/s")
    ax1.plot(t, [h["fps"] or 0.0 for h in history], label="failures/s", color="tab:red")
    ax1.set_ylabel("per second")
    ax1.legend(loc="upper left")
    ax1b = ax1.twinx()
    ax1b.plot(t, [h["users"] or 0.0 for h in history], color="gray", linestyle=":", label="users")
    ax1b.set_ylabel("users")
    for key, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        pts = [(x, h[key]) for x, h in zip(t, history) if h[key] is not None]
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], style, label=key)
    ax2.set_ylabel("latency (ms)")
    ax2.set_xlabel("seconds")
    ax2.legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
    return "\n".join(lines) + "\n"
