"""`python -m loadtest bench`: every way to run the classifier, side by side, on the same texts and threads.

In-process backends (timed per call, tokenization included, texts in file order, padded to the
longest text of each batch, truncated at ``max_length``):
  - HF ``pipeline("text-classification")`` in PyTorch fp32, batch 32 and batch 1 (the baseline),
  - PyTorch bf16 autocast (only where the CPU has AMX, unless forced),
  - ONNX Runtime for each variant of the exporter's build/report.json,
  - the ceiling: the served model's per-row work on its ONNX file, one text at a time, one process per core
    with the served session options, all cores at once (loadtest.ceiling); served rows are also given as a
    fraction of it.
Served backends: the Triton repository behind a local tritonserver, HTTP and gRPC, closed loop at each
concurrency (each request ``texts_per_request`` texts), one text per request at one concurrency, and an
open-loop constant-rate run at ``--open-loop-load`` of the best closed-loop throughput (its tail latency).
A peer server (``--peer-url``: text-embeddings-inference, infinity or OpenAI-compatible) adds its rows at the
same load shapes (loadtest.peer). No goals are built in: ``--min-ratio`` and ``--slo-p99-ms`` check the
user's own thresholds (the CLI exits non-zero when one is missed).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from common.atomic import atomic_directory
from common.provenance import versions
from exporter.config import Task
from loadtest import cpu, progress
from loadtest.artifacts import build_parity, read_build_variants, read_served_repository, selected_variant
from loadtest.bench_common import (
    BackendResult,
    BenchConfig,
    Bf16Mode,
    accuracy,
    check_thresholds,
    cpu_flags,
    cpu_model,
    load_bench_texts,
    plot_bench,
    result_row,
    set_ratios,
    time_calls,
)
from loadtest.ceiling import CeilingModel, measure_ceiling
from loadtest.clients import classify_all, closed_loop, open_loop
from loadtest.embedding_bench import run_embedding_bench
from loadtest.errors import LoadtestError
from loadtest.gateway_bench import run_beside, summary_lines
from loadtest.long_docs import DefinitionRunner, long_documents, time_in_process
from loadtest.peer import bench_peer
from loadtest.report import markdown_table
from loadtest.serve import served
from loadtest.tagger_bench import run_tagger_bench
from serving.contract import DEFAULT_CLASSIFIER, ENCODER_LOGITS, Protocol
from serving.models import runtime
from serving.models.token_batch import parse_records

__all__ = ["BackendResult", "Bf16Mode", "BenchConfig", "check_lines", "run_bench", "table_rows"]

log = logging.getLogger(__name__)






# ---------------------------------------------------------------- measurements
















def bench_pipeline(checkpoint: Path, texts, gold, batch: int, max_length: int) -> BackendResult:
    """HF pipeline('text-classification') in PyTorch fp32: what users pick without this toolkit."""
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(checkpoint), tokenizer=str(checkpoint), device=-1)

    def run(b: Sequence[str]) -> list[str]:
        out = pipe(list(b), batch_size=len(b), truncation=True, max_length=max_length)
        return [o["label"] for o in out]

    preds, lat, secs = time_calls(run, texts, batch)
    return result_row(f"pytorch pipeline fp32 b{batch}", "in-process", batch, texts, gold, preds, lat, secs)


def bench_torch_bf16(checkpoint: Path, texts, gold, batch: int, max_length: int, isa: str) -> BackendResult:
    """PyTorch eager with bf16 autocast on the CPU."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    id2label = model.config.id2label

    def run(b: Sequence[str]) -> list[str]:
        enc = tok(list(b), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(**enc).logits
        return [id2label[int(i)] for i in logits.float().argmax(-1)]

    preds, lat, secs = time_calls(run, texts, batch)
    return result_row(f"pytorch bf16 autocast b{batch}", "in-process", batch, texts, gold, preds, lat, secs, isa=isa)


def ort_session(path: Path, threads: int):
    """The in-process session of a built variant, opened as the CPU server opens it (serving/models/runtime.py:
    ONNX Runtime, or OpenVINO when an IR lies beside ``path``), with ``threads`` intra-op threads."""
    return runtime.open_session(path, threads)


def bench_ort(name: str, onnx_path: Path, checkpoint: Path, texts, gold, batch: int, max_length: int,
              threads: int) -> BackendResult:
    """In-process, one exported variant in the runtime the server runs it with (ONNX Runtime, or OpenVINO
    where the build wrote an IR beside it; the row is named after it), same tokenizer and padding as the
    pipeline."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    id2label = {int(k): v for k, v in AutoConfig.from_pretrained(checkpoint).id2label.items()}
    sess = ort_session(onnx_path, threads)
    wanted = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]
    out_name = ENCODER_LOGITS if ENCODER_LOGITS in out_names else out_names[0]

    def run(b: Sequence[str]) -> list[str]:
        enc = tok(list(b), padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feed = {k: enc[k].astype(np.int64) for k in wanted if k in enc}
        for k in wanted:  # e.g. token_type_ids when the tokenizer does not return it
            feed.setdefault(k, np.zeros_like(enc["input_ids"], dtype=np.int64))
        (scores,) = sess.run([out_name], feed)
        return [id2label[int(i)] for i in scores.argmax(-1)]

    preds, lat, secs = time_calls(run, texts, batch)
    return result_row(f"{runtime.runtime_of(onnx_path)} {name} b{batch}", "in-process", batch, texts, gold, preds,
                      lat, secs, onnx=str(onnx_path), variant=name)


def bench_ceiling(name: str, model: CeilingModel, checkpoint: Path, texts, gold, processes: int,
                  seconds: float) -> BackendResult:
    """The per-core in-process ceiling of one ONNX file (loadtest.ceiling), as a bench row."""
    from transformers import AutoConfig

    id2label = {int(k): v for k, v in AutoConfig.from_pretrained(checkpoint).id2label.items()}
    run = measure_ceiling(model, texts, processes, seconds)
    label = f"ceiling {runtime.runtime_of(model.onnx)} {name} 1 row x {run.processes} proc"
    res = BackendResult(label, "ceiling", 1, run.seq_per_s,
                        float(np.percentile(run.latencies_ms, 50)), float(np.percentile(run.latencies_ms, 99)),
                        accuracy([id2label[i] for i in run.label_ids], gold), len(texts),
                        {"onnx": str(model.onnx), "variant": name, "processes": run.processes,
                         "per_process_seq_per_s": run.per_process_seq_per_s,
                         "intra_op_threads": run.intra_op_threads, "max_length": model.max_length})
    log.info("%-34s %8.1f seq/s  (%s)", res.name, res.seq_per_s,
             " + ".join(f"{r:.1f}" for r in run.per_process_seq_per_s))
    return res


def _truncation_side(tokenizer_dir: Path) -> str:
    try:
        return json.loads((tokenizer_dir / "tokenizer_config.json").read_text()).get("truncation_side") or "right"
    except (OSError, ValueError):
        return "right"


def ceiling_source(cfg: BenchConfig) -> tuple[str, CeilingModel] | None:
    """(variant, what the ceiling runs): the repository's served model as its config says (ONNX file, tokenizer,
    max_length, intra-op threads), else the build's selection with --max-length and one intra-op thread."""
    if cfg.repository is not None and (Path(cfg.repository) / "provenance.json").is_file():
        info = read_served_repository(cfg.repository, cfg.build, cfg.model_name)
        model = CeilingModel(info.onnx, info.tokenizer_dir, int(info.config.get("max_length", cfg.max_length)),
                             _truncation_side(info.tokenizer_dir), info.intra_op_threads)
        return info.variant or info.onnx.stem, model
    if cfg.build is not None:
        variants = dict(read_build_variants(cfg.build))
        name = selected_variant(cfg.build)
        name = name if name in variants else next(iter(variants))
        return name, CeilingModel(variants[name], cfg.checkpoint, cfg.max_length, _truncation_side(cfg.checkpoint))
    return None


# ---------------------------------------------------------------- served


def _served_plan(cfg: BenchConfig) -> list[tuple[Protocol, int, int]]:
    """(protocol, concurrency, texts per request) of every closed-loop point."""
    plan = [(proto, c, cfg.texts_per_request) for proto in cfg.protocols for c in cfg.concurrency]
    return plan + [(proto, cfg.single_text_concurrency, 1) for proto in cfg.protocols]


def _served_point(cfg: BenchConfig, endpoints, texts, gold, point, served_acc) -> BackendResult:
    proto, conc, k = point
    before = cpu.snapshot(endpoints.pid)
    r = closed_loop(proto, endpoints.url(proto), texts, gold, concurrency=conc, texts_per_request=k,
                    duration_s=cfg.served_seconds, warmup_s=cfg.warmup_seconds)
    used = cpu.cores_used(before, cpu.snapshot(endpoints.pid))
    if r.requests == 0:
        raise LoadtestError(f"served {proto.value} c={conc}: no request succeeded ({r.first_error})")
    res = BackendResult(f"served {proto.value} c{conc} x{k}", "served", k, r.seq_per_s, r.percentile(50),
                        r.percentile(99), served_acc, r.rows, {"load": r.as_dict(), "cpu_cores": used})
    log.info("%-34s %8.1f seq/s  p50 %7.1f ms  p99 %7.1f ms  failures %d  cores %s", res.name, res.seq_per_s,
             res.p50_ms or 0, res.p99_ms or 0, r.failures,
             " ".join(f"{k}={v:.2f}" for k, v in used.items() if k != "machine_cores"))
    if r.failures:
        cfg.notes.append(f"{res.name}: {r.failures} failed requests, first: {r.first_error}")
    return res


def _served_points(cfg: BenchConfig, endpoints, texts, gold, step) -> list[BackendResult]:
    # one pass over exactly the same texts as the in-process backends: the served accuracy (and a warm-up)
    step("served accuracy pass")
    served_labels = classify_all(Protocol.GRPC, endpoints.url(Protocol.GRPC), texts,
                                 texts_per_request=cfg.texts_per_request)
    served_acc = accuracy(served_labels, gold)
    results = []
    for point in _served_plan(cfg):
        step(f"served {point[0].value} c{point[1]} x{point[2]}")
        results.append(_served_point(cfg, endpoints, texts, gold, point, served_acc))
    return results


def _open_loop_point(cfg: BenchConfig, endpoints, texts, gold, best: BackendResult) -> BackendResult:
    proto = Protocol(best.detail["load"]["protocol"])
    sat_rps = best.detail["load"]["requests_per_s"]
    rate = cfg.open_loop_load * sat_rps
    before = cpu.snapshot(endpoints.pid)
    r = open_loop(proto, endpoints.url(proto), texts, gold, rate_rps=rate, texts_per_request=best.rows_per_call,
                  duration_s=cfg.open_loop_seconds, warmup_s=cfg.warmup_seconds)
    res = BackendResult(f"served {proto.value} open-loop {cfg.open_loop_load:.0%} x{best.rows_per_call}", "open-loop",
                        best.rows_per_call, r.seq_per_s, r.percentile(50), r.percentile(99), best.accuracy,
                        r.rows, {"load": r.as_dict(), "saturating_requests_per_s": sat_rps,
                                 "cpu_cores": cpu.cores_used(before, cpu.snapshot(endpoints.pid))})
    log.info("%-34s %8.1f seq/s  p50 %7.1f ms  p99 %7.1f ms  (target %.1f req/s)", res.name, res.seq_per_s,
             res.p50_ms or 0, res.p99_ms or 0, rate)
    return res


def served_tokens(log_path: str | None) -> dict[str, Any] | None:
    """The GPU target's token records summed over a server log (rows, sub-batches, real and computed tokens,
    their ratio); None when the log has none (the CPU target runs rows alone and pads nothing)."""
    if log_path is None or not Path(log_path).is_file():
        return None
    record = parse_records(Path(log_path).read_text(encoding="utf-8", errors="replace"))
    if not record.rows:
        return None
    return {**asdict(record), "ratio": round(record.ratio, 4)}


def _long_docs_in_process(cfg: BenchConfig, docs: list[str]) -> tuple[BackendResult, list[str]]:
    runner = DefinitionRunner(cfg.repository, cfg.model_name)
    labels, lat, secs = time_in_process(runner, docs)
    res = result_row("long docs: in-process definition 1 thread", "long-docs", 1, docs, None, labels, lat, secs,
                  windows_per_doc=runner.windows / len(docs), chars=[min(map(len, docs)), max(map(len, docs))])
    return res, labels


def _long_docs_served(cfg: BenchConfig, endpoints, docs: list[str], ref_labels: list[str]) -> list[BackendResult]:
    """The long documents served over gRPC, one per request, at 1 and 2 clients; agreement with in-process."""
    url = endpoints.url(Protocol.GRPC)
    served = classify_all(Protocol.GRPC, url, docs, texts_per_request=1, concurrency=2, timeout_s=120)
    agree = float(np.mean([a == b for a, b in zip(served, ref_labels)]))
    out = []
    for conc in (1, 2):
        r = closed_loop(Protocol.GRPC, url, docs, None, concurrency=conc, texts_per_request=1,
                        duration_s=cfg.served_seconds, warmup_s=cfg.warmup_seconds, timeout_s=120)
        out.append(BackendResult(f"long docs: served grpc c{conc} x1", "long-docs", 1, r.seq_per_s, r.percentile(50),
                                 r.percentile(99), None, r.rows, {"load": r.as_dict(),
                                                                  "label_agreement_with_in_process": agree}))
    return out


def bench_served(cfg: BenchConfig, texts, gold, meta: dict[str, Any], step) -> list[BackendResult]:
    """Every served point against a local tritonserver on the repository; ``meta`` gets the endpoints."""
    long_rows, docs, ref_labels = [], [], []
    if cfg.long_docs:
        step(f"long documents in-process ({cfg.long_docs})")
        docs = long_documents(texts, cfg.long_docs, seed=cfg.seed)
        row, ref_labels = _long_docs_in_process(cfg, docs)
        long_rows.append(row)
    step(f"starting tritonserver on {cfg.repository}")
    with served(cfg.repository) as endpoints:
        meta["endpoints"] = endpoints.as_dict()
        results = _served_points(cfg, endpoints, texts, gold, step)
        multi = [r for r in results if r.rows_per_call == cfg.texts_per_request]
        best = max(multi, key=lambda r: r.seq_per_s)
        step(f"served open loop at {cfg.open_loop_load:.0%} of {best.name}")
        results.append(_open_loop_point(cfg, endpoints, texts, gold, best))
        if cfg.gateway:
            step("gateway vs direct gRPC")
            results += _gateway_rows(cfg, endpoints, texts, gold, served_acc=best.accuracy)
        tokens = served_tokens(endpoints.log_path)
        if tokens is not None:
            meta["tokens"] = tokens
            cfg.notes.append(f"gpu target: the encoder computed {tokens['ratio']}x the real tokens over every served "
                             f"point ({tokens['computed_tokens']} / {tokens['real_tokens']}, "
                             f"{tokens['sub_batches']} sub-batches)")
        if docs:
            step("long documents served")
            results += long_rows + _long_docs_served(cfg, endpoints, docs, ref_labels)
    cfg.notes.append(
        f"served: {meta.get('instances')} instance(s) x {meta.get('intra_op_threads') or 'default'} intra-op "
        f"thread(s); server, python stubs and this client share the machine's {os.cpu_count()} cores, while "
        f"each in-process backend had {cfg.threads} thread(s) to itself")
    return results


def _gateway_rows(cfg: BenchConfig, endpoints, texts, gold, served_acc) -> list[BackendResult]:
    """The gateway's rows: medians of alternating direct-gRPC and gateway runs (loadtest.gateway_bench)."""
    g = run_beside(cfg.repository, endpoints.grpc_url, texts, gold, model=cfg.model_name or DEFAULT_CLASSIFIER,
                   concurrency=cfg.single_text_concurrency, texts_per_request=cfg.texts_per_request,
                   seconds=cfg.served_seconds, warmup_s=cfg.warmup_seconds)
    rows = [BackendResult(f"{p['path']} c{p['concurrency']} x{p['texts_per_request']}", "gateway",
                          p["texts_per_request"], p["seq_per_s"], p["p50_ms"], p["p99_ms"], served_acc, 0,
                          {"rounds": p["rounds"]}) for p in g["points"]]
    cfg.notes.extend(summary_lines(g))
    return rows


# ---------------------------------------------------------------- the user's thresholds and the report


TABLE_HEADER = ("backend", "rows/call", "seq/s", "p50 ms", "p99 ms", "x pipeline", "of ceiling", "accuracy")


def table_rows(results: Sequence[BackendResult]) -> list[tuple]:
    return [(r.name, r.rows_per_call, r.seq_per_s, r.p50_ms, r.p99_ms,
             None if r.ratio_to_pipeline is None else f"{r.ratio_to_pipeline:.2f}",
             None if r.ratio_to_ceiling is None else f"{r.ratio_to_ceiling:.2f}",
             None if r.accuracy is None else f"{r.accuracy:.4f}") for r in results]


def write_markdown(path: Path, cfg: BenchConfig, results, checks, meta) -> None:
    lines = [
        "# Benchmark\n",
        f"{meta['n_texts']} texts from `{meta['texts_source']}`, {cfg.threads} thread(s) per backend "
        f"(torch.set_num_threads / ORT intra_op), {meta['cpu']} ({meta['cores']} cores). In-process latency is "
        f"per call of `rows/call` texts (tokenization included); served latency is per request of "
        f"`rows/call` texts from closed-loop clients (`cN` = N concurrent clients), open-loop = constant rate. "
        f"The ceiling runs the served variant one text at a time in one 1-intra-op-thread process per core, all "
        f"at once (summed seq/s); `of ceiling` is each row's fraction of it. "
        f"Accuracy is on the same {meta['n_texts']} texts for every backend (served: one gRPC pass before "
        f"the timed points).\n",
        markdown_table(TABLE_HEADER, table_rows(results)),
        *(["## Thresholds (--min-ratio, --slo-p99-ms)\n", *[f"- {line}" for line in checks], ""] if checks else []),
    ]
    cpu_rows = [r for r in results if r.kind != "in-process" and r.detail.get("cpu_cores")]
    if cpu_rows:
        found = {k for r in cpu_rows for k in r.detail["cpu_cores"]} - {"client", "total", "machine_cores"}
        roles = ("client", *sorted(found), "total")
        lines += [
            "## CPU use during the served points (average cores busy)\n",
            f"The machine has {meta['cores']} cores; `client` is the load generator (this process).\n",
            markdown_table(("point", *roles), [(r.name, *(None if r.detail["cpu_cores"].get(k) is None else
                                                          f"{r.detail['cpu_cores'][k]:.2f}" for k in roles))
                                               for r in cpu_rows]),
        ]
    if meta.get("served"):
        lines += ["## Served configuration\n", "```json", json.dumps(meta["served"], indent=2), "```", ""]
    if cfg.notes:
        lines += ["## Notes\n", *[f"- {n}" for n in cfg.notes], ""]
    path.write_text("\n".join(lines))




# ---------------------------------------------------------------- the whole run




def _bf16_isa(cfg: BenchConfig) -> tuple[str | None, bool]:
    """(the CPU's bf16 ISA, whether to run the bf16 backend)."""
    flags = cpu_flags()
    isa = "amx_bf16" if "amx_bf16" in flags else ("avx512_bf16" if "avx512_bf16" in flags else None)
    run = cfg.bf16 is Bf16Mode.ON or (cfg.bf16 is Bf16Mode.AUTO and "amx_bf16" in flags)
    if not run and cfg.bf16 is Bf16Mode.AUTO:
        cfg.notes.append("pytorch bf16 autocast skipped: no AMX (amx_bf16) on this CPU"
                         + (f"; it has {isa} (force with --bf16 on)" if isa else ""))
    return isa, run


def _ort_rows(cfg: BenchConfig, texts, gold, step) -> list[BackendResult]:
    parity, results = build_parity(cfg.build), []
    for name, path in read_build_variants(cfg.build):
        step(f"{runtime.runtime_of(path)} {name}")
        res = bench_ort(name, path, cfg.checkpoint, texts, gold, cfg.batch_size, cfg.max_length, cfg.threads)
        res.detail["parity_passed"] = parity.get(name)
        if parity.get(name) is False:
            cfg.notes.append(f"{res.name}: this variant FAILED the exporter's parity gate (not servable)")
        results.append(res)
    return results


def _n_steps(cfg: BenchConfig, bf16: bool) -> int:
    n = 1 + cfg.pipeline_batch1 + bf16 + cfg.ceiling
    n += len(read_build_variants(cfg.build)) if cfg.build is not None else 0
    n += bool(cfg.peer_url)
    return n + (3 + cfg.gateway + len(_served_plan(cfg)) + 2 * bool(cfg.long_docs) if cfg.served else 0)


def measure_all(cfg: BenchConfig, texts, gold, served_meta: dict[str, Any], isa: str | None,
                bf16: bool) -> list[BackendResult]:
    """Every backend the config asks for, in report order, with one progress bar."""
    results: list[BackendResult] = []
    with progress.steps("bench", _n_steps(cfg, bf16)) as step:
        step("pipeline fp32")
        results.append(bench_pipeline(cfg.checkpoint, texts, gold, cfg.batch_size, cfg.max_length))
        if cfg.pipeline_batch1:
            step("pipeline fp32 b1")
            results.append(bench_pipeline(cfg.checkpoint, texts, gold, 1, cfg.max_length))
        if bf16:
            step("pytorch bf16 autocast")
            results.append(bench_torch_bf16(cfg.checkpoint, texts, gold, cfg.batch_size, cfg.max_length,
                                            isa or "none"))
        if cfg.build is not None:
            results += _ort_rows(cfg, texts, gold, step)
        source = ceiling_source(cfg) if cfg.ceiling else None
        if source is not None:
            step(f"ceiling ({source[0]})")
            results.append(bench_ceiling(*source, cfg.checkpoint, texts, gold, cfg.ceiling_processes,
                                         cfg.ceiling_seconds))
        elif cfg.ceiling:
            cfg.notes.append("ceiling not measured: no repository or build to take the ONNX file from")
        if cfg.served:
            results += bench_served(cfg, texts, gold, served_meta, step)
        if cfg.peer_url:
            step(f"peer {cfg.peer_url}")
            results += bench_peer(cfg, texts, gold)
    return results


def _write_reports(cfg: BenchConfig, results, checks: tuple[list[str], list[str]], meta) -> dict[str, Any]:
    out = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": meta, "results": [asdict(r) for r in results],
        "thresholds": {"lines": checks[0], "failed": checks[1]}, "notes": cfg.notes,
        "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with atomic_directory(cfg.out) as tmp:
        (tmp / "bench.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
        write_markdown(tmp / "bench.md", cfg, results, checks[0], meta)
        plot_bench(results, tmp / "bench.png")
    log.info("wrote %s", cfg.out)
    return out


# The bench of each served task that has rows of its own (keyed by --task): a new task adds its entry here.
TASK_BENCHES: dict[Task, Callable[[BenchConfig], dict[str, Any]]] = {
    Task.EMBEDDING: run_embedding_bench, Task.TOKEN_CLASSIFICATION: run_tagger_bench}


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Measure every backend, check the user's thresholds (--min-ratio, --slo-p99-ms), write
    bench.{json,md,png} into ``cfg.out``; the result's ``failed`` lists the thresholds not met."""
    own = TASK_BENCHES.get(cfg.task)  # a task with a bench of its own; classification: the rows below
    if own is not None:
        return own(cfg)
    import torch

    torch.set_num_threads(cfg.threads)
    texts, gold, source = load_bench_texts(cfg)
    busy, load_before = cpu.busy_processes(), os.getloadavg()
    if busy:
        cfg.notes.append("other processes were busy when the bench started (numbers may be noisy): " + "; ".join(
            f"{b['cpu_percent']:.0f}% {b['cmd'][:60]}" for b in busy))
        log.warning("other processes are using the CPU: %s", busy)
    isa, bf16 = _bf16_isa(cfg)
    served_meta = read_served_repository(cfg.repository, cfg.build, cfg.model_name).summary() if cfg.served else None
    results = measure_all(cfg, texts, gold, served_meta if served_meta is not None else {}, isa, bf16)
    set_ratios(results, f"pytorch pipeline fp32 b{cfg.batch_size}")
    checks = check_thresholds(results, served_meta.get("variant") if served_meta else None, cfg.min_ratio,
                              cfg.slo_p99_ms)
    meta = {
        "n_texts": len(texts), "texts_source": source, "cpu": cpu_model(), "cores": os.cpu_count(),
        "cpu_bf16": isa, "served": served_meta, "busy_processes_at_start": busy,
        "loadavg_at_start": load_before, "loadavg_at_end": os.getloadavg(),
    }
    out = _write_reports(cfg, results, checks, meta)
    return {**out, "out": str(cfg.out.absolute()), "table": (TABLE_HEADER, table_rows(results)),
            "check_lines": checks[0], "failed": checks[1]}
