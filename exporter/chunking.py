"""``--long-text chunk``: the definition of a chunked answer and its PyTorch reference.

A text's content tokens (no special tokens) are cut into windows of ``max_length`` - the tokenizer's
special-token count, consecutive windows overlapping by ``overlap`` tokens, at most ``max_chunks`` windows
(the first ones on the truncation side: from the start for right truncation, from the end for left), each
wrapped with the special tokens. Classifiers average the window logits, then apply the head's activation
(softmax / sigmoid; regression averages the scores); embedders average the pooled window embeddings, then
normalise as the model does. Text pairs repeat the first text (truncated to at most half the pair's content
budget) in every window and window the second in the rest (overlap at most half that window). docs/LONG_TEXT.md
has a worked example.

This module is the reference: it slices the WHOLE text's tokens in Python and wraps them with the Hugging
Face tokenizer, independently of the served code (serving/models/tokenization.py cuts the text first and
uses the tokenizers library's stride truncation); tests/test_long_text.py checks that both agree.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from exporter.errors import ExporterError


class LongText(str, enum.Enum):
    TRUNCATE = "truncate"  # truncation=True at max_length on the checkpoint's truncation side (as saved)
    CHUNK = "chunk"  # windows, averaged


DEFAULT_OVERLAP = 32
DEFAULT_MAX_CHUNKS = 16


def default_overlap(max_length: int, specials: int = 2) -> int:
    """The default --chunk-overlap: DEFAULT_OVERLAP tokens, or a quarter window when that is less."""
    return min(DEFAULT_OVERLAP, (max_length - specials) // 4)


@dataclass(frozen=True)
class ChunkConfig:
    """Windows of one chunked row: ``overlap`` tokens shared by consecutive windows, at most ``max_chunks``."""

    overlap: int = field(default=DEFAULT_OVERLAP, metadata={"help": "tokens consecutive windows share"})
    max_chunks: int = field(default=DEFAULT_MAX_CHUNKS, metadata={
        "help": "most windows per text (the first ones on the truncation side): a row costs at most this many "
                "encoder rows of max_length tokens"})

    def __post_init__(self) -> None:
        if self.overlap < 0:
            raise ExporterError(f"invalid chunk-overlap: {self.overlap} (must be >= 0)")
        if not 1 <= self.max_chunks <= 1024:
            raise ExporterError(f"invalid max-chunks: {self.max_chunks} (must be within 1..1024)")

    def check(self, max_length: int, specials: int = 2) -> None:
        """The overlap must leave each window at least half new tokens."""
        width = max_length - specials
        if self.overlap > width // 2:
            raise ExporterError(f"chunk-overlap {self.overlap} is over half a window ({width} tokens at "
                                f"max-length {max_length})")


def _wrap(tokenizer, first: list[int], second: list[int] | None) -> dict[str, list[int]]:
    """A window with the tokenizer's special tokens and token types (the Hugging Face tokenizer's own)."""
    from transformers import PreTrainedTokenizerBase

    if type(tokenizer).build_inputs_with_special_tokens is PreTrainedTokenizerBase.build_inputs_with_special_tokens:
        raise ExporterError(f"--long-text chunk needs a tokenizer class that adds its own special tokens; "
                            f"{type(tokenizer).__name__} does not")
    ids = tokenizer.build_inputs_with_special_tokens(first, second)
    types = tokenizer.create_token_type_ids_from_sequences(first, second)
    return {"input_ids": list(ids), "token_type_ids": list(types)}


def _slices(ids: list[int], width: int, overlap: int, max_chunks: int, left: bool) -> list[list[int]]:
    step, n = width - overlap, len(ids)
    out = []
    for i in range(max_chunks):
        if left:
            end = n - i * step
            out.append(ids[max(0, end - width):end])
            if end - width <= 0:
                break
        else:
            out.append(ids[i * step:i * step + width])
            if i * step + width >= n:
                break
    return out


def reference_windows(tokenizer, text: str, pair: str | None, max_length: int,
                      chunk: ChunkConfig) -> list[dict[str, list[int]]]:
    """The windows of one row (``input_ids``, ``token_type_ids``), from the whole text's content tokens."""
    left = getattr(tokenizer, "truncation_side", "right") == "left"
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    if pair is None:
        width = max_length - tokenizer.num_special_tokens_to_add(False)
        return [_wrap(tokenizer, w, None) for w in _slices(ids, width, chunk.overlap, chunk.max_chunks, left)]
    budget = max_length - tokenizer.num_special_tokens_to_add(True)
    head = ids[-(budget // 2):] if left and len(ids) > budget // 2 else ids[:budget // 2] if not left else ids
    width = budget - len(head)
    second = tokenizer(pair, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    windows = _slices(second, width, min(chunk.overlap, width // 2), chunk.max_chunks, left)
    return [_wrap(tokenizer, head, w) for w in windows]


def window_batches(tokenizer, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int,
                   chunk: ChunkConfig) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """Every window of every row as a batch of one (as the CPU target runs it) and each row's window count."""
    batches, counts = [], []
    for i, text in enumerate(texts):
        windows = reference_windows(tokenizer, text, None if pairs is None else pairs[i], max_length, chunk)
        counts.append(len(windows))
        for w in windows:
            ids = np.asarray([w["input_ids"]], dtype=np.int64)
            batches.append({"input_ids": ids, "attention_mask": np.ones_like(ids),
                            "token_type_ids": np.asarray([w["token_type_ids"]], dtype=np.int64)})
    return batches, counts


def average_rows(values: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """Per-window rows averaged per text (``counts`` windows each, in order)."""
    edges = np.cumsum([0, *counts])
    return np.stack([values[a:b].mean(axis=0) for a, b in zip(edges[:-1], edges[1:])]).astype(values.dtype)


def activation(logits: np.ndarray, head) -> np.ndarray:
    """The head's activation of averaged logits: softmax (single-label), sigmoid (multi-label), none
    (regression); as the served classifier applies it."""
    x = logits.astype(np.float64)
    value = getattr(head, "value", head)
    if value == "multi_label_classification":
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    if value == "regression":
        return logits
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
