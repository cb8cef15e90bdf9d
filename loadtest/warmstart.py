"""Warm start, measured: the first request each served model answers after the server reports ready, against
the median of the next ``n`` identical requests (docs/METRICS.md, "Warm start").

``python scripts/warm_start.py REPOSITORY`` starts a server on the repository and prints the table; the
serving tests call :func:`first_request_costs` on a server they just started.
"""
from __future__ import annotations

import json
import statistics
import time
import urllib.request
from dataclasses import dataclass
from typing import Mapping, Sequence

from serving.contract import ServedModel, http_infer_body, infer_path

# a tweet-length text and a second text for pair models: what a client's first request looks like
FIRST_TEXT = "The delivery was late again, but the support team sorted it out within the hour."
FIRST_PAIR = "Was the customer satisfied in the end?"


@dataclass(frozen=True)
class FirstRequest:
    """One model's first request after ready and the median of the ``steady`` requests after it (seconds)."""

    model: str
    first_s: float
    steady_median_s: float
    steady: int

    @property
    def ratio(self) -> float:
        return self.first_s / max(self.steady_median_s, 1e-9)

    def to_json(self) -> dict:
        return {"model": self.model, "first_ms": round(self.first_s * 1e3, 2),
                "steady_median_ms": round(self.steady_median_s * 1e3, 2), "ratio": round(self.ratio, 2),
                "steady_requests": self.steady}


def _timed_post(url: str, body: bytes, timeout_s: float) -> float:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout_s) as resp:
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}")
    return time.perf_counter() - t0


def first_request_cost(http_url: str, model: ServedModel, *, steady: int = 20, timeout_s: float = 60.0,
                       text: str = FIRST_TEXT) -> FirstRequest:
    """Send one request to ``model`` (it must be the model's first since ready), then ``steady`` more."""
    body = json.dumps(http_infer_body([text], [FIRST_PAIR] if model.text_pair else None, outputs=())).encode()
    url = f"http://{http_url}{infer_path(model.name)}"
    first = _timed_post(url, body, timeout_s)
    rest = [_timed_post(url, body, timeout_s) for _ in range(steady)]
    return FirstRequest(model.name, first, statistics.median(rest), steady)


def first_request_costs(http_url: str, models: Mapping[str, ServedModel] | Sequence[ServedModel], *,
                        steady: int = 20) -> list[FirstRequest]:
    """:func:`first_request_cost` of every model, one after the other, after a readiness check has warmed
    this client's side (urllib's first request sets up proxies and parsers: not the server's cost)."""
    items = models.values() if isinstance(models, Mapping) else models
    with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=10) as resp:
        resp.read()
    return [first_request_cost(http_url, m, steady=steady) for m in items]
