"""`python -m loadtest bench`: every way to run the classifier, side by side, on the same texts and threads.

In-process backends (timed per call, tokenization included, texts in file order, padded to the
longest text of each batch, truncated at ``max_length``):
  - HF ``pipeline("text-classification")`` in PyTorch fp32, batch 32 and batch 1 (the baseline),
  - PyTorch bf16 autocast (only where the CPU has AMX, unless forced),
  - ONNX Runtime for each variant of the exporter's build/report.json,
  - the ceiling: the served variant run one text at a time in one 1-thread session per core, all cores at
    once (loadtest.ceiling); served rows are also given as a fraction of it.
Served backends: the Triton repository behind a local tritonserver, HTTP and gRPC, closed loop at each
concurrency (each request ``texts_per_request`` texts), one text per request at one concurrency, and an
open-loop constant-rate run at 70 % of the best closed-loop throughput for the tail-latency goal.
"""
from __future__ import annotations

import enum
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from common.atomic import atomic_directory
from common.provenance import versions
from exporter.config import Task  # classification | embedding (one definition, the exporter's)
from loadtest import progress
from loadtest.errors import LoadtestError
from loadtest.report import fmt, markdown_table
from loadtest.run import default_out, parse_protocol
from serving.contract import DEFAULT_CLASSIFIER, ENCODER_LOGITS, Protocol

log = logging.getLogger(__name__)

PIPELINE_BASELINE = "pytorch pipeline fp32 b32"
GOAL_A_RATIO = 6.0
GOAL_B_RATIO = 0.90
GOAL_D_RATIO = 0.60  # one text per request, of the ceiling
GOAL_C_LOAD = 0.70
GOAL_C_TAIL = 2.0


class Bf16Mode(str, enum.Enum):
    AUTO = "auto"  # only with AMX (amx_bf16 in /proc/cpuinfo)
    ON = "on"
    OFF = "off"


@dataclass
class BenchConfig:
    checkpoint: Path = field(default=Path("finetuned_model"),
                             metadata={"help": "fine-tuned checkpoint (the PyTorch pipeline)"})
    build: Path | None = field(default=Path("build"),
                               metadata={"help": "exporter build directory (the in-process ONNX Runtime variants)"})
    repository: Path | None = field(default=Path("model_repository"),
                                    metadata={"help": "repository of the served deployment"})
    texts: Path | None = field(default=None,
                               metadata={"help": "CSV with a text column (default data/test.csv, else the corpus)"})
    n_texts: int = field(default=512, metadata={"help": "texts measured"})
    threads: int = field(default=2, metadata={"help": "thread budget of every in-process backend"})
    batch_size: int = field(default=32, metadata={"help": "in-process batch size"})
    max_length: int = field(default=128, metadata={"help": "token truncation of the in-process backends"})
    concurrency: tuple[int, ...] = field(default=(1, 4, 16, 32),
                                         metadata={"help": "comma list of served concurrency levels"})
    texts_per_request: int = field(default=8, metadata={"help": "texts per served request"})
    single_text_concurrency: int = field(default=16,
                                         metadata={"help": "concurrency of the 1-text-per-request served point"})
    served_seconds: float = field(default=10.0, metadata={"help": "measured seconds per served point"})
    open_loop_seconds: float = field(default=15.0,
                                     metadata={"help": "seconds of the open-loop (fixed arrival rate) point"})
    warmup_seconds: float = field(default=2.0, metadata={"help": "unmeasured seconds before each served point"})
    protocols: tuple[Protocol, ...] = field(default=(Protocol.HTTP, Protocol.GRPC),
                                            metadata={"help": "comma list of http, grpc"})
    bf16: Bf16Mode = field(default=Bf16Mode.AUTO, metadata={"help": "PyTorch bf16 autocast: auto = only with AMX"})
    pipeline_batch1: bool = field(default=True, metadata={"help": "measure the batch-1 PyTorch pipeline"})
    served: bool = field(default=True, metadata={"help": "measure the served deployment"})
    out: Path | None = field(default=None, metadata={"help": "report directory (default results/bench-<time>/)"})
    seed: int = field(default=0, metadata={"help": "random seed of the text sample"})
    notes: list[str] = field(default_factory=list, init=False)
    ceiling: bool = field(default=True, metadata={
        "help": "measure the ceiling: the served variant, one text at a time, one 1-thread process per core"})
    ceiling_processes: int = field(default=0, metadata={
        "help": "processes of the ceiling run (0: one per usable core)"})
    task: Task = field(default=Task.CLASSIFICATION, metadata={
        "help": "embedding: sentence-transformers encode vs the in-process ceiling vs the served embedder "
                "(--checkpoint: the sentence-transformers directory; --build: its embedding build)"})
    model_name: str | None = field(default=None, metadata={
        "help": "served model to measure (default: embedder with --task embedding)"})
    gateway: bool = field(default=True, metadata={
        "help": "also measure the gateway (docs/GATEWAY.md): the same requests through POST /predict and straight "
                "over gRPC, alternating, at --single-text-concurrency clients and at 1 (loadtest/gateway_bench.py)"})
    long_docs: int = field(default=0, metadata={
        "help": "also measure N long documents (2k-50k characters joined from the texts): served (gRPC, one per "
                "request) vs the in-process run of the same definition (the repository's model, tokenizer and "
                "--long-text setting, one 1-thread session); 0: skip"})

    def __post_init__(self) -> None:
        self.bf16 = Bf16Mode(self.bf16)
        self.task = Task(self.task)
        self.checkpoint = Path(self.checkpoint)
        if not (self.checkpoint / "config.json").is_file():
            raise LoadtestError(f"{self.checkpoint} is not a Hugging Face checkpoint (no config.json)")
        if self.n_texts < 1 or self.threads < 1 or self.batch_size < 1 or self.texts_per_request < 1:
            raise LoadtestError("--n-texts, --threads, --batch-size and --texts-per-request must be >= 1")
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise LoadtestError("--concurrency must be a list of integers >= 1")
        if not self.protocols:
            raise LoadtestError("--protocols must name http and/or grpc")
        self.protocols = tuple(parse_protocol(p) for p in self.protocols)
        if self.ceiling_processes < 0:
            raise LoadtestError("--ceiling-processes must be >= 0")
        if self.build is not None:
            self.build = Path(self.build)
            if not (self.build / "report.json").is_file():
                raise LoadtestError(f"{self.build}/report.json not found (run `python -m exporter build`)")
        if self.served:
            if self.repository is None or not Path(self.repository).is_dir():
                raise LoadtestError(f"repository {self.repository} not found (or pass --no-served)")
            self.repository = Path(self.repository)
        if self.texts is not None and not Path(self.texts).is_file():
            raise LoadtestError(f"texts file {self.texts} not found")
        self.out = Path(self.out) if self.out is not None else default_out("bench")


# ---------------------------------------------------------------- measurements


@dataclass
class BackendResult:
    name: str
    kind: str  # "in-process" | "served" | "open-loop"
    rows_per_call: int
    seq_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    accuracy: float | None
    n_texts: int
    detail: dict[str, Any] = field(default_factory=dict)
    ratio_to_pipeline: float | None = None
    ratio_to_ceiling: float | None = None


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _chunks(seq: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def time_calls(fn: Callable[[Sequence[str]], list[str]], texts: Sequence[str], batch: int
               ) -> tuple[list[str], list[float], float]:
    """Run ``fn`` on every batch after one untimed warm-up call; (predicted labels, ms per call, seconds)."""
    batches = _chunks(texts, batch)
    fn(batches[0])
    preds: list[str] = []
    lat: list[float] = []
    t_all, c_all = time.perf_counter(), time.process_time()
    for b in batches:
        t0 = time.perf_counter()
        preds.extend(fn(b))
        lat.append((time.perf_counter() - t0) * 1e3)
    secs = time.perf_counter() - t_all
    time_calls.last_cores = (time.process_time() - c_all) / secs if secs > 0 else 0.0
    return preds, lat, secs


def accuracy(preds: Sequence[str], gold: Sequence[str] | None) -> float | None:
    if gold is None:
        return None
    return float(np.mean([p == g for p, g in zip(preds, gold)]))


def _result(name: str, kind: str, batch: int, texts, gold, preds, lat, seconds, **detail) -> BackendResult:
    detail = {**detail, "cpu_cores": {"client": round(getattr(time_calls, "last_cores", 0.0), 3)}}
    res = BackendResult(name, kind, batch, len(texts) / seconds, float(np.percentile(lat, 50)),
                        float(np.percentile(lat, 99)), accuracy(preds, gold), len(texts), detail)
    log.info("%-34s %8.1f seq/s  p50 %7.1f ms  p99 %7.1f ms  acc %s", name, res.seq_per_s, res.p50_ms,
             res.p99_ms, fmt(res.accuracy, 4))
    return res


def bench_pipeline(checkpoint: Path, texts, gold, batch: int, max_length: int) -> BackendResult:
    """HF pipeline('text-classification') in PyTorch fp32: what users pick without this toolkit."""
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(checkpoint), tokenizer=str(checkpoint), device=-1)

    def run(b: Sequence[str]) -> list[str]:
        out = pipe(list(b), batch_size=len(b), truncation=True, max_length=max_length)
        return [o["label"] for o in out]

    preds, lat, secs = time_calls(run, texts, batch)
    return _result(f"pytorch pipeline fp32 b{batch}", "in-process", batch, texts, gold, preds, lat, secs)


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
    return _result(f"pytorch bf16 autocast b{batch}", "in-process", batch, texts, gold, preds, lat, secs, isa=isa)


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    from serving.models import runtime

    if runtime.ir_beside(path):  # OpenVINO hook: an OpenVINO variant runs its IR, as served
        return runtime.open_session(path, threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def bench_ort(name: str, onnx_path: Path, checkpoint: Path, texts, gold, batch: int, max_length: int,
              threads: int) -> BackendResult:
    """In-process ONNX Runtime on one exported variant (same tokenizer, same padding as the pipeline)."""
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
    return _result(f"onnxruntime {name} b{batch}", "in-process", batch, texts, gold, preds, lat, secs,
                   onnx=str(onnx_path), variant=name)


def build_variants(build: Path) -> list[tuple[str, Path]]:
    """(variant name, ONNX file) for each usable variant in build/report.json."""
    from loadtest.artifacts import read_build_variants

    return read_build_variants(build)


def bench_ceiling(name: str, onnx_path: Path, checkpoint: Path, texts, gold, max_length: int,
                  processes: int) -> BackendResult:
    """The per-core in-process ceiling of one ONNX file (loadtest.ceiling), as a bench row."""
    from transformers import AutoConfig

    from loadtest.ceiling import measure_ceiling

    id2label = {int(k): v for k, v in AutoConfig.from_pretrained(checkpoint).id2label.items()}
    run = measure_ceiling(onnx_path, checkpoint, texts, max_length, processes)
    res = BackendResult(f"ceiling onnxruntime {name} 1 row x {run.processes} proc", "ceiling", 1, run.seq_per_s,
                        float(np.percentile(run.latencies_ms, 50)), float(np.percentile(run.latencies_ms, 99)),
                        accuracy([id2label[i] for i in run.label_ids], gold), len(texts),
                        {"onnx": str(onnx_path), "variant": name, "processes": run.processes,
                         "per_process_seq_per_s": run.per_process_seq_per_s, "intra_op_threads": 1})
    log.info("%-34s %8.1f seq/s  (%s)", res.name, res.seq_per_s,
             " + ".join(f"{r:.1f}" for r in run.per_process_seq_per_s))
    return res


def ceiling_source(cfg: BenchConfig) -> tuple[str, Path] | None:
    """(variant, ONNX file) the ceiling runs: what the repository serves, else the build's selection."""
    from loadtest.artifacts import read_served_repository, selected_variant

    if cfg.repository is not None and (Path(cfg.repository) / "provenance.json").is_file():
        info = read_served_repository(cfg.repository, cfg.build)
        return info.variant or info.onnx.stem, info.onnx
    if cfg.build is not None:
        variants = dict(build_variants(cfg.build))
        name = selected_variant(cfg.build)
        name = name if name in variants else next(iter(variants))
        return name, variants[name]
    return None


# ---------------------------------------------------------------- served


def _served_plan(cfg: BenchConfig) -> list[tuple[Protocol, int, int]]:
    """(protocol, concurrency, texts per request) of every closed-loop point."""
    plan = [(proto, c, cfg.texts_per_request) for proto in cfg.protocols for c in cfg.concurrency]
    return plan + [(proto, cfg.single_text_concurrency, 1) for proto in cfg.protocols]


def _served_point(cfg: BenchConfig, endpoints, texts, gold, point, served_acc) -> BackendResult:
    from loadtest import cpu
    from loadtest.clients import closed_loop

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
    from loadtest.clients import classify_all

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
    from loadtest import cpu
    from loadtest.clients import open_loop

    proto = Protocol(best.detail["load"]["protocol"])
    sat_rps = best.detail["load"]["requests_per_s"]
    rate = GOAL_C_LOAD * sat_rps
    before = cpu.snapshot(endpoints.pid)
    r = open_loop(proto, endpoints.url(proto), texts, gold, rate_rps=rate, texts_per_request=best.rows_per_call,
                  duration_s=cfg.open_loop_seconds, warmup_s=cfg.warmup_seconds)
    res = BackendResult(f"served {proto.value} open-loop {GOAL_C_LOAD:.0%} x{best.rows_per_call}", "open-loop",
                        best.rows_per_call, r.seq_per_s, r.percentile(50), r.percentile(99), best.accuracy,
                        r.rows, {"load": r.as_dict(), "saturating_requests_per_s": sat_rps,
                                 "cpu_cores": cpu.cores_used(before, cpu.snapshot(endpoints.pid))})
    log.info("%-34s %8.1f seq/s  p50 %7.1f ms  p99 %7.1f ms  (target %.1f req/s)", res.name, res.seq_per_s,
             res.p50_ms or 0, res.p99_ms or 0, rate)
    return res


def served_tokens(log_path: str | None) -> dict[str, Any] | None:
    """The GPU target's token records summed over a server log (rows, sub-batches, real and computed tokens,
    their ratio); None when the log has none (the CPU target runs rows alone and pads nothing)."""
    from serving.models.token_batch import parse_records

    if log_path is None or not Path(log_path).is_file():
        return None
    record = parse_records(Path(log_path).read_text(encoding="utf-8", errors="replace"))
    if not record.rows:
        return None
    return {**asdict(record), "ratio": round(record.ratio, 4)}


def _long_docs_in_process(cfg: BenchConfig, docs: list[str]) -> tuple[BackendResult, list[str]]:
    from loadtest.long_docs import DefinitionRunner, time_in_process

    runner = DefinitionRunner(cfg.repository, cfg.model_name)
    labels, lat, secs = time_in_process(runner, docs)
    res = _result("long docs: in-process definition 1 thread", "long-docs", 1, docs, None, labels, lat, secs,
                  windows_per_doc=runner.windows / len(docs), chars=[min(map(len, docs)), max(map(len, docs))])
    return res, labels


def _long_docs_served(cfg: BenchConfig, endpoints, docs: list[str], ref_labels: list[str]) -> list[BackendResult]:
    """The long documents served over gRPC, one per request, at 1 and 2 clients; agreement with in-process."""
    from loadtest.clients import classify_all, closed_loop

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
    from loadtest.serve import served

    long_rows, docs, ref_labels = [], [], []
    if cfg.long_docs:
        from loadtest.long_docs import long_documents

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
        step(f"served open loop at {GOAL_C_LOAD:.0%} of {best.name}")
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
    from loadtest.gateway_bench import goal_lines, run_beside

    g = run_beside(cfg.repository, endpoints.grpc_url, texts, gold, model=cfg.model_name or DEFAULT_CLASSIFIER,
                   concurrency=cfg.single_text_concurrency, texts_per_request=cfg.texts_per_request,
                   seconds=cfg.served_seconds, warmup_s=cfg.warmup_seconds)
    rows = [BackendResult(f"{p['path']} c{p['concurrency']} x{p['texts_per_request']}", "gateway",
                          p["texts_per_request"], p["seq_per_s"], p["p50_ms"], p["p99_ms"], served_acc, 0,
                          {"rounds": p["rounds"]}) for p in g["points"]]
    cfg.notes.extend(goal_lines(g))
    return rows


# ---------------------------------------------------------------- goals and report


def _goal_a(base: BackendResult | None, best: BackendResult | None, served_variant: str | None,
            baseline: str) -> dict[str, Any]:
    a: dict[str, Any] = {"goal": f"served int8 throughput >= {GOAL_A_RATIO:g}x the PyTorch pipeline ({baseline})",
                         "served_variant": served_variant, "met": None}
    if best and base:
        a.update(served_seq_per_s=best.seq_per_s, served_point=best.name, pipeline_seq_per_s=base.seq_per_s,
                 ratio=best.seq_per_s / base.seq_per_s)
        is_int8 = bool(served_variant and "int8" in served_variant.lower())
        a["met"] = bool(is_int8 and a["ratio"] >= GOAL_A_RATIO)
        if not is_int8:
            a["note"] = f"the repository serves {served_variant!r}, not an int8 variant"
    return a


def _goal_vs_reference(goal: str, minimum: float, served: Sequence[BackendResult],
                       reference: BackendResult | None, note: str) -> dict[str, Any]:
    """The best of ``served`` as a fraction of ``reference`` (the ceiling, else in-process ORT)."""
    best = max(served, key=lambda r: r.seq_per_s, default=None)
    out: dict[str, Any] = {"goal": goal, "met": None}
    if best and reference:
        ratio = best.seq_per_s / reference.seq_per_s
        out.update(served_seq_per_s=best.seq_per_s, served_point=best.name, ort_backend=reference.name,
                   ort_seq_per_s=reference.seq_per_s, ratio=ratio, met=ratio >= minimum)
    else:
        out["note"] = note
    return out


def _goal_c(results: Sequence[BackendResult]) -> dict[str, Any]:
    c: dict[str, Any] = {"goal": f"p99 <= {GOAL_C_TAIL:g}x p50 at {GOAL_C_LOAD:.0%} of the saturating load",
                         "met": None}
    ol = next((r for r in results if r.kind == "open-loop"), None)
    if ol and ol.p50_ms and ol.p99_ms:
        c.update(saturating_requests_per_s=ol.detail["saturating_requests_per_s"],
                 offered_requests_per_s=ol.detail["load"]["target_rps"],
                 achieved_requests_per_s=ol.detail["load"]["requests_per_s"], p50_ms=ol.p50_ms, p99_ms=ol.p99_ms,
                 ratio=ol.p99_ms / ol.p50_ms, met=ol.p99_ms <= GOAL_C_TAIL * ol.p50_ms,
                 failures=ol.detail["load"]["failures"])
    return c


def evaluate_goals(results: Sequence[BackendResult], served_variant: str | None,
                   baseline: str = PIPELINE_BASELINE) -> dict[str, Any]:
    """The goals (a: x pipeline, b: of the ceiling at several texts/request, c: tail latency, d: of the
    ceiling at one text/request); ``met`` is None when a goal could not be measured. The reference of b
    and d is the ceiling row when there is one, else in-process ORT on the served variant."""
    by_name = {r.name: r for r in results}
    served = [r for r in results if r.kind == "served"]
    multi = [r for r in served if r.rows_per_call > 1] or served
    single = [r for r in served if r.rows_per_call == 1]
    reference = next((r for r in results if r.kind == "ceiling"), None)
    if reference is None and served_variant:
        reference = next((r for r in results if r.kind == "in-process"
                          and r.detail.get("variant") == served_variant), None)
    missing = f"no ceiling or in-process ORT result for the served variant {served_variant!r}"
    what = "the ceiling" if reference is not None and reference.kind == "ceiling" else "in-process ORT"
    return {
        "a": _goal_a(by_name.get(baseline), max(served, key=lambda r: r.seq_per_s, default=None), served_variant,
                     baseline),
        "b": _goal_vs_reference(f"served throughput >= {GOAL_B_RATIO:.0%} of {what}, same variant", GOAL_B_RATIO,
                                multi, reference, missing),
        "c": _goal_c(results),
        "d": _goal_vs_reference(f"served at 1 text/request >= {GOAL_D_RATIO:.0%} of {what}", GOAL_D_RATIO,
                                single, reference, missing if single else "no 1-text/request point"),
    }


def goal_lines(goals: dict[str, Any]) -> list[str]:
    lines = []
    for key, g in goals.items():
        verdict = {True: "MET", False: "MISSED", None: "NOT MEASURED"}[g.get("met")]
        if key == "a" and g.get("ratio") is not None:
            nums = (f"{g['served_seq_per_s']:.1f} seq/s ({g['served_point']}, variant {g['served_variant']}) vs "
                    f"pipeline {g['pipeline_seq_per_s']:.1f} = {g['ratio']:.2f}x")
        elif key in ("b", "d") and g.get("ratio") is not None:
            nums = (f"{g['served_point']} {g['served_seq_per_s']:.1f} vs {g['ort_backend']} "
                    f"{g['ort_seq_per_s']:.1f} seq/s = {g['ratio']:.0%}")
        elif key == "c" and g.get("ratio") is not None:
            nums = (f"at {g['offered_requests_per_s']:.1f} req/s offered (saturation "
                    f"{g['saturating_requests_per_s']:.1f}): p50 {g['p50_ms']:.1f} ms, p99 {g['p99_ms']:.1f} ms "
                    f"= {g['ratio']:.2f}x")
        else:
            nums = g.get("note", "")
        note = f" ({g['note']})" if g.get("note") and g.get("ratio") is not None else ""
        lines.append(f"({key}) {g['goal']}: {verdict} — {nums}{note}")
    return lines


TABLE_HEADER = ("backend", "rows/call", "seq/s", "p50 ms", "p99 ms", "x pipeline", "of ceiling", "accuracy")


def table_rows(results: Sequence[BackendResult]) -> list[tuple]:
    return [(r.name, r.rows_per_call, r.seq_per_s, r.p50_ms, r.p99_ms,
             None if r.ratio_to_pipeline is None else f"{r.ratio_to_pipeline:.2f}",
             None if r.ratio_to_ceiling is None else f"{r.ratio_to_ceiling:.2f}",
             None if r.accuracy is None else f"{r.accuracy:.4f}") for r in results]


def write_markdown(path: Path, cfg: BenchConfig, results, goals, meta) -> None:
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
        "## Goals\n",
        *[f"- {line}" for line in goal_lines(goals)],
        "",
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


def plot_bench(results: Sequence[BackendResult], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, max(4, 0.35 * len(results) + 1.5)),
                                   gridspec_kw={"width_ratios": [3, 2]})
    names = [r.name for r in results][::-1]
    vals = [r.seq_per_s for r in results][::-1]
    colors = [{"in-process": "tab:blue", "ceiling": "tab:purple", "served": "tab:green", "open-loop": "tab:olive",
               "gateway": "tab:orange", "long-docs": "tab:red"}[r.kind]
              for r in results][::-1]
    ax1.barh(names, vals, color=colors)
    ax1.set_xlabel("sequences / s")
    ax1.set_title("throughput")
    for proto, style in (("http", "o-"), ("grpc", "s-")):
        pts = sorted((r.detail["load"]["concurrency"], r.seq_per_s, r.p99_ms) for r in results
                     if r.kind == "served" and r.detail["load"]["protocol"] == proto and r.rows_per_call > 1)
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{proto} seq/s")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("concurrent clients")
    ax2.set_ylabel("sequences / s")
    ax2.set_title("served, closed loop")
    ax2b = ax2.twinx()
    for proto, style in (("http", "o:"), ("grpc", "s:")):
        pts = sorted((r.detail["load"]["concurrency"], r.p99_ms or 0) for r in results
                     if r.kind == "served" and r.detail["load"]["protocol"] == proto and r.rows_per_call > 1)
        if pts:
            ax2b.plot([p[0] for p in pts], [p[1] for p in pts], style, alpha=0.6, label=f"{proto} p99 ms")
    ax2b.set_ylabel("p99 latency (ms)")
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = ax2b.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- the whole run


def _load_texts(cfg: BenchConfig) -> tuple[list[str], list[str] | None, str]:
    from loadtest.texts import load_texts

    textset = load_texts(cfg.texts).sample(cfg.n_texts, seed=cfg.seed)
    gold = None if textset.labels is None else list(textset.labels)
    if gold is None:
        cfg.notes.append(f"{textset.source} has no labels: accuracy not measured")
    log.info("bench: %d texts from %s, %d thread(s)", len(textset.texts), textset.source, cfg.threads)
    return list(textset.texts), gold, textset.source


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
    from loadtest.artifacts import build_parity

    parity, results = build_parity(cfg.build), []
    for name, path in build_variants(cfg.build):
        step(f"onnxruntime {name}")
        res = bench_ort(name, path, cfg.checkpoint, texts, gold, cfg.batch_size, cfg.max_length, cfg.threads)
        res.detail["parity_passed"] = parity.get(name)
        if parity.get(name) is False:
            cfg.notes.append(f"{res.name}: this variant FAILED the exporter's parity gate (not servable)")
        results.append(res)
    return results


def _n_steps(cfg: BenchConfig, bf16: bool) -> int:
    n = 1 + cfg.pipeline_batch1 + bf16 + cfg.ceiling
    n += len(build_variants(cfg.build)) if cfg.build is not None else 0
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
            results.append(bench_ceiling(*source, cfg.checkpoint, texts, gold, cfg.max_length,
                                         cfg.ceiling_processes))
        elif cfg.ceiling:
            cfg.notes.append("ceiling not measured: no repository or build to take the ONNX file from")
        if cfg.served:
            results += bench_served(cfg, texts, gold, served_meta, step)
    return results


def _set_ratios(results: Sequence[BackendResult], baseline: str) -> None:
    base = next((r for r in results if r.name == baseline), None)
    ceiling = next((r for r in results if r.kind == "ceiling"), None)
    for r in results:
        r.ratio_to_pipeline = r.seq_per_s / base.seq_per_s if base else None
        if ceiling is not None and r.kind in ("served", "open-loop", "ceiling"):
            r.ratio_to_ceiling = r.seq_per_s / ceiling.seq_per_s


def _write_reports(cfg: BenchConfig, results, goals, meta) -> dict[str, Any]:
    out = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": meta, "results": [asdict(r) for r in results], "goals": goals, "notes": cfg.notes,
        "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with atomic_directory(cfg.out) as tmp:
        (tmp / "bench.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
        write_markdown(tmp / "bench.md", cfg, results, goals, meta)
        plot_bench(results, tmp / "bench.png")
    log.info("wrote %s", cfg.out)
    return out


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Measure every backend, evaluate the goals, write bench.{json,md,png} into ``cfg.out``."""
    if cfg.task is Task.EMBEDDING:
        from loadtest.embedding_bench import run_embedding_bench

        return run_embedding_bench(cfg)
    import torch

    from loadtest import cpu
    from loadtest.artifacts import read_served_repository

    torch.set_num_threads(cfg.threads)
    texts, gold, source = _load_texts(cfg)
    busy, load_before = cpu.busy_processes(), os.getloadavg()
    if busy:
        cfg.notes.append("other processes were busy when the bench started (numbers may be noisy): " + "; ".join(
            f"{b['cpu_percent']:.0f}% {b['cmd'][:60]}" for b in busy))
        log.warning("other processes are using the CPU: %s", busy)
    isa, bf16 = _bf16_isa(cfg)
    served_meta = read_served_repository(cfg.repository, cfg.build).summary() if cfg.served else None
    results = measure_all(cfg, texts, gold, served_meta if served_meta is not None else {}, isa, bf16)
    baseline = f"pytorch pipeline fp32 b{cfg.batch_size}"
    _set_ratios(results, baseline)
    goals = evaluate_goals(results, served_meta.get("variant") if served_meta else None, baseline)
    meta = {
        "n_texts": len(texts), "texts_source": source, "cpu": cpu_model(), "cores": os.cpu_count(),
        "cpu_bf16": isa, "served": served_meta, "busy_processes_at_start": busy,
        "loadavg_at_start": load_before, "loadavg_at_end": os.getloadavg(),
    }
    out = _write_reports(cfg, results, goals, meta)
    out["out"] = str(cfg.out.absolute())
    out["table"] = (TABLE_HEADER, table_rows(results))
    out["goal_lines"] = goal_lines(goals)
    return out
