"""A peer server as rows of `loadtest bench` (``--peer-url``): text-embeddings-inference, infinity or any
OpenAI-compatible embeddings server the user started on the same model, driven by the same asyncio closed
loop, texts and load shapes as the served rows (loadtest.clients), so the table compares them in one run.

APIs (``--peer-api``): ``tei`` POSTs ``{"inputs": [...]}`` to ``URL/predict`` (classifier: the top label of
each row) or ``URL/embed`` (embedder); ``openai`` POSTs ``{"input": [...], "model"}`` to ``URL/classify``
(infinity's route) or ``URL/embeddings`` (URL includes any ``/v1``, as an OpenAI client's ``base_url``).
Our own gateway (``serving up --gateway-port``) speaks both, which is how the tests run it.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Sequence

import numpy as np

from exporter.config import Task
from loadtest.bench_common import PEER_KEY_ENV, BackendResult, BenchConfig, PeerApi, accuracy
from loadtest.clients import LoadResult, _closed, _TextStream
from loadtest.errors import LoadtestError

log = logging.getLogger(__name__)

TIMEOUT_S = 30.0


def _route(api: PeerApi, task: Task) -> str:
    if api is PeerApi.TEI:
        return "/embed" if task is Task.EMBEDDING else "/predict"
    return "/embeddings" if task is Task.EMBEDDING else "/classify"


def _rows(api: PeerApi, task: Task, body: Any) -> list:
    """Labels (classification) or vectors (embedding) of an answer, one per text."""
    if api is PeerApi.OPENAI:
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise LoadtestError(f"peer answer has no 'data' list: {str(body)[:200]}")
        if task is Task.EMBEDDING:
            return [d["embedding"] for d in sorted(data, key=lambda d: d.get("index", 0))]
        return [max(row, key=lambda s: s["score"])["label"] for row in data]
    if task is Task.EMBEDDING:
        return list(body)
    return [max(row, key=lambda s: s["score"])["label"] for row in body]


class PeerSender:
    """One pooled aiohttp session to the peer; ``send`` returns one label or vector per text (checked count)."""

    def __init__(self, url: str, api: PeerApi, task: Task, model: str | None, conn_limit: int) -> None:
        import aiohttp

        self.url, self.api, self.task, self.model = url.rstrip("/") + _route(api, task), api, task, model
        key = os.environ.get(PEER_KEY_ENV)
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conn_limit))

    async def fetch_contract(self) -> None:
        return None

    async def send(self, texts: Sequence[str], timeout_s: float) -> list:
        import aiohttp
        import orjson

        if self.api is PeerApi.TEI:
            payload: dict[str, Any] = {"inputs": list(texts)}
        else:
            payload = {"input": list(texts), **({"model": self.model} if self.model else {})}
        async with self.session.post(self.url, data=orjson.dumps(payload), headers=self.headers,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise LoadtestError(f"peer {self.url} answered {resp.status}: {body[:200]!r}")
        rows = _rows(self.api, self.task, orjson.loads(body))
        if len(rows) != len(texts):
            raise LoadtestError(f"peer answered {len(rows)} rows for {len(texts)} texts")
        return rows

    async def close(self) -> None:
        await self.session.close()


async def _drive(cfg: BenchConfig, conn_limit: int, work) -> Any:
    sender = PeerSender(str(cfg.peer_url), cfg.peer_api, cfg.task, cfg.peer_model, conn_limit)
    try:
        return await work(sender)
    finally:
        await sender.close()


def peer_pass(cfg: BenchConfig, texts: Sequence[str], per_request: int, concurrency: int = 4) -> list:
    """Every text's answer from the peer, in order (one pass: the accuracy or cosine, and a warm-up)."""
    chunks = [list(texts[i:i + per_request]) for i in range(0, len(texts), per_request)]

    async def work(sender: PeerSender) -> list:
        out: list[list] = [[] for _ in chunks]
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with gate:
                out[i] = await sender.send(chunks[i], TIMEOUT_S)

        await asyncio.gather(*(one(i) for i in range(len(chunks))))
        return [row for chunk in out for row in chunk]

    return asyncio.run(_drive(cfg, concurrency, work))


def peer_point(cfg: BenchConfig, texts: Sequence[str], gold: Sequence[str] | None, concurrency: int,
               per_request: int) -> LoadResult:
    """One closed-loop point against the peer (``concurrency`` clients, ``per_request`` texts each)."""
    res = LoadResult(f"peer-{cfg.peer_api.value}", "closed", concurrency, None, per_request, cfg.served_seconds,
                     0, 0, 0)
    stream = _TextStream(texts, gold if cfg.task is Task.CLASSIFICATION else None, per_request)
    return asyncio.run(_drive(cfg, concurrency, lambda s: _closed(s, stream, res, concurrency,
                                                                  cfg.warmup_seconds, TIMEOUT_S)))


def peer_plan(cfg: BenchConfig) -> list[tuple[int, int]]:
    """(concurrency, texts per request) of every peer point: the served rows' shapes."""
    plan = [(c, cfg.texts_per_request) for c in cfg.concurrency]
    return plan + [(cfg.single_text_concurrency, 1)] if (cfg.single_text_concurrency, 1) not in plan else plan


def _cosine(reference: np.ndarray, got: list) -> float:
    a, b = reference.astype(np.float64), np.asarray(got, dtype=np.float64).reshape(reference.shape)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)
    return float(cos.min())


def bench_peer(cfg: BenchConfig, texts: Sequence[str], gold: Sequence[str] | None,
               reference: np.ndarray | None = None) -> list[BackendResult]:
    """The peer's rows (kind "peer"): a pass over the texts (accuracy vs ``gold``, or min cosine vs the
    ``reference`` vectors), then each load shape; a point where no request succeeded raises."""
    answers = peer_pass(cfg, texts, cfg.texts_per_request)
    quality = accuracy(answers, gold) if cfg.task is Task.CLASSIFICATION else (
        _cosine(reference, answers) if reference is not None else None)
    rows = []
    for conc, k in peer_plan(cfg):
        r = peer_point(cfg, texts, gold, conc, k)
        if r.requests == 0:
            raise LoadtestError(f"peer {cfg.peer_url} c{conc} x{k}: no request succeeded ({r.first_error})")
        if r.failures:
            cfg.notes.append(f"peer c{conc} x{k}: {r.failures} failed requests, first: {r.first_error}")
        rows.append(BackendResult(f"peer {cfg.peer_api.value} c{conc} x{k}", "peer", k, r.seq_per_s,
                                  r.percentile(50), r.percentile(99), quality, r.rows,
                                  {"load": r.as_dict(), "url": cfg.peer_url}))
        log.info("%-34s %8.1f seq/s  p50 %7.1f ms  p99 %7.1f ms", rows[-1].name, r.seq_per_s,
                 r.percentile(50) or 0, r.percentile(99) or 0)
    return rows
