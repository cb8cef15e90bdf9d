"""The gateway's cost, measured side by side: the same requests (``texts_per_request`` texts to the classifier)
sent straight to tritonserver over gRPC and through the gateway's ``POST /predict`` in one run: alternating
rounds at ``concurrency`` clients (throughput), and one client sending each request both ways back to back
(latency at 1 client, so that the machine's changing load hits both paths alike).

Goals (issue 20): through the gateway, throughput >= 0.85 of direct gRPC and added p50 latency at 1 client
<= 1 ms. ``python -m loadtest gateway`` runs it alone; ``python -m loadtest bench`` adds its rows.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from common.atomic import atomic_directory
from loadtest.clients import LoadResult, _attempt, _closed, _record, _Sender, _TextStream
from loadtest.errors import LoadtestError
from loadtest.run import default_out
from loadtest.serve import served
from loadtest.texts import load_texts
from serving.contract import DEFAULT_CLASSIFIER, Endpoint, Protocol
from serving.gateway.config import GatewayConfig
from serving.gateway.process import GatewayProcess

log = logging.getLogger(__name__)



class _GatewaySender:
    """``POST /predict`` through the gateway with aiohttp (one pooled session); returns the top labels."""

    def __init__(self, url: str, model: str, key: str | None, conn_limit: int) -> None:
        import aiohttp

        self.url = f"{url}/predict?model={model}"
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conn_limit))

    async def fetch_contract(self) -> None:
        return None

    async def send(self, texts: Sequence[str], timeout_s: float) -> list[str]:
        import aiohttp
        import orjson

        async with self.session.post(self.url, data=orjson.dumps({"inputs": list(texts)}),
                                     headers={**self.headers, "Content-Type": "application/json"},
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise LoadtestError(f"gateway answered {resp.status}: {body[:200]!r}")
        rows = orjson.loads(body)
        if len(rows) != len(texts):
            raise LoadtestError(f"gateway answered {len(rows)} rows for {len(texts)} texts")
        return [row[0]["label"] for row in rows]

    async def close(self) -> None:
        await self.session.close()


def _closed_loop(sender_factory, texts, gold, concurrency: int, k: int, seconds: float, warmup: float,
                 protocol: str) -> LoadResult:
    res = LoadResult(protocol, "closed", concurrency, None, k, seconds, 0, 0, 0)
    stream = _TextStream(texts, gold, k)

    async def drive() -> LoadResult:
        sender = sender_factory()
        try:
            await sender.fetch_contract()
            return await _closed(sender, stream, res, concurrency, warmup, 30.0)
        finally:
            await sender.close()

    return asyncio.run(drive())


@dataclass
class GatewayPoint:
    """Medians over the rounds of one (path, concurrency) point."""

    path: str  # "grpc direct" | "gateway http"
    concurrency: int
    texts_per_request: int
    seq_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    failures: int
    rounds: list[dict[str, Any]] = field(default_factory=list)


def _median_point(path: str, results: list[LoadResult]) -> GatewayPoint:
    first = results[0]
    p50s = [r.percentile(50) for r in results if r.latencies_ms]
    p99s = [r.percentile(99) for r in results if r.latencies_ms]
    return GatewayPoint(path, first.concurrency or 0, first.texts_per_request,
                        statistics.median(r.seq_per_s for r in results), statistics.median(p50s) if p50s else None,
                        statistics.median(p99s) if p99s else None, sum(r.failures for r in results),
                        [r.as_dict() for r in results])


async def _paired(direct, gateway, stream: _TextStream, res: tuple[LoadResult, LoadResult], warmup_s: float,
                  diffs: list[float]) -> None:
    """One client: each text chunk goes straight and through the gateway, back to back (which goes first
    alternates), so a change in the machine's load hits both paths alike; ``diffs`` gets gateway - direct."""
    loop = asyncio.get_running_loop()
    await direct.fetch_contract()
    t_measure = loop.time() + warmup_s
    t_end = t_measure + res[0].window_s
    i = 0
    while loop.time() < t_end:
        chunk, gold = stream.next()
        took = [0.0, 0.0]
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            sent = loop.time()
            outcome = await _attempt((direct, gateway)[j], chunk, 30.0)
            took[j] = loop.time() - sent
            if loop.time() >= t_measure:
                _record(res[j], outcome, gold, len(chunk), took[j])
        if loop.time() >= t_measure:
            diffs.append(took[1] - took[0])
        i += 1


def _latency_pair(direct_factory, gateway_factory, texts, gold, k: int, seconds: float,
                  warmup_s: float) -> tuple[LoadResult, LoadResult, float]:
    res = (LoadResult("grpc", "paired", 1, None, k, seconds, 0, 0, 0),
           LoadResult("http", "paired", 1, None, k, seconds, 0, 0, 0))
    diffs: list[float] = []

    async def drive() -> None:
        direct, gateway = direct_factory(), gateway_factory()
        try:
            await _paired(direct, gateway, _TextStream(texts, gold, k), res, warmup_s, diffs)
        finally:
            await direct.close()
            await gateway.close()

    asyncio.run(drive())
    if not diffs:
        raise LoadtestError(f"paired latency run: no request succeeded ({res[0].first_error or res[1].first_error})")
    return res[0], res[1], 1e3 * statistics.median(diffs)


def measure(grpc_url: str, gateway_url: str, key: str | None, texts: Sequence[str], gold, *, model: str,
            concurrency: int = 16, texts_per_request: int = 8, seconds: float = 10.0, warmup_s: float = 2.0,
            rounds: int = 2) -> dict[str, Any]:
    """Throughput: direct gRPC and gateway runs at ``concurrency`` clients, alternating, ``rounds`` of each.
    Latency: one client sending each request both ways back to back. The medians, the throughput ratio and
    the added p50 at 1 client (no verdicts: the reader judges)."""
    direct_url = Endpoint(grpc_url, Protocol.GRPC).url
    factories = {"grpc direct": lambda c: _Sender(Protocol.GRPC, direct_url, model, c),
                 "gateway http": lambda c: _GatewaySender(gateway_url, model, key, c)}
    runs: dict[tuple[str, int], list[LoadResult]] = {}
    for i in range(rounds):
        for path, factory in factories.items():
            r = _closed_loop(lambda f=factory: f(concurrency), texts, gold, concurrency, texts_per_request, seconds,
                             warmup_s, "grpc" if path == "grpc direct" else "http")
            log.info("round %d %-12s c%-2d x%d: %7.1f seq/s p50 %6.2f ms failures %d", i + 1, path, concurrency,
                     texts_per_request, r.seq_per_s, r.percentile(50) or 0, r.failures)
            if r.requests == 0:
                raise LoadtestError(f"{path} c{concurrency}: no request succeeded ({r.first_error})")
            runs.setdefault((path, concurrency), []).append(r)
    one_direct, one_gateway, paired_ms = _latency_pair(lambda: factories["grpc direct"](1),
                                                       lambda: factories["gateway http"](1), texts, gold,
                                                       texts_per_request, seconds * rounds, warmup_s)
    runs[("grpc direct", 1)], runs[("gateway http", 1)] = [one_direct], [one_gateway]
    points = {key_: _median_point(key_[0], rs) for key_, rs in runs.items()}
    loaded = points[("gateway http", concurrency)].seq_per_s / points[("grpc direct", concurrency)].seq_per_s
    added = (points[("gateway http", 1)].p50_ms or 0) - (points[("grpc direct", 1)].p50_ms or 0)
    return {"points": [asdict(p) for p in points.values()], "throughput_ratio": loaded, "added_p50_ms_c1": added,
            "median_paired_difference_ms_c1": paired_ms,
            "model": model, "concurrency": concurrency, "texts_per_request": texts_per_request,
            "seconds": seconds, "rounds": rounds}


def run_beside(repository: Path, grpc_url: str, texts, gold, **kwargs) -> dict[str, Any]:
    """Start a gateway (random key, free port) beside the tritonserver at ``grpc_url`` and :func:`measure`."""
    key = secrets.token_urlsafe(24)
    config = GatewayConfig(repository=repository, triton_url=grpc_url, port=0, api_key=key)
    with GatewayProcess(config) as gateway:
        return measure(grpc_url, gateway.url, key, texts, gold, **kwargs)


@dataclass
class GatewayBenchConfig:
    """`loadtest gateway`: the gateway's throughput and latency cost against direct gRPC."""

    repository: Path = field(default=Path("model_repository"), metadata={"help": "repository to serve"})
    model: str = field(default=DEFAULT_CLASSIFIER, metadata={"help": "served classifier to measure"})
    texts: Path | None = field(default=None, metadata={"help": "CSV with a text column (default: the corpus)"})
    n_texts: int = field(default=512, metadata={"help": "texts cycled through"})
    concurrency: int = field(default=16, metadata={"help": "clients of the throughput point"})
    texts_per_request: int = field(default=8, metadata={"help": "texts per request"})
    seconds: float = field(default=10.0, metadata={"help": "measured seconds per run"})
    warmup_seconds: float = field(default=2.0, metadata={"help": "unmeasured seconds before each run"})
    rounds: int = field(default=2, metadata={"help": "alternating rounds (medians are reported)"})
    out: Path | None = field(default=None, metadata={"help": "report directory (default results/gateway-<time>/)"})

    def __post_init__(self) -> None:
        self.repository = Path(self.repository)
        if not self.repository.is_dir():
            raise LoadtestError(f"repository {self.repository} not found")
        if min(self.n_texts, self.concurrency, self.texts_per_request, self.rounds) < 1 or self.seconds <= 0:
            raise LoadtestError("--n-texts, --concurrency, --texts-per-request, --rounds must be >= 1, --seconds > 0")
        self.out = Path(self.out) if self.out is not None else default_out("gateway")


def run_gateway_bench(cfg: GatewayBenchConfig) -> dict[str, Any]:
    """tritonserver + gateway on the repository, :func:`measure`, gateway.json written into ``cfg.out``."""
    import json
    import os

    textset = load_texts(cfg.texts).sample(cfg.n_texts, seed=0)
    gold = None if textset.labels is None else list(textset.labels)
    with served(cfg.repository) as endpoints:
        result = run_beside(cfg.repository, endpoints.grpc_url, list(textset.texts), gold, model=cfg.model,
                            concurrency=cfg.concurrency, texts_per_request=cfg.texts_per_request,
                            seconds=cfg.seconds, warmup_s=cfg.warmup_seconds, rounds=cfg.rounds)
    result.update(texts_source=textset.source, cores=os.cpu_count(), loadavg_at_end=os.getloadavg())
    with atomic_directory(cfg.out) as tmp:
        (tmp / "gateway.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    result["out"] = str(cfg.out.absolute())
    return result


def table(result: dict[str, Any]) -> tuple[tuple[str, ...], list[tuple]]:
    header = ("path", "clients", "rows/call", "seq/s", "p50 ms", "p99 ms", "failures")
    rows = [(p["path"], p["concurrency"], p["texts_per_request"], p["seq_per_s"], p["p50_ms"], p["p99_ms"],
             p["failures"]) for p in result["points"]]
    return header, rows


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The gateway's cost in two lines (measured facts; no goals are built in)."""
    return [f"gateway throughput {result['throughput_ratio']:.3f} of direct gRPC at c{result['concurrency']} "
            f"x{result['texts_per_request']}",
            f"gateway added p50 at 1 client {result['added_p50_ms_c1']:+.2f} ms (median of the paired differences "
            f"{result['median_paired_difference_ms_c1']:+.2f} ms)"]