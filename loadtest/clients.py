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

from loadtest.errors import LoadtestError
from loadtest.payload import check_response
from serving.client import connect, tritonclient_module
from serving.contract import (
    DEFAULT_CLASSIFIER,
    ContractError,
    Head,
    Protocol,
    ServedModel,
    decode_embedding,
    infer_inputs,
    parse_endpoint,
    requested_outputs,
)

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
    """One asyncio client for either protocol (TLS when the URL says so); ``send`` returns checked labels.

    The load generator re-sends the same texts, so each distinct chunk's request tensors are built once and
    re-used (as perf_analyzer prepares its input data once): tritonclient only reads an ``InferInput`` when
    it builds a request, so one object can go out in any number of concurrent requests. The requested
    output objects are built once per sender. Every answer is still decoded and
    checked against the contract."""

    CACHE_BYTES = 64 << 20  # characters of text kept built (about its UTF-8 bytes); further chunks are built per request

    def __init__(self, protocol: Protocol | str, url: str, model: str, conn_limit: int):
        try:
            self.endpoint = parse_endpoint(url, protocol)
        except ContractError as exc:
            raise LoadtestError(str(exc)) from exc
        self.protocol, self.model = self.endpoint.protocol, model
        self.client = connect(self.endpoint, aio=True, conn_limit=conn_limit)
        self.mod = tritonclient_module(self.protocol)
        self.served: ServedModel | None = None
        self.outputs: list[Any] = []
        self._inputs: dict[tuple[str, ...], list[Any]] = {}
        self._cached_chars = 0

    async def fetch_contract(self) -> None:
        grpc = self.protocol is Protocol.GRPC
        config = await self.client.get_model_config(self.model, **({"as_json": True} if grpc else {}))
        try:
            self.served = ServedModel.from_config(config)
        except ContractError as exc:
            raise LoadtestError(f"{self.model}: {exc}") from exc
        self.outputs = requested_outputs(self.mod, self.served.default_outputs)

    def request_inputs(self, texts: Sequence[str]) -> list[Any]:
        """The request tensors of ``texts``, built once per distinct chunk (while the kept chunks hold less
        than ``CACHE_BYTES`` characters of text; past that, built per request)."""
        key = tuple(texts)
        inputs = self._inputs.get(key)
        if inputs is None:
            inputs = infer_inputs(self.mod, key)
            size = sum(map(len, key))
            if self._cached_chars + size <= self.CACHE_BYTES:
                self._inputs[key] = inputs
                self._cached_chars += size
        return inputs

    def _timeout_kwargs(self, timeout_s: float) -> dict[str, Any]:
        return ({"client_timeout": timeout_s} if self.protocol is Protocol.GRPC
                else {"timeout": int(timeout_s * 1e6)})

    async def send(self, texts: Sequence[str], timeout_s: float) -> list:
        """The checked answer of one request: a label per text, or (an embedding model) a vector per text."""
        assert self.served is not None, "fetch_contract() first"
        result = await self.client.infer(self.model, self.request_inputs(texts), outputs=self.outputs,
                                         **self._timeout_kwargs(timeout_s))
        outputs = {name: result.as_numpy(name) for name in self.served.default_outputs}
        if self.served.head is Head.EMBEDDING:
            return list(decode_embedding(self.served, outputs, len(texts)))
        return check_response(self.served, outputs, len(texts))

    async def close(self) -> None:
        await self.client.close()


class _TextStream:
    """Hands out consecutive chunks of the text list, cycling, so every point sees the same texts."""

    def __init__(self, texts: Sequence[str], gold: Sequence[str] | None, per_request: int):
        self.texts, self.gold, self.k, self.pos = list(texts), gold, per_request, 0

    def next(self) -> tuple[list[str], list[str] | None]:
        idx = [(self.pos + i) % len(self.texts) for i in range(self.k)]
        self.pos = (self.pos + self.k) % len(self.texts)
        return [self.texts[i] for i in idx], None if self.gold is None else [self.gold[i] for i in idx]


async def _attempt(sender: _Sender, chunk: list[str], timeout_s: float) -> list[str] | BaseException:
    """The checked labels of one request, or the exception it failed with (every failure counts)."""
    try:
        return await sender.send(chunk, timeout_s)
    except Exception as exc:  # noqa: BLE001 - a failed request, recorded as such
        return exc


def _record(res: LoadResult, outcome: list[str] | BaseException, gold: list[str] | None, n: int,
            latency_s: float) -> None:
    """Count one completed request (or failure) into ``res``."""
    if isinstance(outcome, BaseException):
        res.failures += 1
        res.first_error = res.first_error or f"{type(outcome).__name__}: {outcome}"[:300]
        return
    res.latencies_ms.append(latency_s * 1e3)
    res.requests += 1
    res.rows += n
    if gold is not None:
        res.labelled += n
        res.correct += sum(a == b for a, b in zip(outcome, gold))


async def _closed(sender: _Sender, stream: _TextStream, res: LoadResult, concurrency: int, warmup_s: float,
                  timeout_s: float) -> LoadResult:
    """``concurrency`` workers, each sending as soon as its last request answered; throughput counts the
    completions inside the measurement window."""
    loop = asyncio.get_running_loop()
    t_measure = loop.time() + warmup_s
    t_end = t_measure + res.window_s

    async def worker() -> None:
        while (sent := loop.time()) < t_end:
            chunk, chunk_gold = stream.next()
            outcome = await _attempt(sender, chunk, timeout_s)
            done = loop.time()
            if t_measure <= done <= t_end:
                _record(res, outcome, chunk_gold, len(chunk), done - sent)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return res


async def _open(sender: _Sender, stream: _TextStream, res: LoadResult, max_outstanding: int, warmup_s: float,
                timeout_s: float) -> LoadResult:
    """Requests sent on a fixed schedule whatever the server does; latency from the scheduled send time
    (no coordinated omission). The window is the scheduled span; late completions still count."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(max_outstanding)
    t_start = loop.time() + 0.05
    t_measure, t_end = t_start + warmup_s, t_start + warmup_s + res.window_s

    async def one(scheduled: float, chunk: list[str], chunk_gold: list[str] | None) -> None:
        async with gate:
            outcome = await _attempt(sender, chunk, timeout_s)
        if scheduled >= t_measure:
            _record(res, outcome, chunk_gold, len(chunk), loop.time() - scheduled)

    tasks, i = [], 0
    while (scheduled := t_start + i / res.target_rps) < t_end:
        if (delay := scheduled - loop.time()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(scheduled, *stream.next())))
        i += 1
    await asyncio.gather(*tasks)
    return res


async def _with_sender(protocol, url: str, model: str, conn_limit: int, drive):
    """Open a sender, read the model's contract, ``await drive(sender)``, close."""
    sender = _Sender(protocol, url, model, conn_limit)
    try:
        await sender.fetch_contract()
        return await drive(sender)
    finally:
        await sender.close()


async def _classify_chunks(sender: _Sender, chunks: list[list[str]], concurrency: int,
                           timeout_s: float) -> list[str]:
    out: list[list[str]] = [[] for _ in chunks]
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            out[i] = await sender.send(chunks[i], timeout_s)

    await asyncio.gather(*(one(i) for i in range(len(chunks))))
    return [label for chunk in out for label in chunk]


def _new_result(protocol, url: str, mode: str, concurrency: int | None, rate: float | None, per_request: int,
                duration_s: float) -> LoadResult:
    try:
        proto = parse_endpoint(url, protocol).protocol.value
    except ContractError as exc:
        raise LoadtestError(str(exc)) from exc
    return LoadResult(proto, mode, concurrency, rate, per_request, duration_s, 0, 0, 0)


def classify_all(protocol: Protocol | str, url: str, texts: Sequence[str], *, texts_per_request: int = 8,
                 concurrency: int = 4, timeout_s: float = 60.0, model: str = DEFAULT_CLASSIFIER) -> list[str]:
    """Labels of every text, in order, from the served model (one pass; errors propagate)."""
    chunks = [list(texts[i:i + texts_per_request]) for i in range(0, len(texts), texts_per_request)]
    return asyncio.run(_with_sender(protocol, url, model, concurrency,
                                    lambda s: _classify_chunks(s, chunks, concurrency, timeout_s)))


def closed_loop(protocol: Protocol | str, url: str, texts: Sequence[str], gold: Sequence[str] | None, *,
                concurrency: int, texts_per_request: int, duration_s: float, warmup_s: float = 2.0,
                timeout_s: float = 30.0, model: str = DEFAULT_CLASSIFIER) -> LoadResult:
    """``concurrency`` clients each sending the next ``texts_per_request`` texts as soon as the last answered."""
    res = _new_result(protocol, url, "closed", concurrency, None, texts_per_request, duration_s)
    stream = _TextStream(texts, gold, texts_per_request)
    return asyncio.run(_with_sender(protocol, url, model, concurrency,
                                    lambda s: _closed(s, stream, res, concurrency, warmup_s, timeout_s)))


def open_loop(protocol: Protocol | str, url: str, texts: Sequence[str], gold: Sequence[str] | None, *,
              rate_rps: float, texts_per_request: int, duration_s: float, warmup_s: float = 2.0,
              timeout_s: float = 30.0, max_outstanding: int = 256, model: str = DEFAULT_CLASSIFIER) -> LoadResult:
    """Requests at a constant ``rate_rps``, whatever the server does; latency from the scheduled time."""
    if rate_rps <= 0:
        raise LoadtestError("open-loop rate must be > 0")
    res = _new_result(protocol, url, "open", None, rate_rps, texts_per_request, duration_s)
    stream = _TextStream(texts, gold, texts_per_request)
    return asyncio.run(_with_sender(protocol, url, model, max_outstanding,
                                    lambda s: _open(s, stream, res, max_outstanding, warmup_s, timeout_s)))
