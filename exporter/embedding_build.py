"""Build every embedding variant, gate each on held-out text and select the fastest that passes.

``build_embedding_variants`` is the library entry point for ``python -m exporter build --task embedding``:
read the pipeline, export and fuse the encoder body once, write fp32/fp16/int8 graphs with the pooling
head, run the gate (:mod:`exporter.embedding_gate`) and pick, among passing variants, the one with the
highest per-row 1-thread throughput (the CPU target's per-core ceiling, DECISIONS 3).
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from exporter import int8, int8_search, openvino, steps
from exporter.choices import Precision, Target
from exporter.chunking import ChunkConfig
from exporter.embedding import (EmbeddingPipeline, append_head_to_file, copy_tokenizer, export_body, fp16_variant,
                                fp32_variant, int8_variant, load_tokenizer, read_pipeline)
from exporter.embedding_gate import (Chunked, EmbeddingBudgets, EmbeddingGate, EmbeddingSpeed, check_variant,
                                     chunked_reference, reference_embeddings, reference_model, reference_speed)
from exporter.errors import EvalDataError, ExporterError
from exporter.parity import tokenize
from exporter.steps import Candidate

log = logging.getLogger(__name__)

LONG_TEXTS = 8  # chunked builds: gated texts of several windows each (joined from consecutive texts when needed)
LONG_TEXT_WINDOWS = 3  # ... reaching 3 x max_seq_length tokens

VARIANT_BUILDERS: dict[Precision, Callable[[Path, EmbeddingPipeline, Path], Path]] = {
    Precision.FP32: fp32_variant, Precision.FP16: fp16_variant, Precision.INT8: int8_variant,
}


@dataclass
class EmbeddingVariant:
    """One built (or failed) variant: its file, its gate and its per-row throughput."""

    name: str
    precision: Precision
    path: Path | None = None
    size_bytes: int | None = None
    gate: EmbeddingGate | None = None
    speed: EmbeddingSpeed | None = None
    error: str | None = None
    excluded_nodes: list[str] = field(default_factory=list)
    search: list[dict] = field(default_factory=list)
    runtime_settings: dict | None = None  # OpenVINO variants (exporter.openvino)

    @property
    def passed(self) -> bool:
        return self.error is None and self.gate is not None and self.gate.passed


@dataclass
class EmbeddingBuild:
    """Everything the embedding build produced; ``selected`` names the variant to serve (None: none passed)."""

    pipeline: EmbeddingPipeline
    n_texts: int
    budgets: EmbeddingBudgets
    variants: list[EmbeddingVariant] = field(default_factory=list)
    selected: str | None = None
    tokenizer_dir: Path | None = None
    reference_speed: EmbeddingSpeed | None = None
    n_tuning_texts: int = 0
    chunked: Chunked | None = None  # --long-text chunk: the graphs answer before normalisation
    windows: int = 0  # chunked: windows of the gated texts

    def variant(self, name: str) -> EmbeddingVariant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)


def held_out_texts(texts: Sequence[str], top_k: int) -> list[str]:
    """Non-empty, de-duplicated texts in their order (duplicates would tie as each other's neighbours)."""
    seen: dict[str, None] = {}
    for text in texts:
        if isinstance(text, str) and text.strip():
            seen.setdefault(text, None)
    kept = list(seen)
    if len(kept) <= top_k:
        raise EvalDataError(f"the embedding gate needs more than {top_k} distinct non-empty texts, got {len(kept)}")
    if len(kept) < len(texts):
        log.info("embedding gate: %d of %d texts kept (empty or duplicate ones dropped)", len(kept), len(texts))
    return kept


def with_long_texts(texts: Sequence[str], tokenizer, reach: int, n: int = LONG_TEXTS) -> list[str]:
    """``texts`` plus, when fewer than ``n`` of them exceed ``reach`` content tokens, texts made by joining
    consecutive ones until they do: a chunked build gates texts of several windows."""
    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])

    have = sum(length(t) > reach for t in texts[:2000])
    out, start = list(texts), 0
    for _ in range(max(0, n - have)):
        end = start + 1
        while end <= len(texts) and length(" ".join(texts[start:end])) <= reach:
            end += 1
        if end > len(texts):
            break  # too few texts left to reach it
        out.append(" ".join(texts[start:end]))
        start = end
    return out


def _reference(model, tokenizer, texts: Sequence[str], pipeline: EmbeddingPipeline,
               chunked: Chunked | None) -> tuple[np.ndarray | None, list[int]]:
    """(the gate's reference of ``texts``: ``encode``, or the chunked definition (windows averaged); the
    windows of each text)."""
    if not texts:
        return None, []
    if chunked is None:
        return reference_embeddings(model, texts), [1] * len(texts)
    return chunked_reference(model, tokenizer, texts, pipeline.max_seq_length, chunked)


def _gated_texts(texts: Sequence[str], tokenizer, pipeline: EmbeddingPipeline, chunk: ChunkConfig | None,
                 top_k: int) -> tuple[list[str], Chunked | None]:
    """(the texts the gate judges, the chunked definition or None); a chunked build adds long texts."""
    if chunk is None:
        return held_out_texts(texts, top_k), None
    chunk.check(pipeline.max_seq_length, tokenizer.num_special_tokens_to_add(False))
    texts = held_out_texts(texts, top_k)
    return held_out_texts(with_long_texts(texts, tokenizer, LONG_TEXT_WINDOWS * pipeline.max_seq_length),
                          top_k), Chunked(chunk, pipeline.normalize)


def select(variants: Sequence[EmbeddingVariant], target: Target = Target.CPU, forced: str | None = None) -> str | None:
    """The one selection rule (exporter.steps.select) over embedding variants: cpu: the passing variant with
    the highest per-row 1-thread throughput (rows per CPU-second), whatever its runtime; gpu: fp16, else fp32;
    ``forced`` (--variant): that variant if it passed."""
    return steps.select([Candidate(v.name, Precision(v.precision).value, v.passed,
                                   v.speed.rows_per_cpu_s if v.speed is not None else None) for v in variants],
                        target, forced)


@dataclass
class _Context:
    """What every variant's gate needs, computed once."""

    pipeline: EmbeddingPipeline
    out_dir: Path
    scratch: Path
    texts: list[str]
    reference: np.ndarray
    budgets: EmbeddingBudgets
    tokenizer: object
    tuning_texts: list[str]
    tuning_reference: np.ndarray | None
    max_exclusion_rounds: int
    max_batch_tokens: int | None = None  # gpu target: the gate runs the served sub-batches
    chunked: Chunked | None = None  # chunked cpu target: each window alone, averaged (``pipeline`` without Normalize)


def build_embedding_variants(model_dir: Path, texts: Sequence[str], out_dir: Path, *,
                             pooling: str | None = None, normalize: bool | None = None,
                             budgets: EmbeddingBudgets | None = None,
                             precisions: Sequence[Precision | str] = tuple(Precision),
                             tuning_texts: Sequence[str] = (), max_exclusion_rounds: int = 3,
                             opset: int | None = None, measure_reference: bool = False,
                             max_batch_tokens: int | None = None, chunk: ChunkConfig | None = None,
                             openvino: bool = False) -> EmbeddingBuild:
    """Read, export, convert, gate and select; variants land in ``out_dir/<precision>.onnx``, the
    tokenizer in ``out_dir/tokenizer``. A variant whose conversion fails is recorded with its error.

    ``openvino`` (cpu target): also ov_fp32/ov_int8 (exporter.openvino), gated and timed alike.
    ``tuning_texts`` (never the gate's ``texts``) let int8 exclude its most sensitive MatMuls from
    quantization, up to ``max_exclusion_rounds`` times, when round 0 misses its budget on them
    (:func:`exporter.int8_search.search`); without them int8 is quantized once. ``max_batch_tokens`` (gpu target):
    the gate runs the served token-budget sub-batches instead of rows alone. ``chunk`` (--long-text chunk,
    cpu target): the graphs answer the vector before normalisation, the gate judges the mean of each text's
    windows (normalised as the model does) against sentence-transformers on the same windows, long texts added.
    """
    budgets = budgets or EmbeddingBudgets()
    pipeline = read_pipeline(Path(model_dir), pooling=pooling, normalize=normalize)
    tokenizer = load_tokenizer(pipeline)
    texts, chunked = _gated_texts(texts, tokenizer, pipeline, chunk, budgets.top_k)
    gated = set(texts)
    tuning = [t for t in held_out_texts(tuning_texts, budgets.top_k) if t not in gated] if tuning_texts else []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = reference_model(pipeline)
    build = EmbeddingBuild(pipeline, len(texts), budgets, tokenizer_dir=copy_tokenizer(pipeline, out_dir / "tokenizer"),
                           n_tuning_texts=len(tuning), chunked=chunked)
    if measure_reference:
        build.reference_speed = reference_speed(model, texts)
    graph = pipeline if chunked is None else replace(pipeline, normalize=False)  # normalised after the mean
    reference, counts = _reference(model, tokenizer, texts, pipeline, chunked)
    build.windows = sum(counts)
    with tempfile.TemporaryDirectory(prefix="embedding-body-", dir=out_dir) as scratch:
        ctx = _Context(graph, out_dir, Path(scratch), texts, reference, budgets, tokenizer, tuning,
                       _reference(model, tokenizer, tuning, pipeline, chunked)[0], max_exclusion_rounds,
                       max_batch_tokens, chunked)
        body = export_body(pipeline, ctx.scratch, opset=opset)
        for precision in map(Precision, precisions):
            build.variants.append(_variant(precision, body, ctx))
        if openvino and max_batch_tokens is None:  # OpenVINO hook: the CPU target's OpenVINO variants
            build.variants += _openvino_variants(body, ctx, tuple(map(Precision, precisions)))
    build.selected = select(build.variants)
    log.info("embedding variants: %s; selected %s", ", ".join(
        f"{v.name} {'pass' if v.passed else 'fail'}" for v in build.variants), build.selected or "none")
    return build


def _variant(precision: Precision, body: Path, ctx: _Context) -> EmbeddingVariant:
    record = EmbeddingVariant(precision.value, precision)
    dst = ctx.out_dir / f"{precision.value}.onnx"
    try:
        if precision is Precision.INT8 and ctx.tuning_texts and ctx.max_exclusion_rounds > 0:
            return _int8_search(body, dst, ctx, record)
        record.path = VARIANT_BUILDERS[precision](body, ctx.pipeline, dst)
    except (ExporterError, ValueError, RuntimeError, OSError) as exc:
        log.warning("embedding %s variant failed: %s", precision.value, exc)
        record.error = f"{type(exc).__name__}: {exc}"
        return record
    record.size_bytes = record.path.stat().st_size
    record.gate, record.speed = check_variant(record.path, precision, ctx.pipeline, ctx.texts, ctx.reference,
                                              ctx.budgets, ctx.tokenizer, max_batch_tokens=ctx.max_batch_tokens,
                                              chunked=ctx.chunked)
    return record


def _openvino_variants(body: Path, ctx: _Context, precisions: tuple[Precision, ...]) -> list[EmbeddingVariant]:
    """OpenVINO hook: ov_fp32 (the runtime's default precision; bf16 judged by the fp16 budget) and ov_int8
    (NNCF, calibrated on the tuning texts, its sensitivity rounds judged by the gate on them) from the fp32
    graph with its head, gated and timed as every variant (RowEncoder opens the IR)."""
    if not openvino.available():
        log.warning("openvino is not installed: no OpenVINO embedding variants")
        return []
    wanted = [(openvino.OV_FP32, openvino.gate_precision(openvino.default_precision()))] * (Precision.FP32 in precisions)
    wanted += [(openvino.OV_INT8, Precision.INT8)] * (Precision.INT8 in precisions and bool(ctx.tuning_texts))
    fp32 = fp32_variant(body, ctx.pipeline, ctx.scratch / "openvino-source.onnx") if wanted else None
    out = []
    for name, precision in wanted:
        record = EmbeddingVariant(name, precision)
        dst = ctx.out_dir / name / "model.onnx"
        calibration = openvino.embedding_rows(ctx.tokenizer, ctx.tuning_texts[:openvino.CALIBRATION_ROWS],
                                              ctx.pipeline.max_seq_length) if name == openvino.OV_INT8 else None
        try:
            record.runtime_settings = openvino.make_embedding(name, fp32, dst, calibration=calibration,
                                                              tune=lambda path: _ov_tune(path, ctx))
        except Exception as exc:  # noqa: BLE001 - a converter/quantizer failure fails the variant only
            log.warning("embedding %s variant failed: %s", name, exc)
            record.error = f"{type(exc).__name__}: {exc}"
            out.append(record)
            continue
        record.path, record.size_bytes = dst, record.runtime_settings["ir_bytes"]
        record.gate, record.speed = check_variant(dst, precision, ctx.pipeline, ctx.texts, ctx.reference, ctx.budgets,
                                                  ctx.tokenizer, label=f" ({name})", chunked=ctx.chunked)
        out.append(record)
    return out


def _ov_tune(path: Path, ctx: _Context) -> tuple[bool, str]:
    """An ov_int8 round judged by the embedding gate on the tuning texts (never the gated ones)."""
    gate, _ = check_variant(path, Precision.INT8, ctx.pipeline, ctx.tuning_texts, ctx.tuning_reference, ctx.budgets,
                            ctx.tokenizer, label=" (ov_int8, tuning texts)", chunked=ctx.chunked)
    return gate.passed, gate.reason


def _int8_search(body: Path, dst: Path, ctx: _Context, record: EmbeddingVariant) -> EmbeddingVariant:
    """Dynamic int8 with exporter.int8's exclusion search, judged by the embedding gate (tuning texts for
    the search, the held-out texts for the final word on the kept file)."""
    settings = int8.QuantSettings.from_preset(int8.cpu_preset(), is_static=False)

    def tune(body_q: Path) -> EmbeddingGate:
        path = append_head_to_file(body_q, ctx.pipeline, ctx.scratch / "int8-tuning.onnx")
        gate, _ = check_variant(path, Precision.INT8, ctx.pipeline, ctx.tuning_texts, ctx.tuning_reference,
                                ctx.budgets, ctx.tokenizer, label=" (tuning texts)",
                                max_batch_tokens=ctx.max_batch_tokens, chunked=ctx.chunked)
        return gate

    def final(body_q: Path) -> EmbeddingGate:
        record.path = append_head_to_file(body_q, ctx.pipeline, dst)
        record.gate, record.speed = check_variant(record.path, Precision.INT8, ctx.pipeline, ctx.texts,
                                                  ctx.reference, ctx.budgets, ctx.tokenizer,
                                                  max_batch_tokens=ctx.max_batch_tokens, chunked=ctx.chunked)
        return record.gate

    batches = tokenize(ctx.tokenizer, ctx.tuning_texts[:32], batch_size=16, max_length=ctx.pipeline.max_seq_length)
    found = int8_search.search(int8.DYNAMIC, body, ctx.scratch / "int8-body.onnx", settings, tune=tune, final=final,
                               tuning_batches=batches, calibration=None, max_rounds=ctx.max_exclusion_rounds)
    record.excluded_nodes, record.search = list(found.excluded), list(found.attempts)
    record.size_bytes = record.path.stat().st_size
    return record
