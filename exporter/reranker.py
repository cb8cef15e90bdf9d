"""Rerankers: a sentence-transformers CrossEncoder folder, read as it was saved.

sentence-transformers 5 writes ``config_sentence_transformers.json`` with ``"model_type": "CrossEncoder"``
and ``"activation_fn"``; version 4 wrote ``"activation_fn"`` into the ``sentence_transformers`` section of
``config.json`` (before that, ``sbert_ce_default_activation_function``). Both keep the max_length as the
tokenizer's ``model_max_length``. ``CrossEncoder.predict`` applies the activation to the head's logit, so
the served SCORE does too (serving.contract ``Activation``); the build truncates at the saved max_length.

This module imports only the standard library, exporter.errors and serving.contract, so the later task registry can move
it as it is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import CheckpointError
from serving.contract import DEFAULT_RERANKER, Activation

ST_CONFIG = "config_sentence_transformers.json"
# CrossEncoder.predict's activation (its class path as saved) -> the served activation. Only torch's own
# classes: sentence-transformers itself refuses other paths without trust_remote_code.
ACTIVATIONS = {
    "torch.nn.modules.activation.Sigmoid": Activation.SIGMOID,
    "torch.nn.modules.linear.Identity": Activation.IDENTITY,
    "torch.nn.modules.activation.Tanh": Activation.TANH,
}
LEGACY_KEY = "sbert_ce_default_activation_function"  # sentence-transformers < 4


class RerankerError(CheckpointError):
    """A CrossEncoder folder whose saved activation the build cannot serve."""


@dataclass(frozen=True)
class CrossEncoderInfo:
    """What a CrossEncoder folder saved: the activation ``predict`` applies and the max_length it truncates at."""

    activation: Activation
    max_length: int | None
    source: str  # the file the activation was read from
    default_name: str = DEFAULT_RERANKER  # the served name unless --model-name says otherwise


def _json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _saved_activation(path: Path) -> tuple[str | None, str] | None:
    """(the saved activation path or None for the default, the file it came from); None: not a CrossEncoder."""
    st = _json(path / ST_CONFIG)
    if st.get("model_type") == "CrossEncoder" or "activation_fn" in st:
        return st.get("activation_fn"), ST_CONFIG
    config = _json(path / "config.json")
    section = config.get("sentence_transformers")
    if isinstance(section, dict) and "activation_fn" in section:
        return section.get("activation_fn"), "config.json (sentence_transformers)"
    if LEGACY_KEY in config:
        return config.get(LEGACY_KEY), f"config.json ({LEGACY_KEY})"
    return None


def read_cross_encoder(path: Path) -> CrossEncoderInfo | None:
    """The CrossEncoder description of a checkpoint folder, or None when it is not a CrossEncoder."""
    path = Path(path)
    saved = _saved_activation(path)
    if saved is None:
        return None
    fn, source = saved
    config = _json(path / "config.json")
    labels = config.get("id2label") or {}
    n = int(config.get("num_labels", len(labels) or 2)) if not labels else len(labels)
    if fn is None:  # CrossEncoder's default: sigmoid for one label, else identity
        activation = Activation.SIGMOID if n == 1 else Activation.IDENTITY
    elif fn in ACTIVATIONS:
        activation = ACTIVATIONS[fn]
    else:
        raise RerankerError(f"CrossEncoder {path}: activation {fn} ({source}) is not one the server applies "
                            f"(known: {', '.join(ACTIVATIONS)})")
    if n != 1:
        raise RerankerError(f"CrossEncoder {path} has {n} outputs: a reranker scores each pair with one output "
                            "(num_labels=1)")
    return CrossEncoderInfo(activation, saved_max_length(path), source)


def saved_max_length(path: Path) -> int | None:
    """The tokenizer's saved ``model_max_length`` (CrossEncoder's max_length), when it is a real bound."""
    value = _json(Path(path) / "tokenizer_config.json").get("model_max_length")
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1_000_000:
        return value
    return None
