"""The task registry: the one place that says which flow builds which task, how a checkpoint given as a
plain classifier is recognised as another task, and how a build's result is summarised for a person.

Every task runs the one stage sequence of exporter.pipeline (inputs -> reference -> export -> variants ->
gate -> select -> report -> repository); a task supplies what differs as a ``pipeline.TaskSpec`` in a module
of its own (exporter.build: ClassifierTask, for classifiers, rerankers and PEFT adapters;
exporter.embedding_flow: EmbeddingTask; exporter.token_classification: TaggerTask). Adding a task is its
module plus one entry in :data:`FLOWS` (and its :class:`exporter.choices.Task` with the served heads it
builds)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from exporter import build as classifier, embedding_flow, report, token_classification
from exporter.choices import Task
from exporter.config import BuildConfig
from exporter.result import BuildResult


def _never(checkpoint: Path) -> bool:
    return False


@dataclass(frozen=True)
class TaskFlow:
    """One task's flow: ``build`` runs it; ``summary`` renders its report for the terminal; ``claims`` says
    whether a checkpoint given without ``--task`` (as a classifier) is this task's (from its config)."""

    task: Task
    build: Callable[[BuildConfig], BuildResult]
    summary: Callable[[Any], str]
    claims: Callable[[Path], bool] = _never


FLOWS: dict[Task, TaskFlow] = {
    Task.CLASSIFICATION: TaskFlow(Task.CLASSIFICATION, classifier.build, report.markdown),
    Task.EMBEDDING: TaskFlow(Task.EMBEDDING, embedding_flow.build_embedding, report.markdown),
    Task.TOKEN_CLASSIFICATION: TaskFlow(Task.TOKEN_CLASSIFICATION, token_classification.build_tagger,
                                        token_classification.summary, token_classification.is_token_classifier),
}


def resolve(config: BuildConfig) -> TaskFlow:
    """The flow of ``config.task``; a checkpoint given as a classifier (the default task) goes to the task
    that claims it (a ``...ForTokenClassification`` checkpoint: the tagger)."""
    if config.task is Task.CLASSIFICATION:
        claimed = [flow for flow in FLOWS.values() if flow.claims(config.checkpoint)]
        if claimed:
            return claimed[0]
    return FLOWS[config.task]


def build(config: BuildConfig) -> BuildResult:
    """Run the build of the task ``config`` names (or its checkpoint is); the report is written even when no
    variant passes."""
    return resolve(config).build(config)
