"""The closed choices of a build (what task, which precisions, which pooling, which target): enums every
stage shares, in a module that imports nothing from the pipeline so any stage can import it."""
from __future__ import annotations

import enum

from serving.contract import Head  # what a served model returns: the contract owns it, a task derives from it
from serving.repository import Target  # one definition of the serving targets, owned by the repository writer

__all__ = ["Pooling", "Precision", "Target", "Task"]


class Task(str, enum.Enum):
    """What a build does with a checkpoint: a classifier head, a sentence embedding (exporter.embedding_flow),
    token classification (exporter.token_classification, served as a tagger). The served contract's
    :class:`serving.contract.Head` says what the served model returns; a task is the set of heads it serves
    (:attr:`heads`, :meth:`of`), so the two cannot drift apart."""

    CLASSIFICATION = "classification"
    EMBEDDING = "embedding"
    TOKEN_CLASSIFICATION = "token-classification"

    @property
    def heads(self) -> tuple[Head, ...]:
        """The served heads this task builds (a classification checkpoint's head is read from its config)."""
        return _TASK_HEADS[self]

    @classmethod
    def of(cls, head: Head | str) -> "Task":
        """The task that builds a model served with ``head``."""
        head = Head(head)
        return next(task for task, heads in _TASK_HEADS.items() if head in heads)


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


_TASK_HEADS = {
    Task.CLASSIFICATION: (Head.SINGLE_LABEL, Head.MULTI_LABEL, Head.REGRESSION),  # rerankers: a regression head
    Task.EMBEDDING: (Head.EMBEDDING,),
    Task.TOKEN_CLASSIFICATION: (Head.TOKEN_CLASSIFICATION,),
}
