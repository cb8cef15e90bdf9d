"""`python -m exporter build`: checkpoint -> ONNX variants -> parity gate -> report -> Triton repository."""
from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path


from common.provenance import sha256_file, versions
from exporter import chunking, openvino, parity, pipeline, report as render, speed, variants, worker
from exporter.adapter import Adapter, read_adapter
from exporter.artifacts import BuildReport, GateMode, ParityResult, ReferenceResult, Variant, to_dict
from exporter.choices import Target, Task
from exporter.chunking import LongText
from exporter.config import BuildConfig
from exporter.errors import CheckpointError, ExporterError
from exporter.inputs import (Checkpoint, Examples, check_writable, load_checkpoint, read_checkpoint_examples,
                             resolve_columns, resolve_eval_data, split_sources)
from exporter.memory import weights_size
from exporter.pipeline import Run, Step
from exporter.reranker import read_cross_encoder
from exporter.result import BuildResult
from exporter.steps import Candidate, Gate
from exporter.variants import Context, Data
from serving.contract import DEFAULT_CLASSIFIER
from serving.errors import ServingError
from serving.repository import RepositoryConfig, accepts_models, add_model, write_repository

log = logging.getLogger(__name__)

SINGLE_ROWS = 64  # texts used for batch-1 latency


def gate_mode(target: Target) -> GateMode:
    """The CPU server runs each row alone in a 1-thread session; the GPU server runs token-budget sub-batches."""
    return GateMode.PER_ROW if target is Target.CPU else GateMode.BATCHED


@dataclass
class _Inputs:
    checkpoint: Checkpoint
    eval_set: Examples
    calibration: Examples
    tuning: Examples
    warnings: list[str]
    adapter: Adapter | None = None  # a PEFT adapter: ``checkpoint`` is its merge, the reference its PeftModel


def validate(config: BuildConfig) -> _Inputs:
    """Every check that can fail on bad input, done before any slow work."""
    checkpoint = load_checkpoint(config.checkpoint, tokenizer=config.tokenizer, max_length=config.max_length)
    columns = resolve_columns(checkpoint, config.text_column, config.label_column, config.text_pair_column)
    if read_cross_encoder(checkpoint.path) is not None and columns.text_pair is None:
        raise ExporterError(f"{checkpoint.path} is a CrossEncoder reranker: it scores (query, document) pairs; name "
                            "the evaluation CSV's document column with --text-pair-column")
    eval_path = resolve_eval_data(checkpoint, config.eval_data)
    eval_set = read_checkpoint_examples(checkpoint, eval_path, columns, limit=config.eval_size)
    warnings = []
    if len(eval_set) < min(1000, config.eval_size):
        warnings.append(f"only {len(eval_set)} evaluation rows (fewer than 1000)")
    # Calibration from training text (what the brief of static quantization asks); the int8 tuning rows
    # from validation text, which the model did not fit (training rows would flatter the agreement).
    sources = split_sources(checkpoint, eval_path)
    rng = random.Random(config.seed)
    rows = {}
    for name, src in sources.items():
        ex = read_checkpoint_examples(checkpoint, src, columns)
        rows[name] = list(zip(ex.texts, ex.labels, ex.pairs or [None] * len(ex)))
        rng.shuffle(rows[name])
    train, val = rows.get("train", []), rows.get("validation", [])
    if not train and not val:
        warnings.append("no train.csv/validation.csv beside the data record: calibration and tuning use the "
                        "evaluation rows themselves")
        train = val = list(zip(eval_set.texts, eval_set.labels, eval_set.pairs or [None] * len(eval_set)))
    calib = (train or val)[:config.calibration_size]
    tuning = val[:config.tuning_size] if val else train[config.calibration_size:][:config.tuning_size] or train[:config.tuning_size]
    calib_src = sources.get("train") or sources.get("validation") or eval_path
    tuning_src = sources.get("validation") or sources.get("train") or eval_path
    check_writable(config.out, "output directory")
    if config.repository is not None:
        check_writable(config.repository, "repository")
    reach = config.max_length * (CHUNK_ROW_WINDOWS if config.long_text is LongText.CHUNK else 1)
    eval_set = with_long_rows(eval_set, checkpoint, reach)  # last: after every input check
    kind = dict(kind=checkpoint.head, num_labels=len(checkpoint.id2label))
    paired = columns.text_pair is not None
    return _Inputs(
        checkpoint, eval_set,
        Examples(calib_src, [r[0] for r in calib], [r[1] for r in calib], [r[2] for r in calib] if paired else None,
                 **kind),
        Examples(tuning_src, [r[0] for r in tuning], [r[1] for r in tuning],
                 [r[2] for r in tuning] if paired else None, **kind),
        warnings,
    )


LONG_ROWS = 8  # evaluation rows that reach truncation, so a served tokenizer that truncates otherwise fails
CHUNK_ROW_WINDOWS = 3  # chunked builds: the long rows reach 3 x max_length tokens (several windows each)


def with_long_rows(eval_set: Examples, checkpoint: Checkpoint, max_length: int, n: int = LONG_ROWS) -> Examples:
    """The evaluation rows plus, when fewer than ``n`` of them exceed ``max_length`` tokens, long rows made
    by joining consecutive rows until they do. A long row keeps the label of the row that survives the
    checkpoint's truncation side (the first row for "right", the last for "left")."""
    tokenizer = checkpoint.load_tokenizer()
    pairs = eval_set.pairs or [None] * len(eval_set)

    def length(text: str, pair: str | None) -> int:
        return len(tokenizer(text, pair, truncation=False)["input_ids"])

    have = sum(length(t, p) > max_length for t, p in zip(eval_set.texts[:2000], pairs))
    texts, labels, extra_pairs, start = list(eval_set.texts), list(eval_set.labels), list(pairs), 0
    left = getattr(tokenizer, "truncation_side", "right") == "left"
    for _ in range(max(0, n - have)):
        end = start + 1
        while end <= len(eval_set) and length(" ".join(eval_set.texts[start:end]), pairs[start]) <= max_length:
            end += 1
        if end > len(eval_set):
            break  # too few rows left to reach max_length
        texts.append(" ".join(eval_set.texts[start:end]))
        labels.append(eval_set.labels[end - 1 if left else start])
        extra_pairs.append(pairs[end - 1 if left else start])
        start = end
    added = len(texts) - len(eval_set)
    if added:
        log.info("added %d evaluation rows over max_length %d (joined rows) so that truncation is gated",
                 added, max_length)
    return Examples(eval_set.source, texts, labels, extra_pairs if eval_set.pairs is not None else None,
                    eval_set.kind, eval_set.num_labels)


def build(config: BuildConfig) -> BuildResult:
    """The classification task's flow (exporter.tasks runs it for --task classification): the one pipeline
    (exporter.pipeline) with :class:`ClassifierTask`. A PEFT adapter folder is built as its base merged with it
    (exporter.adapter), gated against the PeftModel; a CrossEncoder as a reranker (exporter.reranker)."""
    if config.task is not Task.CLASSIFICATION:
        raise ExporterError(f"exporter.build builds classifiers, not {config.task.value} (exporter.tasks.build "
                            "runs every task)")
    adapter = read_adapter(config.checkpoint, config.base)
    if adapter is None:
        if config.base is not None:
            raise ExporterError(f"--base is for PEFT adapter folders; {config.checkpoint} has no adapter_config.json")
        return pipeline.build(config, ClassifierTask())
    with tempfile.TemporaryDirectory(prefix="exporter-adapter-") as scratch:
        merged = adapter.merge(Path(scratch) / "merged")
        return pipeline.build(replace(config, checkpoint=merged), ClassifierTask(adapter))


@dataclass
class ClassifierTask:
    """What the classifier (single-label, multi-label, regression, pairs, rerankers, merged PEFT adapters)
    supplies to exporter.pipeline: its inputs, PyTorch reference, Optimum export, variant builders
    (exporter.variants, exporter.openvino), parity gate (exporter.parity) and repository writer."""

    adapter: Adapter | None = None  # a PEFT adapter: the checkpoint is its merge, the reference its PeftModel
    label: str = "variant"

    def prepare(self, config: BuildConfig) -> _Inputs:
        inputs = validate(config)
        if self.adapter is not None:
            inputs.adapter = self.adapter
            inputs.warnings.append(f"{self.adapter.peft_type} adapter {self.adapter.path} merged into "
                                   f"{self.adapter.base} (peft merge_and_unload); the reference is the unmerged "
                                   "PeftModel")
        return inputs

    def weights_bytes(self, inputs: _Inputs) -> int | None:
        return weights_size(inputs.checkpoint.path)

    def reference(self, run: Run) -> None:
        run.reference, run.state = _reference(run.config, run.inputs)

    def measure_reference(self, run: Run) -> None:
        model, run.state = run.state, None  # the torch model is never alive next to an ONNX Runtime session
        run.reference_speed = _reference_result(run.config, run.inputs, run.reference, model)

    def export(self, run: Run) -> None:
        run.base, run.export_record = _export(run.config, run.inputs.checkpoint, run.scratch, run.reference)
        run.state = Context(run.config, gate_mode(run.config.target), run.inputs.checkpoint.path, run.out,
                            run.scratch, run.base, run.reference, run.stages, variants=run.variants,
                            tokenizer_dir=run.inputs.checkpoint.tokenizer_dir)

    def plan(self, run: Run) -> list[Step]:
        config = run.config
        ov = openvino.builders(config.precisions, config.openvino and config.target is Target.CPU)  # OpenVINO hook
        return [Step(b.name, b.precision, b) for b in [*variants.builders(config.precisions), *ov]]

    def make(self, run: Run, step: Step) -> tuple[Variant, bool]:
        return variants.make(run.state, step.make)

    def gate(self, run: Run, step: Step) -> Gate:
        return lambda path: run.state.gate(path, step.precision)

    def file(self, run: Run, record: Variant) -> Path:
        return run.out / record.file

    def candidate(self, run: Run, name: str, record: Variant) -> Candidate:
        return variants.candidate(name, record, run.config.target)

    def judged(self, run: Run, record: Variant, verdict: ParityResult | None, reason: str = "") -> None:
        if verdict is None:
            record.parity.reason = reason  # built and timed, not gated (its record says gated=False)
        else:
            record.parity = verdict

    def report(self, run: Run, selected: str | None) -> BuildReport:
        return _assemble(run, selected)

    def write_report(self, report: BuildReport, out: Path, figure: bool = True) -> None:
        render.write(report, out, figure=figure)

    def write_repository(self, run: Run, report: BuildReport) -> Path:
        return write_repo(run.config, run.inputs.checkpoint, report.variant_path(report.selected, run.config.out),
                          report)


def _reference(config: BuildConfig, inputs: _Inputs) -> tuple[Data, object]:
    """Tokenize every row set and run PyTorch on the evaluation rows: (the data every gate uses, the model)."""
    ck = inputs.checkpoint
    try:
        tokenizer = ck.load_tokenizer()
        model = inputs.adapter.reference_model() if inputs.adapter else parity.load_torch_model(ck.path)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load checkpoint {ck.path}: {exc}") from None
    if model.config.num_labels != len(ck.id2label):
        raise CheckpointError(f"checkpoint head has {model.config.num_labels} outputs but {len(ck.id2label)} labels")
    tok = dict(batch_size=config.batch_size, max_length=config.max_length)
    ev = inputs.eval_set
    eval_batches = parity.tokenize(tokenizer, ev.texts, pairs=ev.pairs, **tok)
    windows, counts = _windows(config, tokenizer, ev)
    ref_logits = parity.torch_logits(model, eval_batches, "pytorch reference") \
        if windows is None else chunking.average_rows(parity.torch_logits(model, windows), counts)
    data = Data(
        ref=parity.Reference(ref_logits, inputs.eval_set.targets(), ck.head, config.threshold),
        windows=windows, window_counts=counts,
        eval_batches=eval_batches,
        tuning_batches=parity.tokenize(tokenizer, inputs.tuning.texts, pairs=inputs.tuning.pairs, **tok),
        tuning_labels=inputs.tuning.targets(),
        calibration=parity.tokenize(tokenizer, inputs.calibration.texts, pairs=inputs.calibration.pairs, **tok),
        singles=parity.tokenize(tokenizer, ev.texts[:SINGLE_ROWS], batch_size=1, max_length=config.max_length,
                                pairs=None if ev.pairs is None else ev.pairs[:SINGLE_ROWS]),
        texts=ev.texts if ev.pairs is None else list(zip(ev.texts, ev.pairs)),
        encode=speed.encoder(tokenizer, config.max_length),
        calibration_source=str(inputs.calibration.source))
    log.info("pytorch reference (%s): %s", ck.head.value, data.ref.metrics)
    return data, model


def _reference_result(config: BuildConfig, inputs: _Inputs, data: Data, model) -> ReferenceResult:
    """The reference's metrics, size, speed (as the target serves) and the served model's baseline."""
    ck = inputs.checkpoint
    metrics = {k: v for k, v in data.ref.metrics.items() if k != "micro_f1"}
    labels = [ck.id2label[i] for i in range(len(ck.id2label))]
    return ReferenceResult(**metrics, size_bytes=weights_size(ck.path),
                           speed=_torch_speed(model, data, gate_mode(config.target), config.speed_seconds),
                           baseline=parity.serving_baseline(data.ref, labels))


def _windows(config: BuildConfig, tokenizer, ev: Examples):
    """(every window of every evaluation row as a batch of one, each row's window count) of a chunked build,
    (None, None) otherwise: the reference of the chunked definition (exporter/chunking.py)."""
    if config.long_text is not LongText.CHUNK:
        return None, None
    config.chunk.check(config.max_length, tokenizer.num_special_tokens_to_add(False))
    windows, counts = chunking.window_batches(tokenizer, ev.texts, ev.pairs, config.max_length, config.chunk)
    log.info("chunked reference: %d windows for %d rows (max %d per row)", len(windows), len(counts), max(counts))
    return windows, counts


def _torch_speed(model, data: Data, mode: GateMode, seconds: float):
    import torch

    if mode is GateMode.BATCHED:
        return speed.measure(speed.torch_runner(model), data.singles, data.eval_batches, seconds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CPU server runs each row: one core per row
    try:
        return speed.measure_per_row(speed.torch_runner(model), data.encode, data.texts, seconds, 1)
    finally:
        torch.set_num_threads(threads)


def export_graph(checkpoint: Path, scratch: Path, target: Target, data: Data | None = None,
                 seconds: float = 0.5) -> tuple[Path, dict]:
    """Export and fuse in a worker process (exporter.worker); return the fused graph and its record.

    With ``data``, the worker also measures the unfused export's and the fused graph's batch throughput
    (measured, not assumed), so neither graph's session is ever opened in the build process."""
    args = {}
    if data is not None:
        args = {"singles": str(worker.save_batches(data.singles[:1], scratch / "singles.npz")),
                "batches": str(worker.save_batches(data.eval_batches[:4], scratch / "batches.npz")),
                "seconds": seconds}
    record = worker.call("export", checkpoint=str(checkpoint), scratch=str(scratch), target=target.value, **args)
    return scratch / "optimized" / "model.onnx", record


def _export(config: BuildConfig, ck: Checkpoint, scratch: Path, data: Data) -> tuple[Path, dict]:
    """Export and fuse the graph every variant starts from; with --exhaustive, with the fusion's measured
    throughput (every variant is built from the fused graph whatever it gives: ~20 s on BERT-base)."""
    base, record = export_graph(ck.path, scratch, config.target, data if config.exhaustive else None,
                                min(config.speed_seconds, 0.5))
    record["note"] = ("the fused graph is the base of every variant: quantization must see the fusions "
                      "(Attention -> QAttention); onnxruntime applies the same fusions at load time, "
                      "so the two run at about the same speed on the CPU")
    log.info("graph optimisation: %s", record.get("throughput_seq_s"))
    return base, record


def _settings(config: BuildConfig) -> dict:
    return {"precisions": [p.value for p in config.precisions], "batch_size": config.batch_size,
            "max_length": config.max_length, "eval_size": config.eval_size,
            "calibration_size": config.calibration_size, "tuning_size": config.tuning_size,
            "speed_seconds": config.speed_seconds, "max_exclusion_rounds": config.max_exclusion_rounds,
            "exhaustive": config.exhaustive, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "ort_intra_op_spinning": False, "gate_mode": gate_mode(config.target).value,
            "budgets": vars(config.budgets)}


def _assemble(run: Run, selected: str | None) -> BuildReport:
    config, inputs, built = run.config, run.inputs, run.variants
    ck = inputs.checkpoint
    source = inputs.adapter.path if inputs.adapter else ck.path  # an adapter is named, not its scratch merge
    return BuildReport(
        checkpoint=str(source.absolute()), target=config.target.value, gate_mode=gate_mode(config.target),
        selected=selected, reference=run.reference_speed, eval_data=str(inputs.eval_set.source),
        int8_tuning_data={"source": str(inputs.tuning.source), "rows": len(inputs.tuning)},
        settings=_settings(config), labels=[ck.id2label[i] for i in range(len(ck.id2label))],
        optimization=run.export_record, variants=built, warnings=inputs.warnings, versions=versions(),
        files={v.file: sha256_file(run.out / v.file) for v in built.values() if v.file},
        stage_seconds=run.stages.seconds, memory=run.stages.memory,
    )


def baseline_parameters(baseline: dict | None) -> dict[str, str]:
    """The model-config parameter that carries the build's baseline to the served model's gauges."""
    return {} if baseline is None else {"baseline": json.dumps(baseline, sort_keys=True)}


def write_repo(config: BuildConfig, ck: Checkpoint, onnx_model: Path, report: BuildReport) -> Path:
    """Hand the selected variant to the serving stage's repository writer (atomic on its side)."""

    chosen = report.variants[report.selected]
    provenance = {
        "source": "exporter",
        "checkpoint": report.checkpoint,
        "variant": report.selected,
        "precision": chosen.precision,
        "gate_mode": report.gate_mode.value,
        "parity": to_dict(chosen.parity),
        "speed": to_dict(chosen.speed),
        "reference": {"accuracy": report.reference.accuracy, "macro_f1": report.reference.macro_f1,
                      "n_examples": report.reference.n_examples},
        "eval_data": report.eval_data,
        "baseline": report.reference.baseline,
        "settings": report.settings,
        "versions": report.versions,
        "files": {onnx_model.name: report.files.get(chosen.file)},
    }
    try:
        repo_config = RepositoryConfig(target=config.target, max_length=config.max_length,
                                       encoder_instances=config.instances,
                                       intra_op_threads=config.intra_op_threads, pin_instances=config.pin_instances,
                                       max_batch_tokens=config.max_batch_tokens, tensorrt=config.tensorrt,
                                       max_request_bytes=config.max_request_bytes, long_text=config.long_text.value,
                                       chunk_overlap=config.chunk_overlap, max_chunks=config.max_chunks,
                                       extra=baseline_parameters(report.reference.baseline))
        pair = resolve_columns(ck, config.text_column, config.label_column, config.text_pair_column).text_pair
        cross = read_cross_encoder(ck.path)
        name = config.model_name or (cross.default_name if cross is not None else DEFAULT_CLASSIFIER)
        served = replace(ck.served_model(name, text_pair=pair is not None), threshold=config.threshold)
        if cross is not None:
            served = replace(served, activation=cross.activation)
        if accepts_models(Path(config.repository), config.target):
            return Path(add_model(Path(config.repository), onnx_model=onnx_model, tokenizer_dir=ck.tokenizer_dir,
                                  model=served, config=repo_config, provenance=provenance,
                                  keep_versions=config.keep_versions))
        return Path(write_repository(Path(config.repository), onnx_model=onnx_model, tokenizer_dir=ck.tokenizer_dir,
                                     id2label=dict(ck.id2label), config=repo_config, provenance=provenance,
                                     model=served))
    except ServingError as exc:
        raise ExporterError(f"cannot write the repository {config.repository}: {exc}") from exc
    except NotImplementedError:
        raise ExporterError("serving.repository.write_repository is not implemented yet; "
                            "use --no-repository") from None
