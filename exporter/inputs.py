"""Validate the build's inputs before any slow work: checkpoint, tokenizer, CSVs, output locations.

A checkpoint is read the way transformers reads it (``AutoConfig``, ``AutoTokenizer``), whatever way its
owner saved it: ``Trainer.save_model`` without a tokenizer (pass ``tokenizer=``), no ``id2label`` (the
transformers default ``LABEL_0..``), a slow tokenizer (converted to a fast one in a scratch directory),
sharded safetensors. Pickle weights stay refused.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import CheckpointError, EvalDataError, ExporterError, TokenizerError
from serving.contract import DEFAULT_CLASSIFIER, Head, ServedModel

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors",)  # only safetensors: a pickle (pytorch_model.bin) can run code on load
SHARD_INDEX = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
FAST_TOKENIZER = "tokenizer.json"
SLOW_TOKENIZER_FILES = ("vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "spm.model",
                        "tokenizer.model")
TOKENIZER_FILES = (FAST_TOKENIZER, *SLOW_TOKENIZER_FILES)
# The heads the build exports, gates and serves (each with its own gate and served outputs: exporter.parity,
# serving.contract.ServedModel.outputs).
SERVED_HEADS: tuple[Head, ...] = (Head.SINGLE_LABEL, Head.MULTI_LABEL, Head.REGRESSION)
# Position ids of these models start after the padding index (padding_idx + 1): RoBERTa's
# create_position_ids_from_input_ids. Their usable length is max_position_embeddings - pad_token_id - 1.
PADDING_OFFSET_MODELS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                                   "data2vec-text", "longformer", "ibert", "mpnet", "markuplm", "luke"})
MULTI_LABEL_SEPARATOR = "|"
TRAINING_RECORD = "metrics.json"


@dataclass(frozen=True)
class Columns:
    """Which CSV columns hold the text, the label and (for text pairs) the second text."""

    text: str = "text"
    label: str = "label"
    text_pair: str | None = None

    def __post_init__(self) -> None:
        names = [n for n in (self.text, self.label, self.text_pair) if n is not None]
        if not all(names):
            raise ExporterError("CSV column names must not be empty")
        if len(set(names)) != len(names):
            raise ExporterError(f"the text, label and text-pair columns must differ, got {names}")

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(n for n in (self.text, self.text_pair, self.label) if n is not None)


@dataclass
class Checkpoint:
    """A validated Hugging Face sequence-classification checkpoint."""

    path: Path
    model_type: str
    architecture: str
    id2label: dict[int, str]
    metrics: dict = field(default_factory=dict)
    head: Head = Head.SINGLE_LABEL
    tokenizer_dir: Path | None = None  # holds tokenizer.json (+ tokenizer_config.json): what serving copies
    max_positions: int | None = None  # longest input the position table takes (None: no absolute positions)
    config: dict = field(default_factory=dict, repr=False)  # config.json as transformers resolved it

    def __post_init__(self) -> None:
        if self.tokenizer_dir is None:
            self.tokenizer_dir = self.path

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in self.id2label.items()}

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.id2label[i] for i in range(len(self.id2label)))

    @property
    def data_dir(self) -> Path | None:
        data_dir = self.metrics.get("data_dir")
        return Path(data_dir) if data_dir else None

    @property
    def trained_columns(self) -> Columns | None:
        """The CSV columns ``finetune train`` was run with (its training record), if any."""
        record = self.metrics.get("columns")
        if not isinstance(record, dict):
            args = self.metrics.get("args") if isinstance(self.metrics.get("args"), dict) else {}
            record = {"text": args.get("text_column"), "label": args.get("label_column"),
                      "text_pair": args.get("text_pair_column")}
        if not record.get("text") or not record.get("label"):
            return None
        return Columns(str(record["text"]), str(record["label"]),
                       str(record["text_pair"]) if record.get("text_pair") else None)

    def served_model(self, name: str = DEFAULT_CLASSIFIER, *, text_pair: bool = False) -> ServedModel:
        """The served contract this checkpoint's head and labels call for (serving.contract owns it)."""
        return ServedModel(name=name, head=self.head, labels=self.labels, text_pair=text_pair)

    def load_tokenizer(self):
        """The checkpoint's fast tokenizer (the one the reference and the served model both use)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir, use_fast=True, local_files_only=True)


@dataclass
class Examples:
    """Rows read from a CSV: texts (and second texts for pairs) and their labels.

    ``labels`` holds per head: an int id (single-label), a list of int ids (multi-label) or a float
    (regression); :meth:`targets` gives them as one array.
    """

    source: Path
    texts: list[str]
    labels: list[Any]
    pairs: list[str] | None = None
    kind: Head = Head.SINGLE_LABEL
    num_labels: int = 0  # multi-label: the width of the multi-hot targets

    def head(self, n: int) -> "Examples":
        return Examples(self.source, self.texts[:n], self.labels[:n],
                        None if self.pairs is None else self.pairs[:n], self.kind, self.num_labels)

    def __len__(self) -> int:
        return len(self.texts)

    def targets(self) -> np.ndarray:
        """int64 ids (n,) for single-label, float32 multi-hot (n, labels) for multi-label, float32 (n,)."""
        if self.kind is Head.MULTI_LABEL:
            out = np.zeros((len(self.labels), self.num_labels), dtype=np.float32)
            for row, ids in enumerate(self.labels):
                out[row, list(ids)] = 1.0
            return out
        if self.kind is Head.REGRESSION:
            return np.asarray(self.labels, dtype=np.float32)
        return np.asarray(self.labels, dtype=np.int64)


# ------------------------------------------------------------------------------------------ checkpoint


def load_checkpoint(path: Path, *, tokenizer: str | Path | None = None, max_length: int | None = None,
                    heads: tuple[Head, ...] = SERVED_HEADS) -> Checkpoint:
    """Check that ``path`` is a sequence classifier transformers can load, with a fast tokenizer.

    ``tokenizer``: a directory or a base model in the local Hugging Face cache, used instead of the
    checkpoint's own tokenizer (required when it has none). ``max_length``: refused when longer than the
    model's position table. ``heads``: the heads accepted (the others are refused with the reason).
    """
    path = Path(path)
    raw = _read_config(path)
    architecture = _architecture(path, raw)
    head = _head(path, raw, _raw_labels(path, raw))
    if head not in heads:
        raise CheckpointError(_unserved_head_message(path, raw, head))
    _check_weights(path)
    metrics = _read_training_record(path)
    hf_config = _transformers_config(path)
    id2label = {int(k): str(v) for k, v in hf_config.id2label.items()}  # transformers' LABEL_i when absent
    ck = Checkpoint(path=path, model_type=str(hf_config.model_type), architecture=architecture, id2label=id2label,
                    metrics=metrics, head=head, max_positions=position_limit(hf_config), config=hf_config.to_dict())
    if max_length is not None:
        check_max_length(ck, max_length)
    ck.tokenizer_dir, scratch = resolve_tokenizer(path, tokenizer, hf_config)
    if scratch is not None:
        weakref.finalize(ck, shutil.rmtree, str(scratch), True)
    return ck


def _read_config(path: Path) -> dict:
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
    return config


def _architecture(path: Path, raw: dict) -> str:
    architectures = raw.get("architectures") or []
    arch = next((a for a in architectures if str(a).endswith("ForSequenceClassification")), None)
    if arch is None:
        raise CheckpointError(
            f"checkpoint {path} is not a sequence classifier (architectures: {architectures or 'none'})"
        )
    return str(arch)


def _raw_labels(path: Path, raw: dict) -> dict[int, str]:
    """config.json's id2label, or transformers' default when it is absent (``num_labels``, else 2 labels:
    ``save_pretrained`` leaves out the default ``LABEL_0``/``LABEL_1`` of a 2-label model)."""
    given = raw.get("id2label")
    if not given:
        try:
            n = int(raw.get("num_labels", 2))
        except (TypeError, ValueError):
            raise CheckpointError(f"checkpoint {path}: num_labels is malformed") from None
        return {i: f"LABEL_{i}" for i in range(n)}
    try:
        id2label = {int(k): str(v) for k, v in given.items()}
    except (TypeError, ValueError, AttributeError):
        raise CheckpointError(f"checkpoint {path}: id2label is malformed") from None
    if sorted(id2label) != list(range(len(id2label))):
        raise CheckpointError(f"checkpoint {path}: id2label must map 0..n-1 to labels, got {given}")
    return id2label


def _head(path: Path, raw: dict, id2label: dict[int, str]) -> Head:
    """The head transformers trains for this config: problem_type, else regression when num_labels == 1."""
    problem = raw.get("problem_type")
    n = len(id2label)
    if problem == Head.MULTI_LABEL.value:
        head = Head.MULTI_LABEL
    elif problem == Head.REGRESSION.value or (problem is None and n == 1):
        head = Head.REGRESSION
    elif problem in (None, Head.SINGLE_LABEL.value):
        head = Head.SINGLE_LABEL
    else:
        raise CheckpointError(f"checkpoint {path}: unknown problem_type {problem!r} "
                              f"(known: {', '.join(h.value for h in Head if h is not Head.EMBEDDING)})")
    if n < 1 or (head is Head.SINGLE_LABEL and n < 2):
        raise CheckpointError(f"checkpoint {path}: a single-label classifier needs id2label with 2 or more labels, "
                              f"got {raw.get('id2label')}")
    return head


def _unserved_head_message(path: Path, raw: dict, head: Head) -> str:
    why = {Head.MULTI_LABEL: "serving it as single-label (softmax, one argmax label) would be silently wrong",
           Head.REGRESSION: "it has one output (num_labels=1 in id2label) and no labels to serve"}
    return (f"checkpoint {path} has a {head.value} head (problem_type {raw.get('problem_type')!r}); the build does "
            f"not export {head.value} heads yet: {why.get(head, 'unsupported head')}")


def _read_training_record(path: Path) -> dict:
    metrics_file = path / TRAINING_RECORD
    if not metrics_file.is_file():
        return {}
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {TRAINING_RECORD} is not valid JSON ({exc})") from None
    return metrics if isinstance(metrics, dict) else {}


def _transformers_config(path: Path):
    """config.json as transformers reads it (AutoConfig: defaults filled in, e.g. LABEL_0/LABEL_1)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: transformers cannot read its config.json ({first})") from None


# --------------------------------------------------------------------------------------------- weights


def _check_weights(path: Path) -> list[Path]:
    """The safetensors files of the checkpoint (one file, or the shards of an index), each checked cheaply."""
    single = path / WEIGHT_FILES[0]
    if single.is_file():
        _check_safetensors(single)
        return [single]
    if (path / SHARD_INDEX).is_file():
        return _check_shards(path, path / SHARD_INDEX)
    pickles = [f for f in PICKLE_FILES if (path / f).is_file()] + sorted(p.name for p in path.glob("pytorch_model-*.bin"))
    if pickles:
        raise CheckpointError(
            f"checkpoint {path} has only pickle weights ({pickles[0]}); only safetensors are loaded, because "
            "loading a pickle can run any code it carries. Convert it once where you trust the file: "
            f"AutoModelForSequenceClassification.from_pretrained('{path}').save_pretrained('{path}', "
            "safe_serialization=True)"
        )
    raise CheckpointError(f"checkpoint {path} has no weights ({WEIGHT_FILES[0]} or {SHARD_INDEX} with its shards)")


def _check_shards(path: Path, index_file: Path) -> list[Path]:
    """Every shard named by a sharded-safetensors index exists, is whole and holds the tensors mapped to it."""
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        by_shard: dict[str, set[str]] = {}
        for tensor, shard in weight_map.items():
            by_shard.setdefault(str(shard), set()).add(str(tensor))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {index_file.name} is malformed ({exc})") from None
    if not by_shard:
        raise CheckpointError(f"checkpoint {path}: {index_file.name} maps no tensors")
    shards = []
    for name, tensors in sorted(by_shard.items()):
        shard = path / name
        if Path(name).name != name or not shard.is_file():
            raise CheckpointError(f"checkpoint {path}: shard {name} named by {index_file.name} is missing")
        missing = tensors - set(_check_safetensors(shard))
        if missing:
            raise CheckpointError(f"checkpoint {path}: shard {name} lacks {len(missing)} tensor(s) the index maps to "
                                  f"it (e.g. {sorted(missing)[0]})")
        shards.append(shard)
    return shards


def _check_safetensors(weights: Path) -> list[str]:
    """Read the safetensors header, check the file holds every tensor it declares (cheap); return their names."""
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
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint weights {weights} are corrupt ({exc})") from None
    return [k for k in header if k != "__metadata__"]


# ----------------------------------------------------------------------------------- positions, tokenizer


def position_limit(hf_config) -> int | None:
    """The longest input (tokens) the model's position table takes; None when it has no absolute positions.

    RoBERTa-family position ids start at ``padding_idx + 1``, so they lose ``pad_token_id + 1`` positions
    (514 -> 512). DeBERTa-v2/v3 without ``position_biased_input`` uses relative positions only.
    """
    n = getattr(hf_config, "max_position_embeddings", None)
    model_type = str(getattr(hf_config, "model_type", ""))
    if not n:
        return None
    if model_type.startswith("deberta") and not getattr(hf_config, "position_biased_input", True):
        return None
    if model_type in PADDING_OFFSET_MODELS:
        n -= int(getattr(hf_config, "pad_token_id", None) or 0) + 1
    return int(n)


def check_max_length(checkpoint: Checkpoint, max_length: int) -> None:
    """Refuse a ``--max-length`` the model cannot take (every longer request would fail in the encoder)."""
    limit = checkpoint.max_positions
    if limit is not None and max_length > limit:
        raise CheckpointError(
            f"--max-length {max_length} is longer than the position table of {checkpoint.path}: this "
            f"{checkpoint.model_type} model takes at most {limit} tokens; pass --max-length {limit} or less"
        )


def resolve_tokenizer(checkpoint: Path, option: str | Path | None, hf_config=None) -> tuple[Path, Path | None]:
    """The directory holding the fast tokenizer to use, and the scratch directory to delete later (or None).

    ``option`` (``--tokenizer``) wins over the checkpoint's own files. A directory with ``tokenizer.json``
    and ``tokenizer_config.json`` is used as it is; anything else (a slow tokenizer such as ``vocab.txt``
    alone, a bare ``tokenizer.json``, a base model from the local Hugging Face cache) is loaded the way
    transformers loads it (``AutoTokenizer``, ``use_fast=True``) and saved to a scratch directory, so the
    served tokenizer has its ``tokenizer.json``. What cannot be made fast is refused here, before any export.
    """
    source = _tokenizer_source(Path(checkpoint), option)
    if isinstance(source, Path) and (source / FAST_TOKENIZER).is_file() and (source / "tokenizer_config.json").is_file():
        return source, None
    tok = _load_fast_tokenizer(source, option, hf_config)
    scratch = Path(tempfile.mkdtemp(prefix="exporter-tokenizer-"))
    tok.save_pretrained(scratch)
    if not (scratch / FAST_TOKENIZER).is_file():
        shutil.rmtree(scratch, ignore_errors=True)
        raise TokenizerError(f"the tokenizer from {source} did not save a {FAST_TOKENIZER}")
    log.info("tokenizer from %s loaded as %s (fast) into %s", source, type(tok).__name__, scratch)
    return scratch, scratch


def _tokenizer_source(checkpoint: Path, option: str | Path | None) -> Path | str:
    if option is not None and str(option).strip():
        given = Path(option)
        if given.is_dir():
            if not any((given / f).is_file() for f in TOKENIZER_FILES):
                raise TokenizerError(f"--tokenizer {option}: the directory holds no tokenizer "
                                     f"({', '.join(TOKENIZER_FILES)})")
            return given
        if given.exists():
            raise TokenizerError(f"--tokenizer {option} is a file; give the directory that holds it")
        return str(option)  # a base model name, looked up in the local Hugging Face cache (never downloaded)
    if any((checkpoint / f).is_file() for f in TOKENIZER_FILES):
        return checkpoint
    raise TokenizerError(
        f"checkpoint {checkpoint} has no tokenizer ({', '.join(TOKENIZER_FILES)}); Trainer.save_model writes one "
        "only when the Trainer was given it. Pass --tokenizer DIR (a directory holding the tokenizer) or "
        "--tokenizer BASE (the model you fine-tuned from, from the local Hugging Face cache)"
    )


def _load_fast_tokenizer(source: Path | str, option, hf_config):
    from transformers import AutoTokenizer

    what = f"--tokenizer {option}" if option is not None else f"the tokenizer in {source}"
    try:
        tok = AutoTokenizer.from_pretrained(source, use_fast=True, local_files_only=True, config=hf_config)
    except Exception as exc:  # noqa: BLE001  conversions fail in many ways (missing sentencepiece, bad files)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(source, str):
            raise TokenizerError(f"{what} is neither a directory nor a model in the local Hugging Face cache "
                                 f"({first})") from None
        raise TokenizerError(f"{what} cannot be loaded as a fast tokenizer ({first}); save it with a "
                             f"{FAST_TOKENIZER} (a fast tokenizer's save_pretrained) and pass that directory") from None
    if not getattr(tok, "is_fast", False):
        raise TokenizerError(f"{what} has no fast version ({type(tok).__name__}); the served tokenizer needs a "
                             f"{FAST_TOKENIZER}")
    return tok


# ------------------------------------------------------------------------------------------------- CSVs


def resolve_columns(checkpoint: Checkpoint, text: str | None = None, label: str | None = None,
                    text_pair: str | None = None) -> Columns:
    """Explicit columns win; then the columns ``finetune train`` recorded; then ``text``/``label``."""
    trained = checkpoint.trained_columns or Columns()
    return Columns(text or trained.text, label or trained.label, text_pair or trained.text_pair)


def _label_id(token: str, label2id: dict[str, int]) -> int:
    """A label name as the checkpoint spells it (spaces kept: ``" pos"`` is a label of its own), else the
    name without surrounding spaces, or an integer id (``0``/``1``: what a tutorial's CSV holds)."""
    if token in label2id:
        return label2id[token]
    token = token.strip()
    if token in label2id:
        return label2id[token]
    if token.lstrip("-").isdigit() and int(token) in label2id.values():
        return int(token)
    raise ValueError(token)


def parse_label(raw: str, kind: Head, label2id: dict[str, int]) -> Any:
    """One CSV label cell. Single-label: a name or id. Multi-label: a JSON list (``["a", "b"]``, ``[]``) or
    names/ids separated by ``|`` (``a|b``). Regression: a finite number. ValueError names the bad token."""
    if kind is Head.REGRESSION:
        value = float(raw)
        if not np.isfinite(value):
            raise ValueError(raw)
        return value
    if kind is Head.MULTI_LABEL:
        if raw.startswith("["):
            try:
                items = json.loads(raw)
            except json.JSONDecodeError:
                raise ValueError(raw) from None
            if not isinstance(items, list):
                raise ValueError(raw)
        else:
            items = raw.split(MULTI_LABEL_SEPARATOR)
        tokens = [str(i) for i in items if str(i).strip()]
        return sorted({_label_id(t, label2id) for t in tokens})
    return _label_id(raw, label2id)


def read_examples(path: Path, label2id: dict[str, int], *, limit: int | None = None, columns: Columns | None = None,
                  kind: Head = Head.SINGLE_LABEL) -> Examples:
    """Read the text (and text-pair) and label columns of a CSV; rows with an empty label are skipped."""
    path, columns, kind = Path(path), columns or Columns(), Head(kind)
    if not path.is_file():
        raise EvalDataError(f"evaluation data {path} does not exist")
    texts: list[str] = []
    pairs: list[str] = []
    labels: list[Any] = []
    bad: set[str] = set()
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            missing = [c for c in columns.required if c not in fields]
            if missing:
                raise EvalDataError(f"{path} lacks column(s) {', '.join(missing)} (has: {', '.join(fields) or 'none'}); "
                                    "name the columns with --text-column/--label-column/--text-pair-column")
            for row in reader:
                text, raw = row.get(columns.text), row.get(columns.label) or ""
                pair = row.get(columns.text_pair) if columns.text_pair else ""
                if text is None or pair is None or not raw.strip():
                    continue
                try:
                    labels.append(parse_label(raw, kind, label2id))
                except ValueError as exc:
                    bad.add(raw if kind is Head.REGRESSION else str(exc))
                    continue
                texts.append(text)
                pairs.append(pair)
                if limit is not None and len(texts) >= limit:
                    break
    except (UnicodeDecodeError, csv.Error) as exc:
        raise EvalDataError(f"{path} is not a readable UTF-8 CSV ({exc})") from None
    if bad:
        shown = ", ".join(sorted(bad)[:5])
        if kind is Head.REGRESSION:
            raise EvalDataError(f"{path}: column {columns.label} has values that are not finite numbers: {shown}")
        raise EvalDataError(f"{path} has labels the checkpoint does not know: {shown} (known: {', '.join(label2id)})")
    if not texts:
        raise EvalDataError(f"{path} has no usable rows")
    return Examples(path, texts, labels, pairs if columns.text_pair else None, kind, len(label2id))


def read_checkpoint_examples(checkpoint: Checkpoint, path: Path, columns: Columns, *,
                             limit: int | None = None) -> Examples:
    """:func:`read_examples` with the checkpoint's labels and head."""
    return read_examples(path, checkpoint.label2id, limit=limit, columns=columns, kind=checkpoint.head)


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


def read_texts(path: Path, column: str, limit: int | None = None) -> list[str]:
    """The ``column`` of a CSV (UTF-8, else latin-1), in file order; labels are not needed."""
    for encoding in ("utf-8", "latin-1"):
        try:
            with open(path, encoding=encoding, newline="") as fh:
                reader = csv.DictReader(fh)
                if column not in (reader.fieldnames or []):
                    raise EvalDataError(f"{path}: no column {column!r} (columns: {reader.fieldnames})")
                rows = [row[column] for row in reader if row.get(column)]
            break
        except UnicodeDecodeError:
            continue
        except OSError as exc:
            raise EvalDataError(f"cannot read {path}: {exc.strerror or exc}") from None
    return rows[:limit] if limit is not None else rows


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
