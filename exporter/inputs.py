"""Validate the build's inputs before any slow work: checkpoint, CSVs, output locations."""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from exporter.errors import CheckpointError, EvalDataError, ExporterError

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors",)  # only safetensors: a pickle (pytorch_model.bin) can run code on load
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


@dataclass
class Checkpoint:
    """A validated Hugging Face sequence-classification checkpoint."""

    path: Path
    model_type: str
    architecture: str
    id2label: dict[int, str]
    metrics: dict = field(default_factory=dict)

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in self.id2label.items()}

    @property
    def data_dir(self) -> Path | None:
        data_dir = self.metrics.get("data_dir")
        return Path(data_dir) if data_dir else None


@dataclass
class Examples:
    """Texts and integer labels read from a CSV (``text,label``)."""

    source: Path
    texts: list[str]
    labels: list[int]

    def head(self, n: int) -> "Examples":
        return Examples(self.source, self.texts[:n], self.labels[:n])

    def __len__(self) -> int:
        return len(self.texts)


def load_checkpoint(path: Path) -> Checkpoint:
    """Check that ``path`` is a readable HF sequence classifier with labels and a tokenizer."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path}: config.json is not a JSON object")
    architectures = config.get("architectures") or []
    arch = next((a for a in architectures if str(a).endswith("ForSequenceClassification")), None)
    if arch is None:
        raise CheckpointError(
            f"checkpoint {path} is not a sequence classifier (architectures: {architectures or 'none'})"
        )
    raw = config.get("id2label") or {}
    try:
        id2label = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError, AttributeError):
        raise CheckpointError(f"checkpoint {path}: id2label is malformed") from None
    if len(id2label) < 2 or sorted(id2label) != list(range(len(id2label))):
        raise CheckpointError(f"checkpoint {path}: id2label must map 0..n-1 to n >= 2 labels, got {raw}")
    weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        if (path / "pytorch_model.bin").is_file():
            raise CheckpointError(f"checkpoint {path} has only pickle weights (pytorch_model.bin); only safetensors "
                                  "are loaded: re-save it with save_pretrained(..., safe_serialization=True)")
        raise CheckpointError(f"checkpoint {path} has no weights ({' or '.join(WEIGHT_FILES)})")
    if weights.suffix == ".safetensors":
        _check_safetensors(weights)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"checkpoint {path} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    metrics: dict = {}
    metrics_file = path / "metrics.json"
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {path}: metrics.json is not valid JSON ({exc})") from None
    return Checkpoint(path=path, model_type=str(config.get("model_type", "")), architecture=arch,
                      id2label=id2label, metrics=metrics if isinstance(metrics, dict) else {})


def _check_safetensors(weights: Path) -> None:
    """Read the safetensors header and check the file holds every tensor it declares (cheap)."""
    try:
        size = weights.stat().st_size
        with open(weights, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len <= 0 or header_len > size - 8:
                raise ValueError("bad header length")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise ValueError(f"truncated: {size} bytes, header declares {8 + header_len + end}")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"checkpoint weights {weights} are corrupt ({exc})") from None


def read_examples(path: Path, label2id: dict[str, int], *, limit: int | None = None) -> Examples:
    """Read ``text,label`` rows; labels may be label names or integer ids."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"evaluation data {path} does not exist")
    texts: list[str] = []
    labels: list[int] = []
    unknown: set[str] = set()
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            missing = [c for c in ("text", "label") if c not in fields]
            if missing:
                raise EvalDataError(f"{path} lacks column(s) {', '.join(missing)} (has: {', '.join(fields) or 'none'})")
            for row in reader:
                text, label = row.get("text"), (row.get("label") or "").strip()
                if text is None or not label:
                    continue
                if label in label2id:
                    labels.append(label2id[label])
                elif label.isdigit() and int(label) in label2id.values():
                    labels.append(int(label))
                else:
                    unknown.add(label)
                    continue
                texts.append(text)
                if limit is not None and len(texts) >= limit:
                    break
    except (UnicodeDecodeError, csv.Error) as exc:
        raise EvalDataError(f"{path} is not a readable UTF-8 CSV ({exc})") from None
    if unknown:
        shown = ", ".join(sorted(unknown)[:5])
        raise EvalDataError(f"{path} has labels the checkpoint does not know: {shown} (known: {', '.join(label2id)})")
    if not texts:
        raise EvalDataError(f"{path} has no usable rows")
    return Examples(path, texts, labels)


def resolve_eval_data(checkpoint: Checkpoint, eval_data: Path | None) -> Path:
    """The explicit --eval-data, or ``<metrics.json data_dir>/test.csv``."""
    if eval_data is not None:
        return Path(eval_data)
    if checkpoint.data_dir is None:
        raise EvalDataError(
            f"no --eval-data given and {checkpoint.path}/metrics.json names no data_dir to find test.csv in"
        )
    return checkpoint.data_dir / "test.csv"


def split_sources(checkpoint: Checkpoint, eval_path: Path) -> dict[str, Path]:
    """``train.csv`` and ``validation.csv`` beside the data record (or the eval CSV), never the eval file."""
    dirs = [d for d in (checkpoint.data_dir, eval_path.parent) if d is not None]
    found: dict[str, Path] = {}
    for name in ("train", "validation"):
        for d in dirs:
            p = d / f"{name}.csv"
            if p.is_file() and p.resolve() != eval_path.resolve():
                found[name] = p
                break
    return found


def check_writable(path: Path, what: str) -> None:
    """Fail early when ``path`` cannot be created or replaced (its parent, or nearest ancestor, is read-only)."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise ExporterError(f"{what} {path} exists and is not a directory")
    probe = path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ExporterError(f"{what} {path} cannot be created: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ExporterError(f"{what} {path} is not writable ({probe} denies writing)")
