"""`python -m loadtest tune`: a small Model-Analyzer-style sweep of the served configuration (CPU target).

The CPU target serves each model as ONE python-backend model that runs every row alone (serving.repository,
docs/SERVING.md), so what there is to tune is how many instances of it run and with how many ONNX Runtime
intra-op threads each, and how the dynamic batcher groups requests into one execute call. Stage 1 tries
thread layouts (instances x intra-op threads; by default the repository's own, one per usable core x 1,
half of that x 2 and twice that x 1; each the model would pin, pinned and unpinned) with the repository's
batching; stage 2 varies one batching knob at a time (max queue delay, max batch size) around the best
layout. Each trial writes a repository of the tuned model alone through ``serving.repository.add_model`` into
a temporary directory, starts tritonserver on it and measures a short closed-loop run at fixed concurrency.
The best trial (highest seq/s without failures; within 3 %, the lower p99) is added to the repository the
same way: the tuned model's next version (same ONNX file, tokenizer and contract), every other model of the
repository kept, atomically; tune.json / tune.md record every trial.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from common.atomic import atomic_directory
from loadtest import progress
from loadtest.artifacts import read_served_repository
from loadtest.clients import closed_loop
from loadtest.errors import LoadtestError
from loadtest.report import markdown_table
from loadtest.run import default_out, parse_duration, parse_protocol
from loadtest.serve import served
from loadtest.texts import load_texts
from serving.contract import Head, Protocol, ServedModel
from serving.models import runtime
from serving.repository import (PROVENANCE, RepositoryConfig, Target, add_model, copy_openvino_ir, model_provenance,
                                usable_cores)

log = logging.getLogger(__name__)

TIE = 0.03


def parse_layouts(text: str) -> tuple[tuple[int, int], ...]:
    """``1x2,2x1`` -> ((1, 2), (2, 1)): encoder instances x intra-op threads."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            inst, thr = (int(x) for x in item.lower().split("x"))
        except ValueError as exc:
            raise LoadtestError(f"bad layout {item!r}: use INSTANCESxTHREADS, e.g. 2x1") from exc
        if inst < 1 or thr < 0:
            raise LoadtestError(f"bad layout {item!r}: instances >= 1, threads >= 0")
        out.append((inst, thr))
    if not out:
        raise LoadtestError("no layouts given")
    return tuple(out)


def parse_ints(text: str, what: str, minimum: int = 0) -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as exc:
        raise LoadtestError(f"{what}: comma-separated integers expected, got {text!r}") from exc
    if any(v < minimum for v in values):
        raise LoadtestError(f"{what}: values must be >= {minimum}")
    return values


@dataclass
class TuneConfig:
    repository: Path = field(default=Path("model_repository"),
                             metadata={"help": "repository to tune (written by python -m exporter build)"})
    model_name: str | None = field(default=None, metadata={
        "help": "served model to tune (default: the only one, or classifier); the repository's other models "
                "are kept as they are"})
    texts: Path | None = field(default=None,
                               metadata={"help": "CSV with a text column (default data/test.csv, else the corpus)"})
    duration_per_trial: str = field(default="10s", metadata={"help": "measured length of each trial, e.g. 10s"})
    warmup: str = field(default="2s", metadata={"help": "unmeasured warm-up of each trial"})
    concurrency: int = field(default=16, metadata={"help": "concurrent clients"})
    texts_per_request: int = field(default=8, metadata={"help": "texts per request"})
    protocol: Protocol = field(default=Protocol.GRPC, metadata={"help": "wire protocol"})
    layouts: tuple[tuple[int, int], ...] = field(default=(), metadata={
        "help": "INSTANCESxTHREADS list of stage 1 (empty: the repository's layout, one instance per usable core "
                "x 1 thread, half of that x 2, twice that x 1)"})
    try_unpinned: bool = field(default=True, metadata={
        "help": "stage 1 runs each layout that fits the cores both pinned (one core set per instance) and unpinned: "
                "which is faster depends on the model and the machine (docs/LOADTEST.md)"})
    queue_delays_us: tuple[int, ...] = field(default=(0, 500, 8000),
                                             metadata={"help": "max_queue_delay values to try (stage 2)"})
    max_batch_sizes: tuple[int, ...] = field(default=(32, 128),
                                             metadata={"help": "max_batch_size values to try (stage 2)"})
    n_texts: int = field(default=512, metadata={"help": "texts sent round-robin"})
    apply: bool = field(default=True, metadata={"help": "write the best configuration into the repository"})
    out: Path | None = field(default=None, metadata={"help": "report directory (default results/tune-<time>/)"})
    duration_s: float = field(init=False, default=0.0)
    warmup_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.repository = Path(self.repository)
        if not (self.repository / PROVENANCE).is_file():
            raise LoadtestError(f"{self.repository} is not a repository written by serving.repository "
                                f"(no {PROVENANCE})")
        self.protocol = parse_protocol(self.protocol)
        self.duration_s = parse_duration(self.duration_per_trial)
        self.warmup_s = parse_duration(self.warmup) if str(self.warmup) not in ("0", "0s") else 0.0
        if self.concurrency < 1 or self.texts_per_request < 1 or self.n_texts < 1:
            raise LoadtestError("--concurrency, --texts-per-request and --n-texts must be >= 1")
        if self.texts is not None and not Path(self.texts).is_file():
            raise LoadtestError(f"texts file {self.texts} not found")
        self.out = Path(self.out) if self.out is not None else default_out("tune")


@dataclass(frozen=True)
class _Sources:
    """What every trial serves: copies of the served ONNX file (and its OpenVINO IR, if any) and tokenizer, the
    contract, the base config and the model's exporter record."""

    onnx: Path
    tokenizer_dir: Path
    model: ServedModel
    base: Any  # serving.repository.RepositoryConfig the model was written with
    exporter: dict[str, Any]

    def write(self, out: Path, rcfg, exporter: dict[str, Any] | None = None) -> Path:
        """``out`` serving the same model with ``rcfg`` (serving.repository.add_model, atomic): a new repository
        where there is none, else the model's next version beside every other model ``out`` serves."""
        return add_model(out, onnx_model=self.onnx, tokenizer_dir=self.tokenizer_dir, model=self.model, config=rcfg,
                         provenance=exporter)


def _sources(repository: Path, workdir: Path, model: str | None = None) -> _Sources:
    """Copies of what ``repository`` serves as ``model`` (read through serving.repository.read_repository): the
    trials and the tuned version are written from them."""
    info = read_served_repository(repository, model=model)
    if info.target != Target.CPU.value:
        raise LoadtestError(f"{repository} is a {info.target} repository: tune sweeps the CPU target on this "
                            f"machine (the GPU target is sized on its GPU, docs/SERVING.md)")
    if info.model.head is Head.EMBEDDING:
        raise LoadtestError(f"{repository}: {info.model.name!r} is an embedder, and tune's trials measure a "
                            "classifier's answers; set an embedder's layout with "
                            "python -m exporter build --instances/--intra-op-threads/--no-pin-instances")
    onnx = workdir / "model.onnx"
    shutil.copy2(info.onnx, onnx)
    copy_openvino_ir(info.onnx, workdir)  # an OpenVINO variant's trials (and the result) keep running its IR
    tok = workdir / "tokenizer"
    shutil.copytree(info.tokenizer_dir, tok)
    log.info("tune sources: onnx %s, tokenizer %s", info.onnx, info.tokenizer_dir)
    exporter = dict(model_provenance(info.provenance, info.model.name).get("exporter") or {})
    return _Sources(onnx, tok, info.model, _base_config(info.config), exporter)


def _base_config(raw: Mapping[str, Any]):
    """The RepositoryConfig a repository was written with (its provenance's ``config``)."""
    known = {f.name for f in dataclasses.fields(RepositoryConfig)}
    raw = {k: v for k, v in raw.items() if k in known}
    if "preferred_batch_sizes" in raw:
        raw["preferred_batch_sizes"] = tuple(raw["preferred_batch_sizes"])
    return RepositoryConfig(**raw)


def default_layouts(base) -> tuple[tuple[int, int], ...]:
    """The repository's layout, one instance per usable core x 1 thread, half of that x 2, twice that x 1."""
    n = usable_cores()
    candidates = ((base.instances, base.intra_op_threads), (n, 1), (max(n // 2, 1), 2), (2 * n, 1))
    return tuple(dict.fromkeys(candidates))


def stage1_layouts(cfg: TuneConfig, base) -> list:
    """Stage 1's RepositoryConfigs: each INSTANCESxTHREADS layout pinned and unpinned (``try_unpinned``) when
    the model would pin it (``runtime.pinnable``, the served model's own rule), once and unpinned otherwise."""
    out = []
    for i, t in cfg.layouts or default_layouts(base):
        rcfg = dataclasses.replace(base, encoder_instances=i, intra_op_threads=t)
        fits = runtime.pinnable(i or usable_cores(), t, usable_cores())
        pins = (True, False) if cfg.try_unpinned and fits else (rcfg.pin_instances and fits,)  # as it will run
        out += [dataclasses.replace(rcfg, pin_instances=p) for p in pins]
    return out


def _knobs(cfg) -> dict[str, Any]:
    return {"encoder_instances": cfg.encoder_instances, "intra_op_threads": cfg.intra_op_threads,
            "pin_instances": cfg.pin_instances,
            "max_batch_size": cfg.max_batch_size, "preferred_batch_sizes": list(cfg.preferred_batch_sizes),
            "max_queue_delay_us": cfg.max_queue_delay_us}


def _trial(i: int, stage: str, rcfg, src: _Sources, workdir: Path, cfg: TuneConfig, texts, gold) -> dict[str, Any]:
    """Serve ``rcfg`` from a fresh repository and measure one closed-loop run against it."""
    repo = src.write(workdir / f"trial-{i}", rcfg)
    t0 = time.perf_counter()
    record: dict[str, Any] = {"trial": i, "stage": stage, **_knobs(rcfg)}
    try:
        with served(repo) as ep:
            r = closed_loop(cfg.protocol, ep.url(cfg.protocol), texts, gold, concurrency=cfg.concurrency,
                            texts_per_request=cfg.texts_per_request, duration_s=cfg.duration_s,
                            warmup_s=cfg.warmup_s, model=src.model.name)
        record.update(seq_per_s=r.seq_per_s, p50_ms=r.percentile(50), p99_ms=r.percentile(99),
                      requests=r.requests, failures=r.failures, error=r.first_error)
    except LoadtestError as exc:
        record.update(seq_per_s=0.0, p50_ms=None, p99_ms=None, requests=0, failures=None, error=str(exc))
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    log.info("trial %d (%s) %s: %.1f seq/s, p99 %s ms%s", i, stage, _knobs(rcfg), record["seq_per_s"],
             f"{record['p99_ms']:.1f}" if record["p99_ms"] else "-",
             f", error: {record['error']}" if record.get("error") else "")
    return record


def _better(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    """Is trial ``a`` better than ``b``: valid, faster by more than TIE, or as fast with a lower p99."""
    if a["seq_per_s"] <= 0 or a.get("failures"):
        return False
    if b is None:
        return True
    if a["seq_per_s"] > b["seq_per_s"] * (1 + TIE):
        return True
    if a["seq_per_s"] >= b["seq_per_s"] * (1 - TIE):
        return (a["p99_ms"] or float("inf")) < (b["p99_ms"] or float("inf"))
    return False


def _variations(stage1, cfg: TuneConfig) -> list:
    """Stage 2: one batching knob at a time around the best layout (a max batch size below the texts per
    request would refuse every request: skipped)."""
    out = [dataclasses.replace(stage1, max_queue_delay_us=d) for d in cfg.queue_delays_us
           if d != stage1.max_queue_delay_us]
    for mbs in cfg.max_batch_sizes:
        if mbs != stage1.max_batch_size and mbs >= cfg.texts_per_request:
            pref = tuple(b for b in stage1.preferred_batch_sizes if b <= mbs)
            out.append(dataclasses.replace(stage1, max_batch_size=mbs, preferred_batch_sizes=pref,
                                           max_queue_size=max(stage1.max_queue_size, mbs)))
    return out


def _sweep(cfg: TuneConfig, base, run_trial) -> tuple[list[dict[str, Any]], dict[str, Any], Any]:
    """Both stages, with a progress bar; (trials, best trial, its RepositoryConfig)."""
    trials: list[dict[str, Any]] = []
    best: list = [None, None]  # [record, RepositoryConfig]
    layouts = stage1_layouts(cfg, base)
    n_stage2 = len(cfg.queue_delays_us) + len(cfg.max_batch_sizes)  # at most

    with progress.steps("tune", len(layouts) + n_stage2) as step:
        def run_stage(stage: str, candidates: list) -> None:
            for rcfg in candidates:
                step(f"trial {len(trials) + 1} ({stage})")
                trials.append(run_trial(len(trials) + 1, stage, rcfg))
                if _better(trials[-1], best[0]):
                    best[:] = [trials[-1], rcfg]

        run_stage("layout", layouts)
        if best[1] is None:
            raise LoadtestError("no layout served without failures: " + "; ".join(
                f"trial {t['trial']}: {t.get('error')}" for t in trials))
        run_stage("batching", _variations(best[1], cfg))
    return trials, best[0], best[1]


TABLE_HEADER = ("trial", "stage", "instances", "intra-op", "pinned", "max batch", "preferred", "delay us", "seq/s",
                "p50 ms", "p99 ms", "failures")


def _table_rows(trials: list[dict[str, Any]]) -> list[tuple]:
    return [(t["trial"], t["stage"], t["encoder_instances"], t["intra_op_threads"],
             "yes" if t["pin_instances"] else "no", t["max_batch_size"],
             ",".join(map(str, t["preferred_batch_sizes"])) or "-", t["max_queue_delay_us"], t["seq_per_s"],
             t["p50_ms"], t["p99_ms"], t["failures"] if t.get("error") is None else f"error: {t['error'][:60]}")
            for t in trials]


def _write_reports(cfg: TuneConfig, summary: dict[str, Any], source: str) -> None:
    best = summary["best"]
    with atomic_directory(cfg.out) as tmp:
        (tmp / "tune.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "table"},
                                                  indent=2, default=str) + "\n")
        md = [
            "# Serving configuration sweep\n",
            f"Closed loop, {cfg.protocol.value}, {cfg.concurrency} clients x {cfg.texts_per_request} texts/request, "
            f"{cfg.duration_s:g} s per trial after {cfg.warmup_s:g} s warm-up, texts from `{source}`.\n",
            markdown_table(*summary["table"]),
            f"Best: trial {best['trial']} {({k: v for k, v in best.items() if k not in _RESULT_KEYS})} at "
            f"{best['seq_per_s']:.1f} seq/s" + (" (written into the repository)." if summary["applied"]
                                                else " (not applied)."),
            "",
        ]
        (tmp / "tune.md").write_text("\n".join(md))


_RESULT_KEYS = ("trial", "seq_per_s", "p50_ms", "p99_ms")


def run_tune(cfg: TuneConfig) -> dict[str, Any]:
    """Sweep, write tune.json/tune.md into ``cfg.out``, and (if ``cfg.apply``) rewrite the repository."""
    textset = load_texts(cfg.texts).sample(cfg.n_texts)
    texts, gold = list(textset.texts), None if textset.labels is None else list(textset.labels)
    with tempfile.TemporaryDirectory(prefix="tune-") as tmpname:
        workdir = Path(tmpname)
        src = _sources(cfg.repository, workdir, cfg.model_name)
        log.info("tune: base config %s", _knobs(src.base))
        trials, best, best_cfg = _sweep(cfg, src.base, lambda i, stage, rcfg: _trial(
            i, stage, rcfg, src, workdir, cfg, texts, gold))
        if cfg.apply:
            exporter = dict(src.exporter)
            exporter["tuned"] = {"best": _knobs(best_cfg), "seq_per_s": best["seq_per_s"],
                                 "p99_ms": best["p99_ms"], "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            src.write(cfg.repository, best_cfg, exporter)
            log.info("added the best configuration to %s as %s's next version", cfg.repository, src.model.name)
    summary = {
        "repository": str(cfg.repository.absolute()), "applied": cfg.apply, "base": _knobs(src.base),
        "best": {**_knobs(best_cfg), **{k: best[k] for k in _RESULT_KEYS}},
        "load": {"protocol": cfg.protocol.value, "concurrency": cfg.concurrency,
                 "texts_per_request": cfg.texts_per_request, "duration_s": cfg.duration_s,
                 "warmup_s": cfg.warmup_s, "texts": textset.source, "n_texts": len(texts)},
        "trials": trials, "table": (TABLE_HEADER, _table_rows(trials)),
    }
    _write_reports(cfg, summary, textset.source)
    summary["out"] = str(cfg.out.absolute())
    return summary
