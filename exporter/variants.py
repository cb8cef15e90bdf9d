"""The classifier's variant builders: each precision built (:func:`make`) and timed as the target serves it,
gated through :meth:`Context.gate` (exporter.parity); exporter.pipeline runs them (build and time every one,
then gate in selection's order, stopping at the first that passes). One variant's sessions and data are held
at a time."""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from exporter import int8, int8_search, parity, speed, steps, worker
from exporter.artifacts import MODEL_FILE, GateMode, ParityResult, SpeedResult, Variant
from exporter.choices import Precision, Target
from exporter.config import BuildConfig
from exporter.memory import release_memory
from exporter.parity import Batch, Reference
from exporter.stages import Stages
from serving.models import runtime

log = logging.getLogger(__name__)

FP32, FP16, INT8_DYNAMIC, INT8_STATIC = "fp32", "fp16", "int8_dynamic", "int8_static"
OV_FP32, OV_INT8 = "ov_fp32", "ov_int8"  # OpenVINO hook: the OpenVINO variants (exporter.openvino builds them)
SERVABLE = {Target.CPU: (FP32, FP16, INT8_DYNAMIC, INT8_STATIC, OV_FP32, OV_INT8), Target.GPU: (FP32, FP16)}
# Files of a checkpoint that make a variant's directory loadable by Optimum's ORTModel classes.
_BESIDE_MODEL = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                 "vocab.json", "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model")


@dataclass
class Data:
    """The tokenized rows every variant is judged on (the only data kept across variants)."""

    ref: Reference  # PyTorch on the evaluation rows
    eval_batches: list[Batch]
    tuning_batches: list[Batch]
    tuning_labels: np.ndarray
    calibration: list[Batch]
    singles: list[Batch]  # batch-1 latency rows (batched mode)
    texts: list  # per-row speed texts, or (text, pair) tuples (tokenized inside the timed loop)
    encode: Callable[[str], Batch]
    calibration_source: str = ""
    windows: list[Batch] | None = None  # --long-text chunk: every window of every evaluation row, alone
    window_counts: list[int] | None = None  # windows per evaluation row


@dataclass
class Context:
    """What the variant builders share: the config, where files go, the data, what was built so far."""

    config: BuildConfig
    mode: GateMode
    checkpoint: Path
    out: Path
    scratch: Path
    base: Path  # the fused fp32 graph every variant starts from
    data: Data
    stages: Stages
    variants: dict[str, Variant] = field(default_factory=dict)
    tokenizer_dir: Path | None = None  # where the tokenizer files are (default: the checkpoint)
    _tune_ref: Reference | None = None

    def variant_dir(self, name: str) -> Path:
        """``out/<name>/`` with the checkpoint's config and tokenizer files (ORTModel.from_pretrained loads it)."""
        path = self.out / name
        path.mkdir(parents=True, exist_ok=True)
        tokenizer_dir = self.tokenizer_dir or self.checkpoint
        for fname in _BESIDE_MODEL:
            src = self.checkpoint / fname if fname == "config.json" else tokenizer_dir / fname
            if src.is_file():
                shutil.copy(src, path / fname)
        return path

    def gate(self, path: Path, precision: Precision) -> ParityResult:
        if self.data.windows is not None:
            return parity.check_chunked(path, precision, self.data.ref, self.data.windows, self.data.window_counts,
                                        self.config.budgets)
        return parity.check_variant(path, precision, self.data.ref, self.data.eval_batches, self.config.budgets,
                                    self.mode, self.config.max_batch_tokens)

    def speed(self, path: Path, precision: Precision, seconds: float | None = None) -> SpeedResult:
        """Speed: per row, tokenized, 1 thread (cpu, as served); padded batches of --batch-size (gpu)."""
        seconds = seconds or self.config.speed_seconds
        threads = parity.gate_threads(self.mode)
        sess = parity.session(path, precision, threads=threads)
        if self.mode is GateMode.PER_ROW:
            return speed.measure_per_row(speed.ort_runner(sess), self.data.encode, self.data.texts, seconds, threads)
        return speed.measure(speed.ort_runner(sess), self.data.singles, self.data.eval_batches, seconds)

    def row_timer(self, path: Path, precision: Precision) -> Callable[[Sequence], SpeedResult]:
        """One session of ``path`` (per row, as :meth:`speed` opens it) and a function that times it on
        exactly the texts it is given."""
        threads = parity.gate_threads(self.mode)
        run = speed.ort_runner(parity.session(path, precision, threads=threads))
        return lambda texts: speed.measure_per_row(run, self.data.encode, texts, 0.0, threads, rows=len(texts))

    def fastest_passing(self) -> tuple[str, Variant] | None:
        """(name, record) of the fastest servable variant that passed so far."""
        passing = [(v.speed.throughput_seq_s, n) for n, v in self.variants.items()
                   if n in SERVABLE[self.config.target] and v.parity.passed and v.speed is not None]
        if not passing:
            return None
        name = max(passing)[1]
        return name, self.variants[name]

    def best_passing(self) -> float | None:
        """The throughput of the fastest servable variant that passed so far."""
        found = self.fastest_passing()
        return None if found is None else found[1].speed.throughput_seq_s

    def tuning_reference(self) -> Reference:
        """The fused fp32 graph's answers on the tuning rows, as the gate runs them (computed once)."""
        if self._tune_ref is None:
            sess = parity.session(self.base, Precision.FP32, threads=parity.gate_threads(self.mode), arena=False)
            feeds = parity.gate_feeds(self.data.tuning_batches, self.mode, self.config.max_batch_tokens)
            self._tune_ref = parity.Reference(parity.ort_outputs(sess, feeds, "int8 tuning reference")[0],
                                              self.data.tuning_labels, self.data.ref.head, self.data.ref.threshold)
        return self._tune_ref


Made = tuple[dict, "ParityResult | None"]  # extra Variant fields, and the gate's record when the builder gated


@dataclass
class Builder:
    """One precision: ``make(ctx, dst)`` writes ``dst`` and returns extra record fields (and, for int8,
    the parity record its search already produced)."""

    name: str
    precision: Precision
    step: str | None  # stage name of the make step (None: not worth a stage of its own)
    make: Callable[[Context, Path], Made]


def builders(precisions: tuple[Precision, ...]) -> list[Builder]:
    """The builders of the requested precisions, in build order (fp32 first: it sets the speed floor)."""
    out = []
    if Precision.FP32 in precisions:
        out.append(Builder(FP32, Precision.FP32, None, _make_fp32))
    if Precision.FP16 in precisions:
        out.append(Builder(FP16, Precision.FP16, "convert", _make_fp16))
    if Precision.INT8 in precisions:
        out.append(Builder(INT8_DYNAMIC, Precision.INT8, "quantize", _make_int8))
        out.append(Builder(INT8_STATIC, Precision.INT8, "quantize", _make_int8))
    return out


def candidate(name: str, variant: Variant, target: Target) -> steps.Candidate:
    """A classifier variant as exporter.steps' selection sees it (speed: per-row sequences/s as measured)."""
    return steps.Candidate(name, variant.precision, variant.parity.passed,
                           variant.speed.throughput_seq_s if variant.speed else None, name in SERVABLE[target])


def candidates(variants: dict[str, Variant], target: Target) -> list[steps.Candidate]:
    """The variants as exporter.steps' selection sees them."""
    return [candidate(n, v, target) for n, v in variants.items()]


def make(ctx: Context, builder: Builder) -> tuple[Variant, bool]:
    """build -> speed for one precision, and whether the variant still needs its gate (False when the
    builder gated it, or when it failed to build: a converter failure fails the variant only)."""
    dst = ctx.variant_dir(builder.name) / MODEL_FILE
    try:
        if builder.step:
            with ctx.stages(f"{builder.name}-{builder.step}"):
                extra, record = builder.make(ctx, dst)
        else:
            extra, record = builder.make(ctx, dst)
    except Exception as exc:  # a converter/quantizer failure fails the variant, not the build
        return failed(ctx, builder, exc), False
    speed = extra.pop("speed", None)  # a variant left at its probe: the probe's measure decided, none is retaken
    if speed is None:
        with ctx.stages(f"{builder.name}-speed"):
            speed = ctx.speed(dst, builder.precision)
    release_memory()
    variant = Variant(name=builder.name, precision=builder.precision.value, file=f"{builder.name}/{MODEL_FILE}",
                      size_bytes=served_bytes(dst), speed=speed, servable=builder.name in SERVABLE[ctx.config.target],
                      parity=record or ParityResult(n_examples=0, passed=False, reason="not gated",
                                                    label_agreement=0.0, gate_mode=ctx.mode, gated=False),
                      **extra)
    return variant, record is None


def served_bytes(onnx_path: Path) -> int:
    """What the server loads for a variant: its OpenVINO IR (model.xml + model.bin) when one lies beside its
    model.onnx (the ONNX file is then only the IR's source), else the ONNX file."""
    xml = runtime.ir_beside(onnx_path)
    if xml is None:
        return Path(onnx_path).stat().st_size
    return Path(xml).stat().st_size + (Path(xml).parent / runtime.IR_WEIGHTS).stat().st_size


def failed(ctx: Context, builder: Builder, exc: BaseException) -> Variant:
    log.warning("variant %s failed to build: %s", builder.name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
    shutil.rmtree(ctx.out / builder.name, ignore_errors=True)
    release_memory()
    return Variant(name=builder.name, precision=builder.precision.value, file=None, size_bytes=None, error=str(exc),
                   parity=ParityResult(n_examples=0, passed=False, reason=f"conversion failed: {exc}",
                                       label_agreement=0.0, gate_mode=ctx.mode),
                   servable=builder.name in SERVABLE[ctx.config.target])


def _make_fp32(ctx: Context, dst: Path) -> Made:
    shutil.copyfile(ctx.base, dst)
    return {"fp32_nodes": "all"}, None


def _make_fp16(ctx: Context, dst: Path) -> Made:
    info = worker.call("fp16", src=str(ctx.base), dst=str(dst))
    return {k: info[k] for k in ("fp32_nodes", "fp32_io", "fp32_ops_present", "converter")}, None


def _make_int8(ctx: Context, dst: Path) -> Made:
    kind = int8.STATIC if dst.parent.name == INT8_STATIC else int8.DYNAMIC
    settings = int8.QuantSettings.from_preset(int8.cpu_preset(), is_static=kind == int8.STATIC)
    tuning_feeds = parity.gate_feeds(ctx.data.tuning_batches, ctx.mode, ctx.config.max_batch_tokens)

    def tune(path: Path) -> ParityResult:  # the tuning reference is computed on first use (an exclusion round)
        sess = parity.session(path, Precision.INT8, threads=parity.gate_threads(ctx.mode), arena=False)
        return parity.tuning_check(sess, tuning_feeds, ctx.tuning_reference(), ctx.config.budgets, ctx.mode)

    probe = ProbeSpeed(ctx)
    found = int8_search.search(kind, ctx.base, dst, settings, tune=tune, final=lambda p: ctx.gate(p, Precision.INT8),
                               tuning_batches=ctx.data.tuning_batches, calibration=ctx.data.calibration,
                               max_rounds=ctx.config.max_exclusion_rounds,
                               calibration_cache=ctx.scratch / "calibration.json", throughput=probe,
                               speed_floor=None if ctx.config.exhaustive else ctx.best_passing())
    extra = {"mode": kind, "quantization": settings.describe(), "excluded_nodes": found.excluded,
             "fp32_nodes": found.excluded, "search": {"attempts": found.attempts, "skipped": found.skipped,
                                                      "most_sensitive": found.sensitivity}}
    if found.skipped:  # round 0 timed slower than a passing variant: that measure is its record
        probed = found.calibration_batches < len(ctx.data.calibration)
        extra["speed"] = probe.record(f"int8 {kind} round 0" + (f", a probe calibrated on {found.calibration_batches}"
                                      f" of {len(ctx.data.calibration)} calibration batches" if probed else ""))
        if probed:
            return _with_calibration(ctx, extra, found), probe_record(ctx, found.skipped)
    return _with_calibration(ctx, extra, found), found.eval_record


PROBE_SECONDS = 0.2  # the passing variant's timed seconds in each probe round (the texts both are timed on)
PROBE_ROUNDS = 3


@dataclass
class ProbeSpeed:
    """The speed measure of an int8 round 0 or probe (``probe(path)`` -> seq/s, what the search compares with
    the floor); a variant the measure leaves there records it (:meth:`record`) instead of taking another, so
    its record shows the figure that decided.

    On the CPU target the probe is timed interleaved with the fastest variant that passed: ``PROBE_ROUNDS``
    rounds, both on the same texts in a round (about ``PROBE_SECONDS`` of the passing variant's), the order
    alternating. It returns the passing variant's recorded seq/s times the median of the rounds' ratios, so it
    is below the floor exactly when the probe ran slower in this run. This machine's speed moves from one
    minute to the next (int8_dynamic of one BERT-base-sized checkpoint read 39.6, 51.8 and 66.3 seq/s in three
    builds), and a probe timed alone for 0.5 s against a figure taken minutes earlier once sent an ov_int8
    that runs 0.65x int8_dynamic on to its full calibration (+80 s)."""

    ctx: Context
    last: SpeedResult | None = None
    how: str = f"timed {PROBE_SECONDS:g} s"

    def __call__(self, path: Path) -> float:
        found = self.ctx.fastest_passing() if self.ctx.mode is GateMode.PER_ROW else None
        if found is None:
            self.last = self.ctx.speed(path, Precision.INT8, PROBE_SECONDS)
            return self.last.throughput_seq_s
        name, best = found
        ratio, self.last, k = self._rounds(path, best)
        self.how = (f"timed interleaved with {name} on the same texts ({PROBE_ROUNDS} rounds of {k}): {ratio:.2f}x "
                    f"its speed, so {ratio:.2f}x its recorded {best.speed.throughput_seq_s:g} seq/s")
        self.last.throughput_seq_s = round(best.speed.throughput_seq_s * ratio, 1)
        log.info("int8 probe %s", self.how)
        return self.last.throughput_seq_s

    def _rounds(self, path: Path, best: Variant) -> tuple[float, SpeedResult, int]:
        """(the median ratio of the probe's seq/s to the passing variant's, the probe's last record, texts a round)."""
        texts, k = self.ctx.data.texts, max(5, round(best.speed.throughput_seq_s * PROBE_SECONDS))
        timers = {"best": self.ctx.row_timer(self.ctx.out / best.file, Precision(best.precision)),
                  "probe": self.ctx.row_timer(path, Precision.INT8)}
        ratios, got = [], {}
        for r in range(PROBE_ROUNDS):
            window = [texts[(r * k + i) % len(texts)] for i in range(k)]
            for side in ("best", "probe") if r % 2 == 0 else ("probe", "best"):
                got[side] = timers[side](window)
            ratios.append(got["probe"].throughput_seq_s / got["best"].throughput_seq_s)
        return float(np.median(ratios)), got["probe"], k

    def record(self, what: str) -> SpeedResult:
        self.last.probe = f"{what}, {self.how}: the measure that left it there (not retaken)"
        return self.last


def probe_record(ctx: Context, why: str) -> ParityResult:
    """The final record of a variant left at its probe (an int8 round 0 calibrated on a few rows and timed
    slower than a passing variant): never gated, so never selected (a later speed measure putting it ahead
    would otherwise gate the probe file, not the calibrated one; --exhaustive calibrates and gates it)."""
    found = ctx.fastest_passing()
    faster = f"slower than {found[0]}, which passed" if found else "slower than a variant that passed"
    return ParityResult(n_examples=0, passed=False, reason=f"not gated: {faster} ({why})", label_agreement=0.0,
                        gate_mode=ctx.mode, gated=False)


def _with_calibration(ctx: Context, extra: dict, found: int8_search.SearchResult) -> dict:
    """``extra`` with the static calibration record (the rows the kept file was calibrated on)."""
    if extra["mode"] == int8.STATIC:
        used = ctx.data.calibration[:found.calibration_batches]  # fewer when only a probe was calibrated
        extra["calibration"] = {"rows": int(sum(len(b["input_ids"]) for b in used)),
                                "source": ctx.data.calibration_source, "method": "MinMax", "format": "QDQ"}
    return extra
