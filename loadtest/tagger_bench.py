"""`python -m loadtest bench --task token-classification`: a tagger two ways on the same texts.

- ``transformers.pipeline("token-classification")`` in PyTorch fp32 on ``--checkpoint``, batch ``--batch-size``
  (and batch 1 unless ``--no-batch1``), ``--threads`` torch threads: what users run without this toolkit. It is
  set up as the served tagger is: the repository's aggregation strategy, max_length and, for ``long_text chunk``,
  its windows (the pipeline's ``stride``).
- served: the repository's tagger (``--model-name``, default ``tagger``) behind a local tritonserver, closed loop
  at every ``--protocols`` x ``--concurrency`` point (``--texts-per-request`` texts a request), one text a request
  at ``--single-text-concurrency``, and an open-loop run at ``--open-loop-load`` of the best closed-loop rate
  (the classifier bench's load generator, loadtest.clients).

Agreement: the share of texts whose entities equal the batched pipeline's (label, start and end exact, score
within :data:`SCORE_TOLERANCE`; served: one gRPC pass over the texts). Ratios are to the batched pipeline.
Reports: bench.json, bench.md, bench.png (loadtest.bench_common's plot), written atomically.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.atomic import atomic_directory
from common.provenance import versions
from exporter.token_classification import compare_entities
from loadtest import cpu
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
from loadtest.clients import classify_all, closed_loop, open_loop
from loadtest.errors import LoadtestError
from loadtest.report import markdown_table
from loadtest.serve import served
from serving.contract import DEFAULT_TAGGER, Aggregation, Head, Protocol, entity_key
from serving.errors import RepositoryError
from serving.repository import read_repository, model_provenance

log = logging.getLogger(__name__)

HEADER = ("backend", "texts/call", "texts/s", "p50 ms", "p99 ms", "x pipeline", "texts agree", "max |score diff|")
SCORE_TOLERANCE = 1e-3  # an entity's score may differ this much from the pipeline's and still agree


@dataclass(frozen=True)
class TaggerSetup:
    """How the repository serves the tagger, so the pipeline can be set up the same way."""

    model: str
    aggregation: Aggregation
    max_length: int
    long_text: str
    chunk_overlap: int
    variant: str | None
    onnx: str

    @property
    def key(self) -> str:
        return entity_key(self.aggregation)


def read_setup(repository: Path | None, model: str | None) -> TaggerSetup:
    """The served tagger's aggregation, max_length and windows, from the repository (serving.repository)."""
    if repository is None or not Path(repository).is_dir():
        raise LoadtestError(f"--task token-classification needs --repository (the tagger's repository), "
                            f"not {repository}")
    name = model or DEFAULT_TAGGER
    try:
        info = read_repository(Path(repository))
        served_model = info.model(name)
    except RepositoryError as exc:
        raise LoadtestError(f"cannot read the repository: {exc}") from None
    if served_model.contract.head is not Head.TOKEN_CLASSIFICATION:
        raise LoadtestError(f"model {name!r} in {repository} is a {served_model.contract.head.value} model, "
                            "not a tagger (token classification)")
    params = served_model.config.parameters

    def param(key: str, default: str) -> str:
        return params[key].string_value if key in params else default

    variant = (model_provenance(info.provenance, name).get("exporter") or {}).get("variant")
    return TaggerSetup(name, served_model.contract.aggregation, int(param("max_length", "128")),
                       param("long_text", "truncate"), int(param("chunk_overlap", "0")),
                       variant if isinstance(variant, str) else None, str(served_model.onnx_path))


def agreement(reference: Sequence[Sequence[dict]], got: Sequence[Sequence[dict]], key: str) -> tuple[float, float]:
    """(the share of texts whose entities equal the reference's: label, word, start and end, each score within
    ``SCORE_TOLERANCE``; the largest score difference of equal entities): the gate's own comparison
    (exporter.token_classification.compare_entities)."""
    _, texts_equal, worst = compare_entities(list(reference), list(got), key, SCORE_TOLERANCE)
    return texts_equal, worst


def _row(name: str, kind: str, rows_per_call: int, rate: float, lat: Sequence[float], agree: float | None,
         n: int, **detail) -> BackendResult:
    res = BackendResult(name, kind, rows_per_call, rate, float(np.percentile(lat, 50)) if len(lat) else None,
                        float(np.percentile(lat, 99)) if len(lat) else None, agree, n, detail)
    log.info("%-34s %8.1f texts/s  p50 %7.1f ms  p99 %7.1f ms  agree %s", name, rate, res.p50_ms or 0,
             res.p99_ms or 0, "-" if agree is None else f"{agree:.4f}")
    return res


def make_pipeline(checkpoint: Path, setup: TaggerSetup):
    """``transformers.pipeline("token-classification")`` on the checkpoint in PyTorch fp32, as the tagger is served
    (aggregation, max_length, windows as ``stride``)."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, model_max_length=setup.max_length,
                                                  local_files_only=True)
        model = AutoModelForTokenClassification.from_pretrained(checkpoint, local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        raise LoadtestError(f"cannot load token classifier {checkpoint}: {exc}") from None
    stride = {"stride": setup.chunk_overlap} if setup.long_text == "chunk" else {}
    return pipeline("token-classification", model=model, tokenizer=tokenizer,
                    aggregation_strategy=setup.aggregation.value, device="cpu", **stride)


def bench_pipeline(pipe, texts: list[str], batch: int, setup: TaggerSetup,
                   reference: list[list[dict]] | None) -> tuple[BackendResult, list[list[dict]]]:
    """The pipeline over every text in batches of ``batch`` (timed per call after a warm-up call); (row, the
    entities it found). Without ``reference`` its own entities are the reference."""
    def run(b: Sequence[str]) -> list[list[dict]]:
        return [list(row) for row in pipe(list(b), batch_size=len(b))]  # a list in: one entity list per text

    found, lat, secs = time_calls(run, texts, batch)
    agree = agreement(reference if reference is not None else found, found, setup.key)
    return _row(f"pytorch pipeline fp32 b{batch}", "in-process", batch, len(texts) / secs, lat, agree[0], len(texts),
                max_score_diff=agree[1], cpu_cores={"client": round(getattr(time_calls, "last_cores", 0.0), 3)}
                ), found


def _served_plan(cfg: BenchConfig) -> list[tuple[Protocol, int, int]]:
    """(protocol, concurrency, texts per request) of every closed-loop point (as the classifier bench's)."""
    plan = [(proto, c, cfg.texts_per_request) for proto in cfg.protocols for c in cfg.concurrency]
    return plan + [(proto, cfg.single_text_concurrency, 1) for proto in cfg.protocols]


def _closed_point(cfg: BenchConfig, endpoints, setup: TaggerSetup, texts: list[str], point, agree) -> BackendResult:
    proto, conc, k = point
    before = cpu.snapshot(endpoints.pid)
    r = closed_loop(proto, endpoints.url(proto), texts, None, concurrency=conc, texts_per_request=k,
                    duration_s=cfg.served_seconds, warmup_s=cfg.warmup_seconds, model=setup.model)
    if r.requests == 0:
        raise LoadtestError(f"served {proto.value} c={conc}: no request succeeded ({r.first_error})")
    if r.failures:
        cfg.notes.append(f"served {proto.value} c{conc} x{k}: {r.failures} failed requests, first: {r.first_error}")
    return _row(f"served {proto.value} c{conc} x{k}", "served", k, r.seq_per_s, r.latencies_ms, agree[0], r.rows,
                load=r.as_dict(), max_score_diff=agree[1],
                cpu_cores=cpu.cores_used(before, cpu.snapshot(endpoints.pid)))


def _open_point(cfg: BenchConfig, endpoints, setup: TaggerSetup, texts: list[str], best: BackendResult
                ) -> BackendResult:
    proto, k = Protocol(best.detail["load"]["protocol"]), best.rows_per_call
    rate = cfg.open_loop_load * best.detail["load"]["requests_per_s"]
    r = open_loop(proto, endpoints.url(proto), texts, None, rate_rps=rate, texts_per_request=k,
                  duration_s=cfg.open_loop_seconds, warmup_s=cfg.warmup_seconds, model=setup.model)
    if r.requests == 0:
        raise LoadtestError(f"served {proto.value} open loop: no request succeeded ({r.first_error})")
    return _row(f"served {proto.value} open-loop {cfg.open_loop_load:.0%} x{k}", "open-loop", k, r.seq_per_s,
                r.latencies_ms, best.accuracy, r.rows, load=r.as_dict(), target_requests_per_s=rate,
                max_score_diff=best.detail["max_score_diff"])


def bench_served(cfg: BenchConfig, setup: TaggerSetup, texts: list[str], reference: list[list[dict]],
                 meta: dict[str, Any]) -> list[BackendResult]:
    """Every served point against a local tritonserver on the repository; ``meta`` gets the endpoints."""
    with served(cfg.repository) as endpoints:
        meta["endpoints"] = endpoints.as_dict()
        found = classify_all(Protocol.GRPC, endpoints.url(Protocol.GRPC), texts, model=setup.model,
                             texts_per_request=cfg.texts_per_request)  # the agreement pass (and a warm-up)
        agree = agreement(reference, found, setup.key)
        results = [_closed_point(cfg, endpoints, setup, texts, point, agree) for point in _served_plan(cfg)]
        best = max((r for r in results if r.rows_per_call == cfg.texts_per_request), key=lambda r: r.seq_per_s)
        results.append(_open_point(cfg, endpoints, setup, texts, best))
    return results


def _write(cfg: BenchConfig, results: list[BackendResult], meta: dict[str, Any],
           checks: tuple[list[str], list[str]]) -> dict[str, Any]:
    rows = [(r.name, r.rows_per_call, r.seq_per_s, r.p50_ms, r.p99_ms,
             None if r.ratio_to_pipeline is None else f"{r.ratio_to_pipeline:.2f}",
             None if r.accuracy is None else f"{r.accuracy:.4f}",
             None if r.detail.get("max_score_diff") is None else f"{r.detail['max_score_diff']:.2g}")
            for r in results]
    out = {"task": "token-classification", "config": json.loads(json.dumps(asdict(cfg), default=str)),
           "machine": meta, "results": [asdict(r) for r in results],
           "thresholds": {"lines": checks[0], "failed": checks[1]}, "notes": cfg.notes, "versions": versions(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    text = ["# Token classification benchmark\n",
            "transformers.pipeline(\"token-classification\") in PyTorch fp32 and the served tagger, on the same "
            "texts.\n",
            f"{meta['n_texts']} texts from `{meta['texts_source']}`, {meta['cpu']} ({meta['cores']} cores); tagger "
            f"`{meta['model']}` (variant {meta['variant']}), aggregation `{meta['aggregation']}`, max_length "
            f"{meta['max_length']}, long_text {meta['long_text']}. `texts agree`: the share of texts whose entities "
            f"equal the batched pipeline's (label, start, end; score within {SCORE_TOLERANCE:g}).\n",
            markdown_table(HEADER, rows), *[f"- {n}" for n in [*checks[0], *cfg.notes]], ""]
    with atomic_directory(cfg.out) as tmp:
        (tmp / "bench.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
        (tmp / "bench.md").write_text("\n".join(text))
        plot_bench(results, tmp / "bench.png")
    log.info("wrote %s", cfg.out)
    return {**out, "out": str(cfg.out.absolute()), "table": (HEADER, rows), "check_lines": checks[0],
            "failed": checks[1]}


def run_tagger_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Measure the pipeline and the served tagger; write bench.{json,md,png} into ``cfg.out``."""
    import torch

    if cfg.peer_url:
        raise LoadtestError("--peer-url is not measured with --task token-classification (no peer serves taggers)")
    setup = read_setup(cfg.repository, cfg.model_name)
    torch.set_num_threads(cfg.threads)
    texts, _, source = load_bench_texts(cfg)
    meta = {"n_texts": len(texts), "texts_source": source, "cpu": cpu_model(), "cores": os.cpu_count(),
            "busy_processes_at_start": cpu.busy_processes(), "loadavg_at_start": os.getloadavg(), **asdict(setup),
            "aggregation": setup.aggregation.value}
    pipe = make_pipeline(cfg.checkpoint, setup)
    base, reference = bench_pipeline(pipe, texts, cfg.batch_size, setup, None)
    results = [base]
    if cfg.pipeline_batch1 and cfg.batch_size != 1:
        results.append(bench_pipeline(pipe, texts, 1, setup, reference)[0])
    if cfg.served:
        results += bench_served(cfg, setup, texts, reference, meta)
    meta["loadavg_at_end"] = os.getloadavg()
    set_ratios(results, base.name)
    return _write(cfg, results, meta, check_thresholds(results, setup.variant, cfg.min_ratio, cfg.slo_p99_ms))
