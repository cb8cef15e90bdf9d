"""Readers and writers for load-test reports: Locust CSVs -> summary dict, history -> PNG, Markdown tables."""
from __future__ import annotations

import csv
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


def read_locust_stats(stats_csv: Path) -> dict[str, Any]:
    """Totals and per-name rows from Locust's ``<prefix>_stats.csv``."""
    try:
        with open(stats_csv, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise LoadtestError(f"Locust wrote no stats ({stats_csv}): {exc.strerror or exc}") from exc

    def entry(row: Mapping[str, str]) -> dict[str, Any]:
        requests = int(_num(row.get("Request Count")) or 0)
        failures = int(_num(row.get("Failure Count")) or 0)
        return {
            "type": row.get("Type") or "",
            "name": row.get("Name") or "",
            "requests": requests,
            "failures": failures,
            "failure_ratio": failures / requests if requests else 0.0,
            "requests_per_s": _num(row.get("Requests/s")) or 0.0,
            "failures_per_s": _num(row.get("Failures/s")) or 0.0,
            "latency_ms": {
                "avg": _num(row.get("Average Response Time")),
                "min": _num(row.get("Min Response Time")),
                "p50": _num(row.get("50%")),
                "p95": _num(row.get("95%")),
                "p99": _num(row.get("99%")),
                "max": _num(row.get("Max Response Time")),
            },
            "avg_response_bytes": _num(row.get("Average Content Size")),
        }

    total = [entry(r) for r in rows if r.get("Name") == AGGREGATED]
    if not total:
        raise LoadtestError(f"{stats_csv} has no {AGGREGATED} row")
    return {"total": total[0], "per_name": [entry(r) for r in rows if r.get("Name") != AGGREGATED]}


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
