"""The embedder's pieces of the one pipeline (exporter.pipeline; exporter.embedding_flow plugs them in): the
gated and tuning texts and their sentence-transformers reference (:func:`prepare_state`), the variants of the
exported body (fp32/fp16/int8 graphs with the pooling head, the OpenVINO ones: :func:`steps`, :func:`make`),
each timed per row on one thread as served (:meth:`EmbeddingState.speed`) and gated through
:meth:`EmbeddingState.gate` (exporter.embedding_gate bound to the reference: a ``steps.Gate``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from exporter import int8, int8_search, openvino
from exporter.choices import Precision
from exporter.chunking import ChunkConfig
from exporter.embedding import (EmbeddingPipeline, append_head_to_file, copy_tokenizer, fp16_variant,
                                fp32_variant, int8_variant, load_tokenizer, read_pipeline)
from exporter.embedding_gate import (Chunked, EmbeddingBudgets, EmbeddingGate, EmbeddingSpeed, check_variant,
                                     chunked_reference, measure_speed, reference_embeddings, reference_model)
from exporter.errors import EvalDataError
from exporter.parity import tokenize
from exporter.pipeline import Step
from exporter.stages import Stages
from exporter.steps import Gate

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


@dataclass
class EmbeddingState:
    """What every embedding variant's builder and gate need, computed once (exporter.embedding_flow's
    reference and export stages): the texts, their reference, the tuning texts and theirs, the body graph."""

    pipeline: EmbeddingPipeline  # the graphs' pipeline (chunked: without Normalize, normalised after the mean)
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
    windows: int = 0  # chunked: windows of the gated texts
    speed_seconds: float = 1.0
    body: Path | None = None  # the exported encoder body every variant starts from

    def gate(self, precision: Precision, label: str = "") -> Gate:
        """The embedding gate bound to the held-out texts' reference and ``precision``'s budgets."""
        return lambda path: check_variant(path, precision, self.pipeline, self.texts, self.reference, self.budgets,
                                          self.tokenizer, label=label, max_batch_tokens=self.max_batch_tokens,
                                          chunked=self.chunked)

    def tuning_gate(self, precision: Precision, label: str) -> Gate:
        """The same gate on the tuning texts (never the gated ones): what the int8 searches judge rounds by."""
        return lambda path: check_variant(path, precision, self.pipeline, self.tuning_texts, self.tuning_reference,
                                          self.budgets, self.tokenizer, label=label,
                                          max_batch_tokens=self.max_batch_tokens, chunked=self.chunked)

    def speed(self, path: Path) -> EmbeddingSpeed:
        """The variant's speed as the target serves it (cpu: per row, 1 thread, tokenization included)."""
        return measure_speed(path, self.pipeline, self.texts, self.tokenizer, self.speed_seconds,
                             max_batch_tokens=self.max_batch_tokens, chunked=self.chunked)


def prepare_state(model_dir: Path, texts: Sequence[str], out_dir: Path, *, pooling: str | None = None,
                  normalize: bool | None = None, budgets: EmbeddingBudgets | None = None,
                  tuning_texts: Sequence[str] = (), max_exclusion_rounds: int = 3, max_batch_tokens: int | None = None,
                  chunk: ChunkConfig | None = None, scratch: Path, speed_seconds: float = 1.0):
    """(the state every variant needs, the sentence-transformers reference model): the gated texts (a chunked
    build adds long ones), the tuning texts (never gated ones), both references, the tokenizer copied to
    ``out_dir/tokenizer``."""
    budgets = budgets or EmbeddingBudgets()
    pipeline = read_pipeline(Path(model_dir), pooling=pooling, normalize=normalize)
    tokenizer = load_tokenizer(pipeline)
    texts, chunked = _gated_texts(texts, tokenizer, pipeline, chunk, budgets.top_k)
    gated = set(texts)
    tuning = [t for t in held_out_texts(tuning_texts, budgets.top_k) if t not in gated] if tuning_texts else []
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    copy_tokenizer(pipeline, Path(out_dir) / "tokenizer")
    model = reference_model(pipeline)
    reference, counts = _reference(model, tokenizer, texts, pipeline, chunked)
    graph = pipeline if chunked is None else replace(pipeline, normalize=False)  # normalised after the mean
    state = EmbeddingState(graph, Path(out_dir), Path(scratch), texts, reference, budgets, tokenizer, tuning,
                           _reference(model, tokenizer, tuning, pipeline, chunked)[0], max_exclusion_rounds,
                           max_batch_tokens, chunked, sum(counts), speed_seconds)
    return state, model


def steps(state: EmbeddingState, precisions: Sequence[Precision], openvino_enabled: bool) -> list[Step]:
    """The variants to build: one per precision, then (cpu target) the OpenVINO ones (exporter.openvino)."""
    out = [Step(p.value, p, _make_onnx) for p in map(Precision, precisions)]
    if not openvino_enabled or state.max_batch_tokens is not None:
        return out
    if not openvino.available():
        log.warning("openvino is not installed: no OpenVINO embedding variants")
        return out
    wanted = tuple(map(Precision, precisions))
    if Precision.FP32 in wanted:
        out.append(Step(openvino.OV_FP32, openvino.gate_precision(openvino.default_precision()), _make_openvino))
    if Precision.INT8 in wanted and state.tuning_texts:
        out.append(Step(openvino.OV_INT8, Precision.INT8, _make_openvino))
    return out


def make(state: EmbeddingState, step: Step, stages: Stages) -> tuple[EmbeddingVariant, bool]:
    """Build and time one variant (stages ``<name>-build`` and ``<name>-speed``): (its record, whether it still
    needs its gate). A conversion failure fails the variant only; the int8 exclusion search gates while it
    builds (its final gate stands)."""
    record = EmbeddingVariant(step.name, step.precision)
    try:
        with stages(f"{step.name}-build"):
            step.make(state, record)
    except Exception as exc:  # noqa: BLE001 - a converter/quantizer failure fails the variant, not the build
        log.warning("embedding %s variant failed: %s", step.name, exc)
        record.error, record.path = f"{type(exc).__name__}: {exc}", None
        return record, False
    with stages(f"{step.name}-speed"):
        record.speed = state.speed(record.path)
    return record, record.gate is None


def not_gated(state: EmbeddingState, precision: Precision, reason: str) -> EmbeddingGate:
    """The gate record of a variant that was built and timed but not gated (selection could not take it)."""
    min_cos, min_overlap = state.budgets.limits(precision)
    return EmbeddingGate(0, None, None, None, None, state.budgets.top_k, False, min_cos, min_overlap, False, reason,
                         gated=False)


def _make_onnx(state: EmbeddingState, record: EmbeddingVariant) -> None:
    dst = state.out_dir / f"{record.name}.onnx"
    if record.precision is Precision.INT8 and state.tuning_texts and state.max_exclusion_rounds > 0:
        _int8_search(dst, state, record)
    else:
        record.path = VARIANT_BUILDERS[record.precision](state.body, state.pipeline, dst)
    record.size_bytes = record.path.stat().st_size


def _make_openvino(state: EmbeddingState, record: EmbeddingVariant) -> None:
    """OpenVINO hook: ov_fp32 (the runtime's default precision; bf16 judged by the fp16 budget) and ov_int8
    (NNCF, calibrated on the tuning texts, its sensitivity rounds judged by the gate on them) from the fp32
    graph with its head (RowEncoder opens the IR)."""
    source = state.scratch / "openvino-source.onnx"
    if not source.is_file():
        fp32_variant(state.body, state.pipeline, source)
    dst = state.out_dir / record.name / "model.onnx"
    calibration = openvino.embedding_rows(state.tokenizer, state.tuning_texts[:openvino.CALIBRATION_ROWS],
                                          state.pipeline.max_seq_length) if record.name == openvino.OV_INT8 else None
    tune = state.tuning_gate(Precision.INT8, f" ({record.name}, tuning texts)")
    record.runtime_settings = openvino.make_embedding(record.name, source, dst, calibration=calibration,
                                                      tune=lambda path: _verdict(tune(path)))
    record.path, record.size_bytes = dst, record.runtime_settings["ir_bytes"]


def _verdict(gate: EmbeddingGate) -> tuple[bool, str]:
    return gate.passed, gate.reason


def _int8_search(dst: Path, state: EmbeddingState, record: EmbeddingVariant) -> None:
    """Dynamic int8 with exporter.int8's exclusion search, judged by the embedding gate (tuning texts for
    the search, the held-out texts for the final word on the kept file)."""
    settings = int8.QuantSettings.from_preset(int8.cpu_preset(), is_static=False)
    tune_gate, final_gate = state.tuning_gate(Precision.INT8, " (tuning texts)"), state.gate(Precision.INT8)

    def tune(body_q: Path) -> EmbeddingGate:
        return tune_gate(append_head_to_file(body_q, state.pipeline, state.scratch / "int8-tuning.onnx"))

    def final(body_q: Path) -> EmbeddingGate:
        record.path = append_head_to_file(body_q, state.pipeline, dst)
        record.gate = final_gate(record.path)
        return record.gate

    batches = tokenize(state.tokenizer, state.tuning_texts[:32], batch_size=16,
                       max_length=state.pipeline.max_seq_length)
    found = int8_search.search(int8.DYNAMIC, state.body, state.scratch / "int8-body.onnx", settings, tune=tune,
                               final=final, tuning_batches=batches, calibration=None,
                               max_rounds=state.max_exclusion_rounds)
    record.excluded_nodes, record.search = list(found.excluded), list(found.attempts)
