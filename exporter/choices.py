"""The closed choices of a build (what task, which precisions, which pooling, which target): enums every
stage shares, in a module that imports nothing from the pipeline so any stage can import it."""
from __future__ import annotations

import enum

from serving.repository import Target  # one definition of the serving targets, owned by the repository writer

__all__ = ["Pooling", "Precision", "Target", "Task"]


class Task(str, enum.Enum):
    """What the exported model does: a classifier head, or a sentence embedding (exporter.embedding_flow)."""

    CLASSIFICATION = "classification"
    EMBEDDING = "embedding"
    TOKEN_CLASSIFICATION = "token-classification"  # NER: exporter.token_classification, served as a tagger


class Precision(str, enum.Enum):
    """The numeric formats a variant is built in (int8 covers dynamic and static quantization)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class Pooling(str, enum.Enum):
    """Pooling modes the embedding export can put in the graph (sentence-transformers' names)."""

    MEAN = "mean"
    CLS = "cls"
    MAX = "max"
    MEAN_SQRT_LEN = "mean_sqrt_len_tokens"
