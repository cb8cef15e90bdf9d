"""`python -m loadtest bench --task embedding`: sentence embeddings three ways on the same texts.

- sentence-transformers ``encode`` (batch ``--batch-size``, ``--threads`` torch threads): the peer users run,
- the ceiling: the build's selected ONNX variant in-process, one text at a time in one 1-intra-op-thread
  process per core, all cores at once (summed rows/s; what the CPU server can at best reach),
- served: the repository's embedding model behind a local tritonserver, closed loop (``--concurrency``
  clients of ``--texts-per-request`` texts, and ``--single-text-concurrency`` clients of one text), HTTP and
  gRPC, through the same asyncio load generator as the classifier's rows (loadtest.clients);
- a peer (``--peer-url``: infinity, text-embeddings-inference, OpenAI-compatible) at the same shapes, its
  points interleaved with the served ones (``--rounds``, alternating order).
Every backend's vectors are compared with sentence-transformers' (min cosine); ratios are to ``encode``
and to the ceiling. Reports: bench.json, bench.md, bench.png (loadtest.bench's table and plot).
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.atomic import atomic_directory
from common.provenance import versions
from exporter.artifacts import ArtifactError, read_embedding_report
from exporter.embedding import read_pipeline
from exporter.embedding_gate import RowEncoder
from exporter.speed import FirstPerShape
from loadtest.bench_common import (
    BackendResult,
    BenchConfig,
    check_thresholds,
    cpu_model,
    load_bench_texts,
    plot_bench,
    set_ratios,
    time_calls,
)
from loadtest.errors import LoadtestError
from loadtest.clients import LoadResult, closed_loop
from loadtest.peer import TIMEOUT_S, peer_pass, peer_plan, peer_point
from loadtest.report import markdown_table
from loadtest.serve import served
from serving.client import Embedder
from serving.contract import DEFAULT_EMBEDDER, Protocol
from serving.models import runtime
from serving.repository import usable_cores

log = logging.getLogger(__name__)

HEADER = ("backend", "rows/call", "rows/s", "p50 ms", "p99 ms", "x encode", "of ceiling", "min cosine")


def min_cosine(reference: np.ndarray, got: np.ndarray) -> float:
    """The lowest row-wise cosine similarity of ``got`` to ``reference``."""
    a, b = reference.astype(np.float64), np.asarray(got, dtype=np.float64).reshape(reference.shape)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)
    return float(cos.min())


def _row(name: str, kind: str, rows_per_call: int, n: int, seconds: float, lat: Sequence[float],
         cosine: float | None, **detail) -> BackendResult:
    res = BackendResult(name, kind, rows_per_call, n / seconds, float(np.percentile(lat, 50)),
                        float(np.percentile(lat, 99)), cosine, n, detail)
    log.info("%-40s %8.1f rows/s  p50 %7.2f ms  p99 %7.2f ms  min cosine %s", name, res.seq_per_s, res.p50_ms,
             res.p99_ms, "-" if cosine is None else f"{cosine:.6f}")
    return res


def bench_encode(model_dir: Path, texts: list[str], batch: int) -> tuple[BackendResult, np.ndarray]:
    """sentence-transformers ``encode`` in padded batches (the threads torch was given)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")

    def run(b: Sequence[str]) -> list:
        return list(model.encode(list(b), batch_size=len(b), convert_to_numpy=True, show_progress_bar=False))

    vectors, lat, secs = time_calls(run, texts, batch)
    reference = np.asarray(vectors, dtype=np.float32)
    return _row(f"sentence-transformers encode b{batch}", "in-process", batch, len(texts), secs, lat, 1.0), reference


def _ceiling_worker(onnx_path: str, model_dir: str, texts: list[str], barrier) -> tuple[np.ndarray, list[float], float]:
    """One 1-thread process: every text alone, timed once every process has loaded and run each distinct shape
    once untimed (so no process's timing overlaps another's start-up); (vectors, ms per text, seconds)."""
    encoder = RowEncoder(Path(onnx_path), read_pipeline(Path(model_dir)))
    warm = FirstPerShape(encoder, encoder.shape)  # as loadtest.ceiling and the exporter's measure warm up
    for text in texts:
        warm(text)
    barrier.wait()
    lat, rows, t_all = [], [], time.perf_counter()
    for text in texts:
        t0 = time.perf_counter()
        rows.append(encoder(text))
        lat.append((time.perf_counter() - t0) * 1e3)
    return np.stack(rows), lat, time.perf_counter() - t_all


def bench_ceiling(variant: str, onnx_path: Path, model_dir: Path, texts: list[str], processes: int,
                  reference: np.ndarray) -> BackendResult:
    """The selected variant, one text at a time, one 1-thread process per core, all at once."""
    n = processes or usable_cores()
    shares = [list(range(i, len(texts), n)) for i in range(n)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, concurrent.futures.ProcessPoolExecutor(
            n, mp_context=ctx, initializer=os.setsid) as pool:  # own sessions, as loadtest.ceiling
        barrier = manager.Barrier(n)
        futures = [pool.submit(_ceiling_worker, str(onnx_path), str(model_dir), [texts[i] for i in s], barrier)
                   for s in shares]
        parts = [f.result() for f in futures]
    vectors = np.zeros_like(reference)
    for share, (rows, _, _) in zip(shares, parts):
        vectors[share] = rows
    rates = [len(s) / secs for s, (_, _, secs) in zip(shares, parts)]
    lat = [x for _, part_lat, _ in parts for x in part_lat]
    # rows/s summed over the processes, as loadtest.ceiling reports it
    return _row(f"ceiling {runtime.runtime_of(onnx_path)} {variant} 1 row x {n} proc", "ceiling", 1, len(texts), len(texts) / sum(rates),
                lat, min_cosine(reference, vectors), onnx=str(onnx_path), processes=n, per_process_rows_per_s=rates)


def _served_point(proto: Protocol, url: str, model: str, texts: list[str], conc: int, k: int,
                  cfg: BenchConfig) -> LoadResult:
    """One closed-loop point against the served embedder: ``conc`` asyncio clients, ``k`` texts each."""
    return closed_loop(proto, url, texts, None, concurrency=conc, texts_per_request=k, duration_s=cfg.served_seconds,
                       warmup_s=cfg.warmup_seconds, timeout_s=TIMEOUT_S, model=model)


def _side_row(name: str, kind: str, k: int, runs: list[LoadResult], cosine: float | None,
              **detail) -> BackendResult:
    """One table row from a side's interleaved rounds at one shape: the mean of the rounds' rows/s."""
    lat = [x for r in runs for x in r.latencies_ms]
    if not lat:
        raise LoadtestError(f"{name}: no request succeeded ({runs[0].first_error})")
    rates = [r.seq_per_s for r in runs]
    res = BackendResult(name, kind, k, float(np.mean(rates)), float(np.percentile(lat, 50)),
                        float(np.percentile(lat, 99)), cosine, sum(r.rows for r in runs),
                        {**detail, "rounds_rows_per_s": rates, "failures": sum(r.failures for r in runs)})
    log.info("%-40s %8.1f rows/s (rounds %s)  p50 %7.2f ms  p99 %7.2f ms", name, res.seq_per_s,
             " ".join(f"{x:.1f}" for x in rates), res.p50_ms, res.p99_ms)
    return res


def _sides(cfg: BenchConfig, endpoints, model: str, texts: list[str]) -> list[tuple[str, str, Any]]:
    """(row prefix, kind, point(conc, k) -> LoadResult) of every side measured: each protocol, then the peer."""
    sides: list[tuple[str, str, Any]] = [
        (f"served {p.value}", "served",
         lambda c, k, p=p: _served_point(p, endpoints.url(p), model, texts, c, k, cfg)) for p in cfg.protocols]
    if cfg.peer_url:
        sides.append((f"peer {cfg.peer_api.value}", "peer", lambda c, k: peer_point(cfg, texts, None, c, k)))
    return sides


def bench_served(cfg: BenchConfig, model: str, texts: list[str], reference: np.ndarray,
                 meta: dict[str, Any]) -> list[BackendResult]:
    """Every load shape against a local tritonserver on the repository (and the peer, ``--peer-url``), the
    sides interleaved at each shape in ``--rounds`` rounds whose order alternates (A B, B A, ...), so a side
    measured while the shared machine was busier is measured again while it was quieter."""
    with served(cfg.repository) as endpoints:
        meta["endpoints"] = endpoints.as_dict()
        with Embedder(endpoints.url(Protocol.GRPC), model=model) as emb:  # a pass over the texts: parity + warm-up
            cosine = {"served": min_cosine(reference, emb.embed(texts))}
        if cfg.peer_url:  # the peer's pass: its cosine, and its warm-up
            cosine["peer"] = min_cosine(reference, peer_pass(cfg, texts, cfg.texts_per_request))
        sides = _sides(cfg, endpoints, model, texts)
        runs: dict[tuple[str, int, int], list[LoadResult]] = {}
        for conc, k in peer_plan(cfg):
            for r in range(cfg.rounds):
                for name, _, point in (sides if r % 2 == 0 else sides[::-1]):
                    runs.setdefault((name, conc, k), []).append(point(conc, k))
        return [_side_row(f"{name} c{conc} x{k}", kind, k, runs[(name, conc, k)], cosine[kind],
                          load={"protocol": name.split()[1], "concurrency": conc, "texts_per_request": k})
                for name, kind, _ in sides for conc, k in peer_plan(cfg)]


def _selected(cfg: BenchConfig) -> tuple[str, Path, Path]:
    """(variant, ONNX file, model directory) of the embedding build's selection."""
    try:
        report = read_embedding_report(cfg.build)
    except ArtifactError as exc:
        raise LoadtestError(str(exc)) from None
    if report.selected is None:
        raise LoadtestError(f"{cfg.build}: no embedding variant passed its gate")
    return report.selected, report.variant_path(report.selected, cfg.build), Path(report.model_dir)


def _write(cfg: BenchConfig, results: list[BackendResult], meta: dict[str, Any],
           checks: tuple[list[str], list[str]]) -> dict[str, Any]:
    rows = [(r.name, r.rows_per_call, r.seq_per_s, r.p50_ms, r.p99_ms,
             None if r.ratio_to_pipeline is None else f"{r.ratio_to_pipeline:.2f}",
             None if r.ratio_to_ceiling is None else f"{r.ratio_to_ceiling:.2f}",
             None if r.accuracy is None else f"{r.accuracy:.6f}") for r in results]
    out = {"task": "embedding", "config": json.loads(json.dumps(asdict(cfg), default=str)), "machine": meta,
           "results": [asdict(r) for r in results], "thresholds": {"lines": checks[0], "failed": checks[1]},
           "notes": cfg.notes, "versions": versions(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    text = ["# Embedding benchmark\n", "sentence-transformers encode, the in-process ceiling (the selected variant, "
            "one text at a time, one 1-thread process per core) and the served embedder, on the same texts.\n",
            f"{meta['n_texts']} texts from `{meta['texts_source']}`, {meta['cpu']} ({meta['cores']} cores); "
            "`min cosine` is against sentence-transformers' vectors for the same texts.\n",
            markdown_table(HEADER, rows), *[f"- {n}" for n in [*checks[0], *cfg.notes]], ""]
    with atomic_directory(cfg.out) as tmp:
        (tmp / "bench.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
        (tmp / "bench.md").write_text("\n".join(text))
        plot_bench(results, tmp / "bench.png")
    return {**out, "out": str(cfg.out.absolute()), "table": (HEADER, rows), "check_lines": checks[0],
            "failed": checks[1]}


def run_embedding_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Measure encode, the ceiling and the served embedder; write bench.{json,md,png} into ``cfg.out``."""
    import torch

    if cfg.build is None:
        raise LoadtestError("--task embedding needs --build (an `exporter build --task embedding` directory)")
    torch.set_num_threads(cfg.threads)
    texts, _, source = load_bench_texts(cfg)
    variant, onnx_path, model_dir = _selected(cfg)
    meta = {"n_texts": len(texts), "texts_source": source, "cpu": cpu_model(), "cores": os.cpu_count(),
            "variant": variant, "model_dir": str(model_dir)}
    base, reference = bench_encode(cfg.checkpoint, texts, cfg.batch_size)
    results = [base]
    if cfg.ceiling:
        results.append(bench_ceiling(variant, onnx_path, model_dir, texts, cfg.ceiling_processes, reference))
    if cfg.served:
        results += bench_served(cfg, cfg.model_name or DEFAULT_EMBEDDER, texts, reference, meta)
    set_ratios(results, base.name)
    return _write(cfg, results, meta, check_thresholds(results, variant, cfg.min_ratio, cfg.slo_p99_ms))
