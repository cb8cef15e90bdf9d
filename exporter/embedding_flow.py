"""`python -m exporter build MODEL_DIR --task embedding`: a sentence-embedding model -> gated ONNX variants ->
typed report -> the selected variant added to the Triton repository as its own served model.

The embedder is a task of the one pipeline (exporter.pipeline): :class:`EmbeddingTask` supplies what differs
(its texts, sentence-transformers reference, variants from exporter.embedding_build, the embedding gate, its
report and the embedder :func:`serving.repository.add_model` adds beside the models already in the repository).
"""
from __future__ import annotations

import logging
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from common.provenance import sha256_file, versions
from exporter import embedding_build, pipeline, report as render
from exporter.artifacts import EmbeddingGate, EmbeddingReport, EmbeddingVariantResult, GateMode, to_dict
from exporter.choices import Precision, Target, Task
from exporter.chunking import ChunkConfig, LongText
from exporter.config import BuildConfig, parse_precisions
from exporter.embedding import export_body, read_pipeline
from exporter.embedding_build import EmbeddingBuild, EmbeddingVariant, prepare_state
from exporter.embedding_gate import EmbeddingBudgets, as_dict, reference_speed
from exporter.errors import EvalDataError, ExporterError
from exporter.inputs import check_writable, read_texts
from exporter.memory import weights_size
from exporter.pipeline import Run, Step
from exporter.stages import Stages
from exporter.steps import Candidate, Gate
from serving.contract import DEFAULT_EMBEDDER, Head, ServedModel
from serving.errors import ServingError
from serving.repository import RepositoryConfig, add_model

log = logging.getLogger(__name__)

DEFAULT_TEXT_COLUMN = "text"


@dataclass
class EmbeddingInputs:
    """The held-out texts the gate judges on and the (disjoint) texts int8 tunes on."""

    eval_path: Path
    texts: list[str]
    tuning_source: str
    tuning_texts: list[str]
    warnings: list[str]
    chunk: ChunkConfig | None = None  # --long-text chunk: the windows at the pipeline's max_seq_length
    encoder_dir: Path | None = None  # the transformer's folder (its weights: the memory record's unit)


def read_inputs(config: BuildConfig) -> EmbeddingInputs:
    """Eval texts from ``--eval-data``; tuning texts from validation.csv/train.csv beside it, else the rows
    after the evaluation slice of the same file (never a gated text)."""
    if config.eval_data is None:
        raise EvalDataError("--task embedding needs --eval-data CSV (held-out texts; labels are not needed)")
    column = config.text_column or DEFAULT_TEXT_COLUMN
    all_rows = read_texts(config.eval_data, column)
    texts = all_rows[:config.eval_size]
    warnings = [] if len(texts) >= min(1000, config.eval_size) else [
        f"only {len(texts)} evaluation texts (fewer than 1000)"]
    gated = set(texts)
    source, pool = None, []
    for name in ("validation", "train"):
        candidate = config.eval_data.parent / f"{name}.csv"
        if candidate.is_file() and candidate.resolve() != config.eval_data.resolve():
            source, pool = candidate, read_texts(candidate, column)
            break
    if source is None:
        source, pool = config.eval_data, all_rows[config.eval_size:]
        if not pool:
            warnings.append("no validation.csv/train.csv beside the eval data and no rows past --eval-size: "
                            "int8 is quantized without an exclusion search")
    pool = [t for t in pool if t not in gated]
    random.Random(config.seed).shuffle(pool)
    return EmbeddingInputs(config.eval_data, texts, str(source), pool[:config.tuning_size], warnings)


def check_outputs(config: BuildConfig) -> None:
    check_writable(config.out, "output directory")
    if config.repository is not None:
        check_writable(config.repository, "repository")


def build_embedding(config: BuildConfig):
    """The embedding task's flow: the one pipeline (exporter.pipeline) with :class:`EmbeddingTask`; the report is
    written even when no variant passes."""
    return pipeline.build(config, EmbeddingTask())


@dataclass
class EmbeddingTask:
    """What the embedder supplies to exporter.pipeline: its inputs (texts), sentence-transformers reference, body
    export, variant builders (exporter.embedding_build), embedding gate and the embedder it adds to a repository.
    Library callers (:func:`build_embedding_variants`) give budgets and the ONNX opset."""

    budgets: EmbeddingBudgets | None = None
    opset: int | None = None
    measure: bool = True  # time sentence-transformers (the report's reference row)
    label: str = "embedding variant"

    def prepare(self, config: BuildConfig) -> EmbeddingInputs:
        embedder = read_pipeline(config.checkpoint, pooling=config.pooling, normalize=config.normalize)  # fail fast
        chunk = chunk_config(config, embedder)
        if chunk is not None:
            chunk.check(embedder.max_seq_length)
        inputs = read_inputs(config)
        check_outputs(config)
        inputs.chunk, inputs.encoder_dir = chunk, embedder.encoder_dir
        return inputs

    def weights_bytes(self, inputs: EmbeddingInputs) -> int | None:
        return weights_size(inputs.encoder_dir) if inputs.encoder_dir is not None else None

    def reference(self, run: Run) -> None:
        config, inputs = run.config, run.inputs
        run.reference, run.state = prepare_state(
            config.checkpoint, inputs.texts, run.out, pooling=config.pooling, normalize=config.normalize,
            budgets=self.budgets, tuning_texts=inputs.tuning_texts, max_exclusion_rounds=config.max_exclusion_rounds,
            max_batch_tokens=config.max_batch_tokens if config.target is Target.GPU else None, chunk=inputs.chunk,
            scratch=run.scratch, speed_seconds=config.speed_seconds)

    def measure_reference(self, run: Run) -> None:
        model, run.state = run.state, None  # the torch model is freed before any variant is built
        if self.measure:
            run.reference_speed = reference_speed(model, run.reference.texts)

    def export(self, run: Run) -> None:
        embedder = read_pipeline(run.config.checkpoint, pooling=run.config.pooling, normalize=run.config.normalize)
        run.base = run.reference.body = export_body(embedder, run.scratch, opset=self.opset)

    def plan(self, run: Run) -> list[Step]:
        return embedding_build.steps(run.reference, run.config.precisions,
                                     run.config.openvino and run.config.target is Target.CPU)

    def make(self, run: Run, step: Step) -> tuple[EmbeddingVariant, bool]:
        return embedding_build.make(run.reference, step, run.stages)

    def gate(self, run: Run, step: Step) -> Gate:
        return run.reference.gate(step.precision, "" if step.name == step.precision.value else f" ({step.name})")

    def file(self, run: Run, record: EmbeddingVariant) -> Path:
        return record.path

    def candidate(self, run: Run, name: str, record: EmbeddingVariant) -> Candidate:
        return Candidate(name, Precision(record.precision).value, record.passed,
                         record.speed.rows_per_s if record.speed is not None else None)

    def judged(self, run: Run, record: EmbeddingVariant, verdict: EmbeddingGate | None,
               reason: str = "") -> None:
        if verdict is None:
            verdict = embedding_build.not_gated(run.reference, record.precision, reason)
        record.gate = verdict

    def report(self, run: Run, selected: str | None) -> EmbeddingReport:
        return assemble(run.config, run.inputs, built(run, selected), run.out, run.stages)

    def write_report(self, report: EmbeddingReport, out: Path, figure: bool = True) -> None:
        render.write_embedding(report, out, figure=figure)

    def write_repository(self, run: Run, report: EmbeddingReport) -> Path:
        return write_embedder(run.config, report, built(run, report.selected))


def built(run: Run, selected: str | None) -> EmbeddingBuild:
    """The embedder's build as its library callers and its report see it."""
    state = run.reference
    embedder = read_pipeline(run.config.checkpoint, pooling=run.config.pooling, normalize=run.config.normalize)
    return EmbeddingBuild(embedder, len(state.texts), state.budgets, list(run.variants.values()), selected,
                          run.out / "tokenizer", run.reference_speed, len(state.tuning_texts), state.chunked,
                          state.windows)


def build_embedding_variants(model_dir: Path, texts: Sequence[str], out_dir: Path, *,
                             pooling: str | None = None, normalize: bool | None = None,
                             budgets: EmbeddingBudgets | None = None,
                             precisions: Sequence[Precision | str] = tuple(Precision),
                             tuning_texts: Sequence[str] = (), max_exclusion_rounds: int = 3,
                             opset: int | None = None, measure_reference: bool = False,
                             openvino: bool = False, exhaustive: bool = False,
                             speed_seconds: float = 1.0) -> EmbeddingBuild:
    """The library entry point: the pipeline's reference, export, variant and select stages (no report, no
    repository) over ``texts``; variants land in ``out_dir/<precision>.onnx`` (OpenVINO: ``out_dir/<name>/``),
    the tokenizer in ``out_dir/tokenizer``. A variant whose conversion fails is recorded with its error; variants
    after the first that passes in selection's order are timed but not gated unless ``exhaustive``."""
    config = BuildConfig(checkpoint=Path(model_dir), out=Path(out_dir), repository=None, task=Task.EMBEDDING,
                         pooling=pooling, normalize=normalize, precisions=parse_precisions(list(precisions)),
                         max_exclusion_rounds=max_exclusion_rounds, openvino=openvino, exhaustive=exhaustive,
                         speed_seconds=speed_seconds)
    inputs = EmbeddingInputs(Path(model_dir), list(texts), "tuning_texts", list(tuning_texts), [])
    task = EmbeddingTask(budgets, opset, measure_reference)
    with tempfile.TemporaryDirectory(prefix="embedding-") as scratch:
        run = Run(config, inputs, Path(out_dir), Path(scratch), Stages())
        selected = pipeline.build_variants(task, run)
    log.info("embedding variants: %s; selected %s", ", ".join(
        f"{n} {'pass' if v.passed else 'fail'}" for n, v in run.variants.items()), selected or "none")
    return built(run, selected)


def chunk_config(config: BuildConfig, pipeline):
    """The windows of a --long-text chunk build at the pipeline's max_seq_length (None when it truncates)."""
    return config.chunk_config(pipeline.max_seq_length) if config.long_text is LongText.CHUNK else None


def served_name(config: BuildConfig) -> str:
    return config.model_name or DEFAULT_EMBEDDER


def assemble(config: BuildConfig, inputs: EmbeddingInputs, built: EmbeddingBuild, out: Path,
             stages: Stages | None = None) -> EmbeddingReport:
    """The typed EmbeddingReport of ``built`` (files relative to ``out``)."""

    variants = {v.name: EmbeddingVariantResult(
        v.precision.value, str(v.path.relative_to(out)) if v.path else None, v.size_bytes, v.gate, v.speed, v.error,
        list(v.excluded_nodes), v.runtime_settings) for v in built.variants}
    settings = {"precisions": [p.value for p in config.precisions], "eval_size": config.eval_size,
                "tuning_size": config.tuning_size, "max_exclusion_rounds": config.max_exclusion_rounds,
                "seed": config.seed, "speed_seconds": config.speed_seconds, "exhaustive": config.exhaustive,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "reference": "SentenceTransformer.encode, batch 32", "long_text": config.long_text.value}
    if built.chunked is not None:
        settings.update(chunk_overlap=built.chunked.chunk.overlap, max_chunks=built.chunked.chunk.max_chunks,
                        windows=built.windows, graph_normalizes=False, normalize_after_mean=built.chunked.normalize,
                        reference="sentence-transformers modules before Normalize on the same windows, averaged, "
                                  "then normalised as the model does")
    return EmbeddingReport(
        model_dir=str(config.checkpoint.absolute()), model_name=served_name(config), target=config.target.value,
        gate_mode=GateMode.PER_ROW if config.target is Target.CPU else GateMode.BATCHED,
        selected=built.selected,
        pipeline=built.pipeline.describe(), eval_data=str(inputs.eval_path), n_texts=built.n_texts,
        budgets=as_dict(built.budgets), variants=variants, reference_speed=built.reference_speed,
        tuning_data={"source": inputs.tuning_source, "rows": built.n_tuning_texts}, settings=settings,
        warnings=inputs.warnings, versions=versions(),
        files={v.file: sha256_file(out / v.file) for v in variants.values() if v.file},
        stage_seconds=stages.seconds if stages is not None else {})


def _long_text(built) -> dict:
    """RepositoryConfig fields of a chunked embedder (the windows, and whether the served model normalises the
    windows' mean); none for a truncating one."""
    if built.chunked is None:
        return {}
    chunk = built.chunked.chunk
    return {"long_text": "chunk", "chunk_overlap": chunk.overlap, "max_chunks": chunk.max_chunks,
            "normalize": built.chunked.normalize}


def write_embedder(config: BuildConfig, report, built) -> Path:
    """Add the selected variant to ``config.repository`` as the served embedding model."""

    chosen = report.variants[report.selected]
    provenance = {"source": "exporter", "task": "embedding", "model_dir": report.model_dir,
                  "variant": report.selected, "precision": chosen.precision, "gate": to_dict(chosen.gate),
                  "speed": to_dict(chosen.speed), "pipeline": report.pipeline, "eval_data": report.eval_data,
                  "budgets": report.budgets, "versions": report.versions,
                  "files": {chosen.file: report.files.get(chosen.file)}}
    served = ServedModel(name=report.model_name, head=Head.EMBEDDING, embedding_dim=built.pipeline.dim)
    try:
        repo_config = RepositoryConfig(target=config.target, max_length=built.pipeline.max_seq_length,
                                       encoder_instances=config.instances,
                                       intra_op_threads=config.intra_op_threads, pin_instances=config.pin_instances,
                                       max_batch_tokens=config.max_batch_tokens, tensorrt=config.tensorrt,
                                       max_request_bytes=config.max_request_bytes,
                                       **_long_text(built))
        return add_model(Path(config.repository), onnx_model=report.variant_path(report.selected, config.out),
                         tokenizer_dir=config.out / "tokenizer", model=served, config=repo_config,
                         provenance=provenance)
    except ServingError as exc:
        raise ExporterError(f"cannot write the repository {config.repository}: {exc}") from exc
