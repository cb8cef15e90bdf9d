"""The embedding parity gate: each variant against sentence-transformers on held-out text.

The reference is ``SentenceTransformer(model_dir, device="cpu").encode`` (what users of the peer get).
Each variant runs the way the CPU target serves (DECISIONS 2/3): every row alone, tokenized to its own
length, in a session with one intra-op thread. The gate reports minimum and mean cosine, the largest norm
gap, and nearest-neighbour agreement (mean top-k overlap of each text's k nearest neighbours inside the
held-out set, variant vs reference); the same pass times per-row throughput with tokenization included.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from exporter import speed
from exporter.artifacts import EmbeddingGate, EmbeddingSpeed  # the gate's typed records, in the build report
from exporter.choices import Precision
from exporter.chunking import ChunkConfig, reference_windows
from exporter.embedding import EmbeddingPipeline, Source, load_tokenizer
from exporter.errors import EvalDataError, ExporterError
from serving.contract import ENCODER_EMBEDDING
from serving.models import runtime, token_batch

log = logging.getLogger(__name__)

WARMUP_ROWS = 8
WINDOW_ROWS = 32  # GPU target: rows per window (the rows of one execute call) that are sorted and sub-batched
REFERENCE_BATCH = 32  # chunked reference: windows per padded PyTorch batch (the pooling masks the padding)


@dataclass(frozen=True)
class Chunked:
    """``--long-text chunk`` for an embedder: a text's embedding is the mean of its windows' embeddings before
    normalisation (``chunk`` windows, exporter/chunking.py), then L2-normalised when the model ``normalize``s.
    The variant graphs of such a build answer the vector before normalisation."""

    chunk: ChunkConfig
    normalize: bool


def finish_windows(vectors: np.ndarray, normalize: bool) -> np.ndarray:
    """One text's embedding from its windows' vectors [windows, dim]: their mean, then L2-normalised (eps 1e-12,
    as torch.nn.functional.normalize) when ``normalize``; float32 [dim]."""
    mean = np.asarray(vectors, dtype=np.float64).mean(axis=0)
    if normalize:
        mean = mean / max(float(np.linalg.norm(mean)), 1e-12)
    return mean.astype(np.float32)


@dataclass(frozen=True)
class EmbeddingBudgets:
    """Per-precision limits a variant must meet to be served."""

    fp32_min_cosine: float = field(default=0.99999, metadata={"help": "fp32: lowest cosine to the reference"})
    fp16_min_cosine: float = field(default=0.999, metadata={"help": "fp16: lowest cosine to the reference"})
    int8_min_cosine: float = field(default=0.99, metadata={"help": "int8: lowest cosine to the reference"})
    int8_min_topk_overlap: float = field(default=0.9, metadata={"help": "int8: mean top-k neighbour overlap"})
    fp32_min_topk_overlap: float = field(default=0.0, metadata={"help": "fp32: mean top-k neighbour overlap"})
    fp16_min_topk_overlap: float = field(default=0.0, metadata={"help": "fp16: mean top-k neighbour overlap"})
    top_k: int = field(default=5, metadata={"help": "neighbours compared per text"})

    def __post_init__(self) -> None:
        for name in ("fp32_min_cosine", "fp16_min_cosine", "int8_min_cosine"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and -1.0 <= value <= 1.0) or math.isnan(value):
                raise ExporterError(f"budget {name} must be a cosine in [-1, 1], got {value!r}")
        for name in ("fp32_min_topk_overlap", "fp16_min_topk_overlap", "int8_min_topk_overlap"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ExporterError(f"budget {name} must be a fraction in [0, 1], got {value!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
            raise ExporterError(f"top_k must be an integer >= 1, got {self.top_k!r}")

    def limits(self, precision: Precision) -> tuple[float, float]:
        """(minimum cosine, minimum top-k overlap) for ``precision``."""
        p = Precision(precision).value
        return getattr(self, f"{p}_min_cosine"), getattr(self, f"{p}_min_topk_overlap")


# ------------------------------------------------------------------------------------------- reference


def reference_model(pipeline: EmbeddingPipeline):
    """The sentence-transformers model for ``pipeline`` (the directory itself when it is one)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer

    if pipeline.source is Source.SENTENCE_TRANSFORMERS:
        return SentenceTransformer(str(pipeline.root), device="cpu")
    body = Transformer(str(pipeline.encoder_dir), max_seq_length=pipeline.max_seq_length)
    modules = [body, Pooling(pipeline.dim, pooling_mode=pipeline.pooling.value)]
    if pipeline.normalize:
        modules.append(Normalize())
    return SentenceTransformer(modules=modules, device="cpu")


def reference_embeddings(model, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
    """``model.encode`` as float32 [n, dim]."""
    out = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(out, dtype=np.float32)


def _pooled(model, windows: Sequence[dict], pad_id: int) -> np.ndarray:
    """The sentence-transformers modules before Normalize (Transformer, Pooling, Dense) on token windows,
    right-padded into batches of REFERENCE_BATCH: float32 [windows, dim]."""
    import torch
    from sentence_transformers.models import Normalize

    modules = [m for m in model if not isinstance(m, Normalize)]
    out = []
    for i in range(0, len(windows), REFERENCE_BATCH):
        part = windows[i:i + REFERENCE_BATCH]
        width = max(len(w["input_ids"]) for w in part)
        features = {name: torch.tensor([w[name] + [pad if name == "input_ids" else 0] * (width - len(w[name]))
                                        for w in part], dtype=torch.long)
                    for name, pad in (("input_ids", pad_id), ("token_type_ids", 0), ("attention_mask", 0))}
        with torch.no_grad():
            for module in modules:
                features = module(features)
        out.append(features["sentence_embedding"].float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def chunked_reference(model, tokenizer, texts: Sequence[str], max_length: int,
                      chunked: Chunked) -> tuple[np.ndarray, list[int]]:
    """(the chunked definition's embeddings [n, dim] by sentence-transformers/PyTorch, each text's window count):
    every text's reference windows (exporter.chunking), pooled (and Dense-projected) without Normalize,
    averaged, then normalised when the model normalises."""
    rows = [reference_windows(tokenizer, text, None, max_length, chunked.chunk) for text in texts]
    for windows in rows:
        for w in windows:
            w["attention_mask"] = [1] * len(w["input_ids"])
    vectors = _pooled(model, [w for windows in rows for w in windows], tokenizer.pad_token_id or 0)
    edges = np.cumsum([0, *map(len, rows)])
    out = [finish_windows(vectors[a:b], chunked.normalize) for a, b in zip(edges[:-1], edges[1:])]
    return np.stack(out), [len(w) for w in rows]


def reference_speed(model, texts: Sequence[str], *, batch_size: int = 32, threads: int = 2) -> EmbeddingSpeed:
    """Throughput of ``model.encode`` (padded batches) with ``threads`` torch threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        reference_embeddings(model, texts[:batch_size], batch_size=batch_size)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        reference_embeddings(model, texts, batch_size=batch_size)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        torch.set_num_threads(before)
    return EmbeddingSpeed(len(texts) / seconds, len(texts), seconds, threads, len(texts) / cpu, cpu)


# --------------------------------------------------------------------------------------------- variant


class RowEncoder:
    """Embeds one text at a time the way the CPU target serves it: own length, 1 intra-op thread."""

    def __init__(self, path: Path, pipeline: EmbeddingPipeline, tokenizer=None):
        self.session = runtime.open_session(path, 1)  # the served model's session: ONNX Runtime or OpenVINO
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.tokenizer = tokenizer or load_tokenizer(pipeline)
        self.max_length = pipeline.max_seq_length

    def shape(self, text: str) -> tuple[int, ...]:
        """The token count of each window ``text`` runs as (what the runtime's per-shape work depends on)."""
        return (len(self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]),)

    def __call__(self, text: str) -> np.ndarray:
        enc = self.tokenizer(text, truncation=True, max_length=self.max_length, return_tensors="np")
        feeds = {name: np.asarray(enc[name], dtype=np.int64) for name in self.inputs}
        return self.session.run([ENCODER_EMBEDDING], feeds)[0][0]


class WindowEncoder(RowEncoder):
    """Embeds one text the way a chunked CPU model serves it: each window alone (one thread), the graph's
    vectors before normalisation averaged, then normalised when the model normalises."""

    def __init__(self, path: Path, pipeline: EmbeddingPipeline, tokenizer=None, *, chunked: Chunked):
        super().__init__(path, pipeline, tokenizer)
        self.chunked = chunked

    def shape(self, text: str) -> tuple[int, ...]:
        return tuple(len(w["input_ids"]) for w in reference_windows(self.tokenizer, text, None, self.max_length,
                                                                    self.chunked.chunk))

    def __call__(self, text: str) -> np.ndarray:
        vectors = []
        for w in reference_windows(self.tokenizer, text, None, self.max_length, self.chunked.chunk):
            ids = np.asarray([w["input_ids"]], dtype=np.int64)
            columns = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                       "token_type_ids": np.asarray([w["token_type_ids"]], dtype=np.int64)}
            vectors.append(self.session.run([ENCODER_EMBEDDING], {n: columns[n] for n in self.inputs})[0][0])
        return finish_windows(np.stack(vectors), self.chunked.normalize)


class BatchEncoder(RowEncoder):
    """Embeds texts the way the GPU target serves them: windows of ``WINDOW_ROWS`` texts, each sorted by length
    and run in token-budget sub-batches padded to their own longest row (serving.models.token_batch)."""

    def __init__(self, path: Path, pipeline: EmbeddingPipeline, tokenizer=None, *,
                 max_batch_tokens: int = token_batch.DEFAULT_MAX_BATCH_TOKENS):
        super().__init__(path, pipeline, tokenizer)
        self.max_batch_tokens = max_batch_tokens
        self.pad_id = self.tokenizer.pad_token_id or 0

    def _run(self, feeds):
        return self.session.run([ENCODER_EMBEDDING], {name: feeds[name] for name in self.inputs})

    def window(self, texts: Sequence[str]) -> np.ndarray:
        enc = [self.tokenizer(t, truncation=True, max_length=self.max_length) for t in texts]
        rows = [{name: np.asarray(e[name], dtype=np.int64) for name in self.inputs} for e in enc]
        (embeddings,), _ = token_batch.run_rows(self._run, rows, self.pad_id, max_batch_tokens=self.max_batch_tokens)
        return embeddings


def encode_batched(encoder: BatchEncoder, texts: Sequence[str]) -> tuple[np.ndarray, EmbeddingSpeed]:
    """Every window of texts in sub-batches (after a short warm-up); the embeddings [n, dim] and throughput."""
    encoder.window(texts[:WARMUP_ROWS])
    t0, c0 = time.perf_counter(), time.process_time()
    rows = [encoder.window(texts[i:i + WINDOW_ROWS]) for i in range(0, len(texts), WINDOW_ROWS)]
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    speed = EmbeddingSpeed(len(texts) / seconds, len(texts), seconds, 1, len(texts) / cpu, cpu)
    return np.concatenate(rows).astype(np.float32), speed


def encode_rows(encoder: RowEncoder, texts: Sequence[str]) -> tuple[np.ndarray, EmbeddingSpeed]:
    """Every text alone (after a short warm-up); the embeddings [n, dim] and the timed throughput."""
    for text in texts[:WARMUP_ROWS]:
        encoder(text)
    t0, c0 = time.perf_counter(), time.process_time()
    rows = [encoder(text) for text in texts]
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    speed = EmbeddingSpeed(len(texts) / seconds, len(texts), seconds, 1, len(texts) / cpu, cpu)
    return np.stack(rows).astype(np.float32), speed


# ---------------------------------------------------------------------------------------------- metrics


def neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Indices [n, k] of each row's k most cosine-similar other rows (stable order on ties)."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def agreement(reference: np.ndarray, got: np.ndarray, top_k: int) -> dict:
    """min/mean cosine, max norm gap, mean top-k overlap and whether ``got`` holds NaN/Inf."""
    if reference.shape != got.shape:
        raise ExporterError(f"variant embeddings have shape {got.shape}, the reference {reference.shape}")
    if len(reference) <= top_k:
        raise EvalDataError(f"nearest-neighbour agreement needs more than top_k={top_k} texts, got {len(reference)}")
    if not np.isfinite(got).all():
        return {"min_cosine": None, "mean_cosine": None, "max_norm_gap": None, "topk_overlap": None, "nan_inf": True}
    g64, r64 = got.astype(np.float64), reference.astype(np.float64)
    g_norm, r_norm = np.linalg.norm(g64, axis=1), np.linalg.norm(r64, axis=1)
    cos = (g64 * r64).sum(axis=1) / np.maximum(g_norm * r_norm, 1e-300)
    ref_nn, got_nn = neighbours(r64, top_k), neighbours(g64, top_k)
    overlap = np.mean([len(set(a) & set(b)) / top_k for a, b in zip(ref_nn, got_nn)])
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "max_norm_gap": float(np.abs(g_norm - r_norm).max()), "topk_overlap": float(overlap), "nan_inf": False}


def judge(precision: Precision, reference: np.ndarray, got: np.ndarray, budgets: EmbeddingBudgets) -> EmbeddingGate:
    """The gate record for one variant's embeddings."""
    min_cos, min_overlap = budgets.limits(precision)
    m = agreement(reference, got, budgets.top_k)
    failures = []
    if m["nan_inf"]:
        failures.append("NaN/Inf in the embeddings")
    else:
        if m["min_cosine"] < min_cos:
            failures.append(f"min cosine {m['min_cosine']:.6f} < {min_cos}")
        if m["topk_overlap"] < min_overlap:
            failures.append(f"top-{budgets.top_k} overlap {m['topk_overlap']:.3f} < {min_overlap}")
    reason = "; ".join(failures) or (f"min cosine {m['min_cosine']:.6f} >= {min_cos}, "
                                     f"top-{budgets.top_k} overlap {m['topk_overlap']:.3f} >= {min_overlap}")
    return EmbeddingGate(len(got), m["min_cosine"], m["mean_cosine"], m["max_norm_gap"], m["topk_overlap"],
                         budgets.top_k, m["nan_inf"], min_cos, min_overlap, not failures, reason)


def encoder_for(path: Path, pipeline: EmbeddingPipeline, tokenizer=None, *, max_batch_tokens: int | None = None,
                chunked: Chunked | None = None) -> RowEncoder:
    """The encoder that runs ``path`` as the target serves it: each window alone, averaged (``chunked``); token-budget
    sub-batches (``max_batch_tokens``: gpu); else each row alone on one thread (cpu)."""
    if chunked is not None:
        return WindowEncoder(path, pipeline, tokenizer, chunked=chunked)
    if max_batch_tokens is None:
        return RowEncoder(path, pipeline, tokenizer)
    return BatchEncoder(path, pipeline, tokenizer, max_batch_tokens=max_batch_tokens)


def check_variant(path: Path, precision: Precision, pipeline: EmbeddingPipeline, texts: Sequence[str],
                  reference: np.ndarray, budgets: EmbeddingBudgets, tokenizer=None, *,
                  label: str = "", max_batch_tokens: int | None = None,
                  chunked: Chunked | None = None) -> EmbeddingGate:
    """Run ``path`` on ``texts`` as the target serves them (:func:`encoder_for`) and judge it against
    ``reference`` (bound to its reference, this is the embedder's ``steps.Gate``)."""
    encoder = encoder_for(path, pipeline, tokenizer, max_batch_tokens=max_batch_tokens, chunked=chunked)
    got, _ = encode_batched(encoder, texts) if isinstance(encoder, BatchEncoder) else encode_rows(encoder, texts)
    gate = judge(Precision(precision), reference, got, budgets)
    log.info("embedding %s%s: %s (%s)", Precision(precision).value, label, "pass" if gate.passed else "FAIL",
             gate.reason)
    return gate


def measure_speed(path: Path, pipeline: EmbeddingPipeline, texts: Sequence[str], tokenizer=None,
                  seconds: float = 1.0, *, max_batch_tokens: int | None = None,
                  chunked: Chunked | None = None) -> EmbeddingSpeed:
    """The variant's throughput as the target serves it, measured the way the classifier's is
    (exporter.speed.measure_per_row: each text tokenized and run alone on one thread for ``seconds``; gpu:
    the served sub-batches over every text); ``rows_per_s`` is what selection ranks by."""
    encoder = encoder_for(path, pipeline, tokenizer, max_batch_tokens=max_batch_tokens, chunked=chunked)
    if isinstance(encoder, BatchEncoder):
        return encode_batched(encoder, texts)[1]
    c0 = time.process_time()
    timed = speed.measure_per_row(encoder, lambda text: text, texts, seconds, 1, shape=encoder.shape)
    cpu = time.process_time() - c0
    rows = timed.throughput_rows
    seconds = rows / timed.throughput_seq_s if timed.throughput_seq_s else 0.0
    return EmbeddingSpeed(timed.throughput_seq_s, rows, round(seconds, 4), 1,
                          (rows + timed.warmed_shapes) / cpu if cpu > 0 else 0.0, round(cpu, 4))


def as_dict(record) -> dict:
    """A dataclass record as plain JSON-able values."""
    return asdict(record)
