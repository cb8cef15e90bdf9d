"""Async load generators for the benchmark and the tuner: closed loop (N clients, no think time) and
open loop (requests sent on a fixed schedule, latency measured from the scheduled send time so a slow
server cannot hide queueing: no coordinated omission).

One asyncio event loop in one thread drives all clients through tritonclient's asyncio clients (HTTP with
binary tensors, gRPC), which keeps the load generator's own CPU use small on a 2-core machine.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from loadtest import payload
from loadtest.errors import LoadtestError

log = logging.getLogger(__name__)


@dataclass
class LoadResult:
    """What one load point measured (only requests that completed inside the measurement window)."""

    protocol: str
    mode: str  # "closed" or "open"
    concurrency: int | None
    target_rps: float | None
    texts_per_request: int
    window_s: float
    requests: int
    failures: int
    rows: int
    latencies_ms: list[float] = field(repr=False, default_factory=list)
    correct: int = 0
    labelled: int = 0
    first_error: str | None = None

    @property
    def seq_per_s(self) -> float:
        return self.rows / self.window_s if self.window_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.window_s if self.window_s > 0 else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol, "mode": self.mode, "concurrency": self.concurrency,
            "target_rps": self.target_rps, "texts_per_request": self.texts_per_request,
            "window_s": round(self.window_s, 3), "requests": self.requests, "failures": self.failures,
            "rows": self.rows, "seq_per_s": self.seq_per_s, "requests_per_s": self.requests_per_s,
            "p50_ms": self.percentile(50), "p90_ms": self.percentile(90), "p99_ms": self.percentile(99),
            "accuracy": self.accuracy, "first_error": self.first_error,
        }


class _Sender:
    """One asyncio client for either protocol; ``send`` returns the validated labels."""

    def __init__(self, protocol: str, url: str, model: str, conn_limit: int):
        self.protocol = protocol
        self.model = model
        if protocol == "http":
            import tritonclient.http as mod
            import tritonclient.http.aio as aio

            self.client = aio.InferenceServerClient(url=_strip_scheme(url), conn_limit=max(conn_limit, 1))
        elif protocol == "grpc":
            import tritonclient.grpc as mod
            import tritonclient.grpc.aio as aio

            self.client = aio.InferenceServerClient(url=_strip_scheme(url))
        else:
            raise LoadtestError(f"unknown protocol {protocol!r}")
        self.mod = mod
        self.outputs = [mod.InferRequestedOutput(payload.LABEL), mod.InferRequestedOutput(payload.PROBABILITIES)]
        self.label_set: list[str] | None = None

    async def fetch_labels(self) -> None:
        cfg = await self.client.get_model_config(self.model, **({"as_json": True} if self.protocol == "grpc" else {}))
        self.label_set = payload.labels_from_model_config(cfg.get("config", cfg))

    async def send(self, texts: Sequence[str], timeout_s: float) -> list[str]:
        inp = self.mod.InferInput(payload.INPUT, [len(texts), 1], "BYTES")
        inp.set_data_from_numpy(np.array(texts, dtype=object).reshape(-1, 1))
        if self.protocol == "grpc":
            result = await self.client.infer(self.model, [inp], outputs=self.outputs, client_timeout=timeout_s)
        else:
            result = await self.client.infer(self.model, [inp], outputs=self.outputs, timeout=int(timeout_s * 1e6))
        return payload.validate_outputs(result.as_numpy(payload.LABEL), result.as_numpy(payload.PROBABILITIES),
                                        len(texts), self.label_set)

    async def close(self) -> None:
        await self.client.close()


def _strip_scheme(url: str) -> str:
    for scheme in ("http://", "https://", "grpc://"):
        if url.startswith(scheme):
            return url[len(scheme):].rstrip("/")
    return url.rstrip("/")


class _TextStream:
    """Hands out consecutive chunks of the text list, cycling, so every point sees the same texts."""

    def __init__(self, texts: Sequence[str], gold: Sequence[str] | None, per_request: int):
        self.texts, self.gold, self.k, self.pos = list(texts), gold, per_request, 0

    def next(self) -> tuple[list[str], list[str] | None]:
        idx = [(self.pos + i) % len(self.texts) for i in range(self.k)]
        self.pos = (self.pos + self.k) % len(self.texts)
        return [self.texts[i] for i in idx], None if self.gold is None else [self.gold[i] for i in idx]


def _record(res: LoadResult, labels: list[str] | None, gold: list[str] | None, n: int) -> None:
    res.requests += 1
    res.rows += n
    if labels is not None and gold is not None:
        res.labelled += n
        res.correct += sum(a == b for a, b in zip(labels, gold))


async def _closed(protocol, url, model, texts, gold, concurrency, per_request, duration_s, warmup_s, timeout_s):
    sender = _Sender(protocol, url, model, concurrency)
    try:
        await sender.fetch_labels()
        stream = _TextStream(texts, gold, per_request)
        res = LoadResult(protocol, "closed", concurrency, None, per_request, duration_s, 0, 0, 0)
        loop = asyncio.get_running_loop()
        t_start = loop.time()
        t_measure, t_end = t_start + warmup_s, t_start + warmup_s + duration_s

        async def worker() -> None:
            while True:
                sent = loop.time()
                if sent >= t_end:
                    return
                chunk, chunk_gold = stream.next()
                try:
                    labels = await sender.send(chunk, timeout_s)
                    err = None
                except Exception as exc:  # any failure counts; keep the first message
                    labels, err = None, exc
                done = loop.time()
                if t_measure <= done <= t_end:  # throughput = completions inside the window
                    if err is None:
                        res.latencies_ms.append((done - sent) * 1e3)
                        _record(res, labels, chunk_gold, len(chunk))
                    else:
                        res.failures += 1
                        res.first_error = res.first_error or f"{type(err).__name__}: {err}"[:300]

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return res
    finally:
        await sender.close()


async def _open(protocol, url, model, texts, gold, rate_rps, per_request, duration_s, warmup_s, timeout_s,
                max_outstanding):
    sender = _Sender(protocol, url, model, max_outstanding)
    try:
        await sender.fetch_labels()
        stream = _TextStream(texts, gold, per_request)
        res = LoadResult(protocol, "open", None, rate_rps, per_request, duration_s, 0, 0, 0)
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(max_outstanding)
        t_start = loop.time() + 0.05
        t_measure, t_end = t_start + warmup_s, t_start + warmup_s + duration_s
        tasks = []

        async def one(scheduled: float, chunk, chunk_gold) -> None:
            async with gate:
                try:
                    labels = await sender.send(chunk, timeout_s)
                    err = None
                except Exception as exc:
                    labels, err = None, exc
            done = loop.time()
            if scheduled >= t_measure:
                if err is None:
                    res.latencies_ms.append((done - scheduled) * 1e3)  # from the scheduled send time
                    _record(res, labels, chunk_gold, len(chunk))
                else:
                    res.failures += 1
                    res.first_error = res.first_error or f"{type(err).__name__}: {err}"[:300]

        i = 0
        while True:
            scheduled = t_start + i / rate_rps
            if scheduled >= t_end:
                break
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            chunk, chunk_gold = stream.next()
            tasks.append(asyncio.ensure_future(one(scheduled, chunk, chunk_gold)))
            i += 1
        await asyncio.gather(*tasks)
        # the window is the scheduled span; late completions still count (their latency shows the lag)
        return res
    finally:
        await sender.close()


async def _classify_all(protocol, url, model, texts, per_request, concurrency, timeout_s):
    sender = _Sender(protocol, url, model, concurrency)
    try:
        await sender.fetch_labels()
        chunks = [list(texts[i:i + per_request]) for i in range(0, len(texts), per_request)]
        out: list[list[str] | None] = [None] * len(chunks)
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with gate:
                out[i] = await sender.send(chunks[i], timeout_s)

        await asyncio.gather(*(one(i) for i in range(len(chunks))))
        return [label for chunk in out for label in chunk]
    finally:
        await sender.close()


def classify_all(protocol: str, url: str, texts: Sequence[str], *, texts_per_request: int = 8,
                 concurrency: int = 4, timeout_s: float = 60.0, model: str = payload.MODEL) -> list[str]:
    """Labels of every text, in order, from the served model (one pass; errors propagate)."""
    return asyncio.run(_classify_all(protocol, url, model, texts, texts_per_request, concurrency, timeout_s))


def closed_loop(protocol: str, url: str, texts: Sequence[str], gold: Sequence[str] | None, *, concurrency: int,
                texts_per_request: int, duration_s: float, warmup_s: float = 2.0, timeout_s: float = 30.0,
                model: str = payload.MODEL) -> LoadResult:
    """``concurrency`` clients each sending the next ``texts_per_request`` texts as soon as the last answered."""
    return asyncio.run(_closed(protocol, url, model, texts, gold, concurrency, texts_per_request, duration_s,
                               warmup_s, timeout_s))


def open_loop(protocol: str, url: str, texts: Sequence[str], gold: Sequence[str] | None, *, rate_rps: float,
              texts_per_request: int, duration_s: float, warmup_s: float = 2.0, timeout_s: float = 30.0,
              max_outstanding: int = 256, model: str = payload.MODEL) -> LoadResult:
    """Requests at a constant ``rate_rps``, whatever the server does; latency from the scheduled time."""
    if rate_rps <= 0:
        raise LoadtestError("open-loop rate must be > 0")
    return asyncio.run(_open(protocol, url, model, texts, gold, rate_rps, texts_per_request, duration_s,
                             warmup_s, timeout_s, max_outstanding))
