"""What every `loadtest bench` flavour shares (the classifier's loadtest.bench, the embedder's
loadtest.embedding_bench, the ceiling's loadtest.ceiling): the config, a table row (BackendResult), the
machine's CPU facts, the timing loop, the ratios and the plot. A leaf: it imports no other bench module."""
from __future__ import annotations

import enum
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

import numpy as np

from exporter.config import Task  # classification | embedding (one definition, the exporter's)
from loadtest.errors import LoadtestError
from loadtest.report import fmt
from loadtest.run import default_out, parse_protocol
from loadtest.texts import load_texts
from serving.contract import Protocol

log = logging.getLogger(__name__)


PEER_KEY_ENV = "LOADTEST_PEER_API_KEY"  # the peer's bearer key, if it wants one (never a flag: ps shows flags)


class PeerApi(str, enum.Enum):
    """How to talk to a peer server (``--peer-url``)."""

    TEI = "tei"  # text-embeddings-inference: POST /predict (classify), /embed (embed); base URL = the server
    OPENAI = "openai"  # OpenAI-compatible/infinity: POST /embeddings, /classify (infinity); base URL incl. any /v1


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
                "(--checkpoint: the sentence-transformers directory; --build: its embedding build); "
                "token-classification: transformers.pipeline vs the served tagger (--repository; no build is read)"})
    model_name: str | None = field(default=None, metadata={
        "help": "served model to measure (default: embedder with --task embedding, tagger with "
                "--task token-classification)"})
    gateway: bool = field(default=True, metadata={
        "help": "also measure the gateway (docs/GATEWAY.md): the same requests through POST /predict and straight "
                "over gRPC, alternating, at --single-text-concurrency clients and at 1 (loadtest/gateway_bench.py)"})
    ceiling_seconds: float = field(default=8.0, metadata={
        "help": "timed seconds of each ceiling process (whole passes over the texts, after each distinct "
                "input shape ran once untimed)"})
    open_loop_load: float = field(default=0.7, metadata={
        "help": "the open-loop point's arrival rate as a fraction of the best closed-loop rate"})
    min_ratio: float = field(default=0.0, metadata={
        "help": "fail (exit 1) unless the best served row of each texts-per-request shape reaches this fraction "
                "of the ceiling; 0: not checked"})
    slo_p99_ms: float = field(default=0.0, metadata={
        "help": "fail (exit 1) unless the open-loop row's p99 latency is within this many ms; 0: not checked"})
    peer_url: str | None = field(default=None, metadata={
        "help": "a peer server on the same model, measured at the served load shapes as rows of the same table "
                f"(text-embeddings-inference, infinity or OpenAI-compatible; bearer key from ${PEER_KEY_ENV})"})
    peer_api: PeerApi = field(default=PeerApi.TEI, metadata={
        "help": "tei: POST URL/predict or URL/embed; openai: POST URL/classify (infinity) or URL/embeddings "
                "(URL includes any /v1 prefix, as an OpenAI client's base_url)"})
    peer_model: str | None = field(default=None, metadata={"help": "the model field sent to an openai peer"})
    rounds: int = field(default=2, metadata={
        "help": "--task embedding: rounds of each served/peer point, interleaved at each load shape in alternating "
                "order (A B, B A, ...); a row's rows/s is the mean of its rounds"})
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
        if min(self.n_texts, self.threads, self.batch_size, self.texts_per_request, self.rounds) < 1:
            raise LoadtestError("--n-texts, --threads, --batch-size, --texts-per-request and --rounds must be >= 1")
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise LoadtestError("--concurrency must be a list of integers >= 1")
        if not self.protocols:
            raise LoadtestError("--protocols must name http and/or grpc")
        self.protocols = tuple(parse_protocol(p) for p in self.protocols)
        if self.ceiling_processes < 0 or self.ceiling_seconds <= 0:
            raise LoadtestError("--ceiling-processes must be >= 0 and --ceiling-seconds > 0")
        if not 0 < self.open_loop_load <= 1 or self.min_ratio < 0 or self.slo_p99_ms < 0:
            raise LoadtestError("--open-loop-load must be in (0, 1]; --min-ratio and --slo-p99-ms must be >= 0")
        self.peer_api = PeerApi(self.peer_api)
        if self.peer_url is not None and urlsplit(str(self.peer_url)).scheme not in ("http", "https"):
            raise LoadtestError(f"--peer-url must be an http(s) URL, not {self.peer_url!r}")
        if self.task is Task.TOKEN_CLASSIFICATION:
            self.build = None  # the tagger bench has no in-process variant rows: it reads no build
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


def result_row(name: str, kind: str, batch: int, texts, gold, preds, lat, seconds, **detail) -> BackendResult:
    detail = {**detail, "cpu_cores": {"client": round(getattr(time_calls, "last_cores", 0.0), 3)}}
    res = BackendResult(name, kind, batch, len(texts) / seconds, float(np.percentile(lat, 50)),
                        float(np.percentile(lat, 99)), accuracy(preds, gold), len(texts), detail)
    log.info("%-34s %8.1f seq/s  p50 %7.1f ms  p99 %7.1f ms  acc %s", name, res.seq_per_s, res.p50_ms,
             res.p99_ms, fmt(res.accuracy, 4))
    return res


def plot_bench(results: Sequence[BackendResult], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, max(4, 0.35 * len(results) + 1.5)),
                                   gridspec_kw={"width_ratios": [3, 2]})
    names = [r.name for r in results][::-1]
    vals = [r.seq_per_s for r in results][::-1]
    colors = [{"in-process": "tab:blue", "ceiling": "tab:purple", "served": "tab:green", "open-loop": "tab:olive",
               "gateway": "tab:orange", "long-docs": "tab:red", "peer": "tab:gray"}[r.kind]
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


def load_bench_texts(cfg: BenchConfig) -> tuple[list[str], list[str] | None, str]:
    textset = load_texts(cfg.texts).sample(cfg.n_texts, seed=cfg.seed)
    gold = None if textset.labels is None else list(textset.labels)
    if gold is None:
        cfg.notes.append(f"{textset.source} has no labels: accuracy not measured")
    log.info("bench: %d texts from %s, %d thread(s)", len(textset.texts), textset.source, cfg.threads)
    return list(textset.texts), gold, textset.source


def set_ratios(results: Sequence[BackendResult], baseline: str) -> None:
    base = next((r for r in results if r.name == baseline), None)
    ceiling = next((r for r in results if r.kind == "ceiling"), None)
    for r in results:
        r.ratio_to_pipeline = r.seq_per_s / base.seq_per_s if base else None
        if ceiling is not None and r.kind in ("served", "open-loop", "ceiling", "peer"):
            r.ratio_to_ceiling = r.seq_per_s / ceiling.seq_per_s


def _reference(results: Sequence[BackendResult], served_variant: str | None) -> BackendResult | None:
    """What served rows are a fraction of: the ceiling row, else in-process ORT on the served variant."""
    ceiling = next((r for r in results if r.kind == "ceiling"), None)
    if ceiling is not None or not served_variant:
        return ceiling
    return next((r for r in results if r.kind == "in-process" and r.detail.get("variant") == served_variant), None)


def check_thresholds(results: Sequence[BackendResult], served_variant: str | None, min_ratio: float = 0.0,
                     slo_p99_ms: float = 0.0) -> tuple[list[str], list[str]]:
    """(verdict lines, the failed ones) of the thresholds the user set (0: not checked). ``min_ratio``: the best
    served closed-loop row of each texts-per-request shape reaches that fraction of the ceiling (else of
    in-process ORT on the served variant). ``slo_p99_ms``: the open-loop row's p99 (at ``--open-loop-load`` of
    the saturating rate) is within it. A threshold that cannot be checked (no row to check) fails."""
    lines, failed = [], []

    def verdict(ok: bool, text: str) -> None:
        lines.append(f"{'PASS' if ok else 'FAIL'}: {text}")
        if not ok:
            failed.append(text)

    if min_ratio > 0:
        reference = _reference(results, served_variant)
        served = [r for r in results if r.kind == "served"]
        if reference is None or not served:
            verdict(False, f"--min-ratio {min_ratio:g}: no {'served row' if reference else 'ceiling'} to compare")
        for k in sorted({r.rows_per_call for r in served} if reference else set(), reverse=True):
            best = max((r for r in served if r.rows_per_call == k), key=lambda r: r.seq_per_s)
            ratio = best.seq_per_s / reference.seq_per_s
            verdict(ratio >= min_ratio, f"{best.name} {best.seq_per_s:.1f} seq/s = {ratio:.2f} of {reference.name} "
                                        f"{reference.seq_per_s:.1f} (--min-ratio {min_ratio:g})")
    if slo_p99_ms > 0:
        ol = next((r for r in results if r.kind == "open-loop" and r.p99_ms is not None), None)
        if ol is None:
            verdict(False, f"--slo-p99-ms {slo_p99_ms:g}: no open-loop row was measured")
        else:
            verdict(ol.p99_ms <= slo_p99_ms, f"{ol.name} p99 {ol.p99_ms:.1f} ms (--slo-p99-ms {slo_p99_ms:g})")
    return lines, failed
