"""`python -m loadtest profile`: where each served request's time goes, per request, under a closed load.

One run against a local tritonserver on the repository: a warm-up, then ``--concurrency`` gRPC (or HTTP)
clients sending ``--texts-per-request`` texts for ``--seconds``; the metrics port is read before and after,
and the differences divided by the requests served:
  - Triton's own per-model counters (the numbers its statistics API gives; here from the metrics port, which
    needs no admin key): request total, queue, compute_input, compute_infer, compute_output;
  - the model's own timers (``textclf_stage_seconds_total``, serving/models/textmodel.py): the execute call,
    decoding TEXT, the tokenizer, the ONNX Runtime session, the head (answer - tokenizer - session), the
    metrics thread's flushes;
  - the client's latency (the mean over the measured requests).
Derived parts: front = client latency - Triton's request total (HTTP/gRPC parsing, the client library,
loopback); IPC = compute_infer - the model's execute (the python backend's shared-memory hand-off to the
stub and back); respond = execute - decode - answer (building the response tensors, the error boundary).
"""
from __future__ import annotations

import json
import logging
import re
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.atomic import atomic_directory
from loadtest import cpu
from loadtest.clients import closed_loop
from loadtest.errors import LoadtestError
from loadtest.report import markdown_table
from loadtest.run import default_out, parse_protocol
from loadtest.serve import served
from loadtest.texts import load_texts
from serving.contract import DEFAULT_CLASSIFIER, Protocol

log = logging.getLogger(__name__)

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
TRITON = {"request": "nv_inference_request_duration_us", "queue": "nv_inference_queue_duration_us",
          "compute_input": "nv_inference_compute_input_duration_us",
          "compute_infer": "nv_inference_compute_infer_duration_us",
          "compute_output": "nv_inference_compute_output_duration_us"}


@dataclass
class ProfileConfig:
    repository: Path = field(default=Path("model_repository"), metadata={"help": "repository to serve"})
    model: str = field(default=DEFAULT_CLASSIFIER, metadata={"help": "served model to profile"})
    texts: Path | None = field(default=None, metadata={"help": "CSV with a text column (default: the corpus)"})
    n_texts: int = field(default=512, metadata={"help": "texts cycled through"})
    protocol: Protocol = field(default=Protocol.GRPC, metadata={"help": "grpc or http"})
    concurrency: int = field(default=16, metadata={"help": "closed-loop clients"})
    texts_per_request: int = field(default=1, metadata={"help": "texts per request"})
    seconds: float = field(default=10.0, metadata={"help": "measured seconds"})
    warmup_seconds: float = field(default=3.0, metadata={"help": "unmeasured seconds of load first"})
    out: Path | None = field(default=None, metadata={"help": "report directory (default results/profile-<time>/)"})

    def __post_init__(self) -> None:
        self.protocol = parse_protocol(self.protocol)
        if self.concurrency < 1 or self.texts_per_request < 1 or self.seconds <= 0 or self.n_texts < 1:
            raise LoadtestError("--concurrency, --texts-per-request, --n-texts must be >= 1 and --seconds > 0")
        if not Path(self.repository).is_dir():
            raise LoadtestError(f"repository {self.repository} not found")
        self.repository = Path(self.repository)
        self.out = Path(self.out) if self.out is not None else default_out("profile")


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(sample name, frozenset of label pairs): value}."""
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            try:
                out[(m.group(1), frozenset(_LABEL.findall(m.group(2) or "")))] = float(m.group(3))
            except ValueError:
                continue
    return out


def model_counters(samples: dict[tuple[str, frozenset], float], model: str) -> dict[str, float]:
    """The model's Triton counters (microseconds, summed over versions), its stage seconds and its requests."""
    out: dict[str, float] = {}
    for (name, labels), value in samples.items():
        d = dict(labels)
        if d.get("model") != model:
            continue
        for part, metric in TRITON.items():
            if name == metric:
                out[part] = out.get(part, 0.0) + value
        if name == "nv_inference_request_success":
            out["requests"] = out.get("requests", 0.0) + value
        elif name == "nv_inference_exec_count":
            out["executions"] = out.get("executions", 0.0) + value
        elif name == "textclf_stage_seconds_total" and "stage" in d:
            out[f"stage:{d['stage']}"] = out.get(f"stage:{d['stage']}", 0.0) + value * 1e6
    return out


def scrape(metrics_url: str, model: str) -> dict[str, float]:
    url = metrics_url if metrics_url.startswith("http") else f"http://{metrics_url}"
    with urllib.request.urlopen(url.rstrip("/") + ("" if url.endswith("/metrics") else "/metrics"), timeout=10) as r:
        return model_counters(parse_metrics(r.read().decode("utf-8", "replace")), model)


def breakdown(before: dict[str, float], after: dict[str, float], client_mean_ms: float) -> list[tuple[str, float]]:
    """(part, ms per request) rows from two scrapes and the client's mean latency (module docstring)."""
    requests = after.get("requests", 0.0) - before.get("requests", 0.0)
    if requests <= 0:
        raise LoadtestError("the server counted no request between the two scrapes")

    def per(key: str) -> float:
        return (after.get(key, 0.0) - before.get(key, 0.0)) / requests / 1e3

    stage = {s: per(f"stage:{s}") for s in ("execute", "decode", "answer", "tokenize", "encoder", "flush")}
    return [
        ("client latency (mean)", client_mean_ms),
        ("  front: HTTP/gRPC, client library, loopback", client_mean_ms - per("request")),
        ("  Triton request total", per("request")),
        ("    queue", per("queue")),
        ("    compute_input", per("compute_input")),
        ("    compute_infer", per("compute_infer")),
        ("      python-backend IPC (compute_infer - execute)", per("compute_infer") - stage["execute"]),
        ("      model execute", stage["execute"]),
        ("        decode TEXT", stage["decode"]),
        ("        tokenizer", stage["tokenize"]),
        ("        ONNX Runtime", stage["encoder"]),
        ("        head + outputs (answer - tokenizer - ORT)", stage["answer"] - stage["tokenize"] - stage["encoder"]),
        ("        respond + metrics bookkeeping (execute - decode - answer)",
         stage["execute"] - stage["decode"] - stage["answer"]),
        ("    compute_output", per("compute_output")),
        ("    Triton other (total - queue - compute)", per("request") - per("queue") - per("compute_input")
         - per("compute_infer") - per("compute_output")),
        ("metrics flush thread (per request, off the request path but holds the GIL)", stage["flush"]),
    ]


def measure_profile(cfg: ProfileConfig, endpoints, texts: list[str]) -> tuple[list[tuple[str, float]], dict[str, Any]]:
    url = endpoints.url(cfg.protocol)
    closed_loop(cfg.protocol, url, texts, None, concurrency=cfg.concurrency, texts_per_request=cfg.texts_per_request,
                duration_s=cfg.warmup_seconds, warmup_s=0.0, model=cfg.model)
    time.sleep(1.0)  # Triton writes a request's statistics after its response went out
    before, cpu_before = scrape(endpoints.metrics_url, cfg.model), cpu.snapshot(endpoints.pid)
    r = closed_loop(cfg.protocol, url, texts, None, concurrency=cfg.concurrency,
                    texts_per_request=cfg.texts_per_request, duration_s=cfg.seconds, warmup_s=0.0, model=cfg.model)
    cores = cpu.cores_used(cpu_before, cpu.snapshot(endpoints.pid))
    time.sleep(1.0)
    after = scrape(endpoints.metrics_url, cfg.model)
    if r.requests == 0:
        raise LoadtestError(f"no request succeeded ({r.first_error})")
    mean_ms = sum(r.latencies_ms) / len(r.latencies_ms)
    load = {**r.as_dict(), "mean_ms": mean_ms, "cpu_cores": cores,
            "executions": after.get("executions", 0) - before.get("executions", 0),
            "server_requests": after.get("requests", 0) - before.get("requests", 0)}
    return breakdown(before, after, mean_ms), load


def run_profile(cfg: ProfileConfig) -> dict[str, Any]:
    """Profile the served model under load; write profile.{json,md} into ``cfg.out``."""
    texts = list(load_texts(cfg.texts).sample(cfg.n_texts, seed=0).texts)
    with served(cfg.repository) as endpoints:
        rows, load = measure_profile(cfg, endpoints, texts)
    title = (f"{cfg.model}: {cfg.concurrency} {cfg.protocol.value} clients x {cfg.texts_per_request} text(s), "
             f"{load['seq_per_s']:.1f} texts/s, {load['requests_per_s']:.1f} requests/s")
    header = ("part", "ms / request", "share of client latency")
    table = [(part, round(ms, 3), f"{ms / rows[0][1]:.0%}") for part, ms in rows]
    out = {"config": json.loads(json.dumps(asdict(cfg), default=str)), "title": title, "rows": rows, "load": load,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with atomic_directory(cfg.out) as tmp:
        (tmp / "profile.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
        (tmp / "profile.md").write_text(f"# Profile\n\n{title}\n\n{markdown_table(header, table)}\n")
    return {**out, "out": str(cfg.out.absolute()), "table": (header, table)}
