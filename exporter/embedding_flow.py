"""`python -m exporter build MODEL_DIR --task embedding`: a sentence-embedding model -> gated ONNX variants ->
typed report -> the selected variant added to the Triton repository as its own served model.

The library work is in :mod:`exporter.embedding_build` (export, variants, gate, selection); this module
reads the texts, runs it inside the atomic build directory, writes the report (exporter.artifacts /
exporter.report) and hands the selected file to :func:`serving.repository.add_model`, which adds the
embedder beside the models already in the repository (a classifier keeps serving untouched).
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_directory
from common.provenance import sha256_file, versions
from exporter import report as render
from exporter.artifacts import EmbeddingReport, EmbeddingVariantResult, GateMode, to_dict
from exporter.choices import Target
from exporter.chunking import LongText
from exporter.config import BuildConfig
from exporter.embedding import read_pipeline
from exporter.embedding_build import build_embedding_variants, select
from exporter.embedding_gate import as_dict
from exporter.errors import EvalDataError, ExporterError
from exporter.inputs import check_writable, read_texts
from exporter.result import BuildResult
from exporter.steps import repository_stage
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
    """Run the embedding build; the report is written even when no variant passes."""

    pipeline = read_pipeline(config.checkpoint, pooling=config.pooling, normalize=config.normalize)  # fail fast
    chunk = chunk_config(config, pipeline)
    if chunk is not None:
        chunk.check(pipeline.max_seq_length)
    inputs = read_inputs(config)
    check_outputs(config)
    for warning in inputs.warnings:
        log.warning("%s", warning)
    with atomic_directory(config.out) as out:
        built = _variants(config, inputs, out, pipeline)
        report = assemble(config, inputs, built, out)
        render.write_embedding(report, out)
    if report.selected is None:
        log.error("no embedding variant passed its gate: nothing is served, %s is left as it was",
                  config.repository or "the repository")
    elif config.repository is not None:
        repository_stage(report, lambda: write_embedder(config, report, built),
                         lambda: render.write_embedding(report, config.out, figure=False))
    return BuildResult(report, config.out)


def _variants(config: BuildConfig, inputs: EmbeddingInputs, out: Path, pipeline):
    return build_embedding_variants(
        config.checkpoint, inputs.texts, out, pooling=config.pooling, normalize=config.normalize,
        precisions=config.precisions, tuning_texts=inputs.tuning_texts,
        max_exclusion_rounds=config.max_exclusion_rounds, measure_reference=True,
        max_batch_tokens=config.max_batch_tokens if config.target is Target.GPU else None,
        chunk=chunk_config(config, pipeline), openvino=config.openvino and config.target is Target.CPU)


def chunk_config(config: BuildConfig, pipeline):
    """The windows of a --long-text chunk build at the pipeline's max_seq_length (None when it truncates)."""
    return config.chunk_config(pipeline.max_seq_length) if config.long_text is LongText.CHUNK else None


def select_for_target(built, target: Target, forced: str | None = None) -> str | None:
    """cpu: the fastest passing variant per core; gpu: fp16, else fp32 (exporter.steps.select). ``forced``
    (--variant): that variant if it passed, else none."""
    return select(built.variants, target, forced)


def served_name(config: BuildConfig) -> str:
    return config.model_name or DEFAULT_EMBEDDER


def assemble(config: BuildConfig, inputs: EmbeddingInputs, built, out: Path):
    """The typed EmbeddingReport of ``built`` (files relative to ``out``)."""

    variants = {v.name: EmbeddingVariantResult(
        v.precision.value, str(v.path.relative_to(out)) if v.path else None, v.size_bytes, v.gate, v.speed, v.error,
        list(v.excluded_nodes), v.runtime_settings) for v in built.variants}
    settings = {"precisions": [p.value for p in config.precisions], "eval_size": config.eval_size,
                "tuning_size": config.tuning_size, "max_exclusion_rounds": config.max_exclusion_rounds,
                "seed": config.seed, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "reference": "SentenceTransformer.encode, batch 32", "long_text": config.long_text.value}
    if built.chunked is not None:
        settings.update(chunk_overlap=built.chunked.chunk.overlap, max_chunks=built.chunked.chunk.max_chunks,
                        windows=built.windows, graph_normalizes=False, normalize_after_mean=built.chunked.normalize,
                        reference="sentence-transformers modules before Normalize on the same windows, averaged, "
                                  "then normalised as the model does")
    return EmbeddingReport(
        model_dir=str(config.checkpoint.absolute()), model_name=served_name(config), target=config.target.value,
        gate_mode=GateMode.PER_ROW if config.target is Target.CPU else GateMode.BATCHED,
        selected=select_for_target(built, config.target, config.variant),
        pipeline=built.pipeline.describe(), eval_data=str(inputs.eval_path), n_texts=built.n_texts,
        budgets=as_dict(built.budgets), variants=variants, reference_speed=built.reference_speed,
        tuning_data={"source": inputs.tuning_source, "rows": built.n_tuning_texts}, settings=settings,
        warnings=inputs.warnings, versions=versions(),
        files={v.file: sha256_file(out / v.file) for v in variants.values() if v.file})


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
