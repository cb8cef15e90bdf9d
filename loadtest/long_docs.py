"""Long documents for `loadtest bench --long-docs N` and Locust's `--long-texts N`: texts of 2,000-50,000
characters joined from the example texts, and the in-process run of the served definition (the repository's
own ONNX file and tokenizer, its ``long_text`` setting: truncate, or windows averaged) that the served
throughput is compared with."""
from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from serving.models import runtime
from serving.models.tokenization import LengthTokenizer
from serving.repository import read_repository

log = logging.getLogger(__name__)

MIN_CHARS, MAX_CHARS = 2_000, 50_000


def long_documents(texts: Sequence[str], n: int, seed: int = 0, lo: int = MIN_CHARS,
                   hi: int = MAX_CHARS) -> list[str]:
    """``n`` documents, each of a length drawn log-uniformly from [lo, hi] characters, made by joining
    consecutive texts (from a seeded random start, wrapping around) and cutting at that length."""
    rng = random.Random(seed)
    pool = [t for t in texts if t.strip()]
    if not pool:
        raise ValueError("no texts to build long documents from")
    docs = []
    for _ in range(n):
        want = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        i, parts, size = rng.randrange(len(pool)), [], 0
        while size < want:
            parts.append(pool[i % len(pool)])
            size += len(parts[-1]) + 1
            i += 1
        docs.append(" ".join(parts)[:want])
    return docs


class DefinitionRunner:
    """The served model of a CPU repository run in this process as the server runs it: the same ONNX file,
    tokenizer and settings (serving/models/tokenization.py), one 1-thread session, each window alone,
    window logits averaged. ``label(text)`` -> its label."""

    def __init__(self, repository: Path, model: str | None = None):
        from tokenizers import Tokenizer

        info = read_repository(Path(repository)).model(model)
        params = {k: v.string_value for k, v in info.config.parameters.items()}
        self.contract = info.contract
        self.tokenizer = LengthTokenizer(
            Tokenizer.from_file(str(info.tokenizer_dir / "tokenizer.json")), int(params["max_length"]),
            params.get("truncation_side", "right"), long_text=params.get("long_text", "truncate"),
            overlap=int(params.get("chunk_overlap", "0")), max_windows=int(params.get("max_chunks", "1")))
        self.session = runtime.open_session(info.onnx_path, 1)  # the served model's: ONNX Runtime or OpenVINO
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.windows = 0

    def logits(self, text: str) -> np.ndarray:
        rows = []
        row = self.tokenizer.encode(text)
        for enc in row.encodings:
            columns = {"input_ids": enc.ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.type_ids}
            feeds = {name: np.asarray([columns[name]], dtype=np.int64) for name in self.inputs}
            rows.append(self.session.run([self.contract.encoder_outputs[0]], feeds)[0][0])
        self.windows += row.tokens.windows
        return np.mean(rows, axis=0)

    def label(self, text: str) -> str:
        return self.contract.labels[int(np.argmax(self.logits(text)))]


def time_in_process(runner: DefinitionRunner, docs: Sequence[str]) -> tuple[list[str], list[float], float]:
    """(labels, per-document milliseconds, total seconds) of the documents run one after another."""
    labels, lat = [], []
    start = time.perf_counter()
    for doc in docs:
        t0 = time.perf_counter()
        labels.append(runner.label(doc))
        lat.append((time.perf_counter() - t0) * 1e3)
    return labels, lat, time.perf_counter() - start
