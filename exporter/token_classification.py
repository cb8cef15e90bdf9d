"""Token classification (NER): a ``...ForTokenClassification`` checkpoint (or ``--task token-classification``)
exported through Optimum (task token-classification), each variant gated per token (logits max abs difference,
label agreement over real tokens) and per entity against ``transformers.pipeline("token-classification",
aggregation_strategy=...)`` on the eval texts, the way the server runs it (each text alone, cut before
tokenizing: serving.models.tokenization; entities: serving.models.entities), and served as ``tagger``.

Variants of the fused graph: fp32, fp16 (exporter.fp16) and int8 (ONNX Runtime's dynamic quantization), and with
fp32 and ``--openvino`` (the default) ``ov_fp32``: the graph converted to OpenVINO IR (exporter.openvino; run at
the runtime's default precision, bf16 judged by the fp16 budget; the served tagger opens it through
serving/models/runtime.py, as the gate does); the passing variant with the highest per-row 1-thread throughput
is served. No ``ov_int8``: NNCF calibrates on training rows and a tagger build has only its eval texts.

Long texts are truncated as saved, or with ``--long-text chunk`` run in overlapping windows (``--chunk-overlap``
tokens shared, at most ``--max-chunks``) whose entities are merged by offset: the pipeline's ``stride`` (its
reference then), which refuses aggregation none.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_text
from common.provenance import versions
from exporter import openvino, pipeline, speed, worker
from exporter.artifacts import BuildRecord, to_dict
from exporter.choices import Precision
from exporter.chunking import LongText
from exporter.config import BuildConfig
from exporter.errors import CheckpointError, EvalDataError, ExporterError
from exporter.export import ensure_token_type_ids
from exporter.fp16 import convert_fp16
from exporter.inputs import read_texts
from exporter.memory import weights_size
from exporter.optimize import optimize_onnx
from exporter.pipeline import Run, Step
from exporter.steps import Candidate, Gate
from serving.contract import DEFAULT_TAGGER, Head, ServedModel, entity_key
from serving.errors import ServingError
from serving.models import entities, runtime, tokenization
from serving.repository import RepositoryConfig, Target, accepts_models, add_model, tokenizer_settings, write_repository

log = logging.getLogger(__name__)
WARMUP_ROWS = 4  # texts run before the timed pass (the pipeline's reference pass warms PyTorch the same way)


def is_token_classifier(path: Path) -> bool:
    """Whether the checkpoint folder's config names a ``...ForTokenClassification`` architecture."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    archs = config.get("architectures") or [] if isinstance(config, dict) else []
    return any(str(a).endswith("ForTokenClassification") for a in archs)


def read_labels(path: Path) -> list[str]:
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        id2label = {int(k): str(v) for k, v in config["id2label"].items()}
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path}: no readable id2label in config.json ({exc})") from None
    return [id2label[i] for i in range(len(id2label))]


@dataclass
class Reference:
    """What every variant is gated against: the eval texts, PyTorch's logits over their real tokens, the
    pipeline's entities, its texts/s, and the checkpoint's labels and tokenizer folder."""

    texts: list[str]
    labels: list[str]
    tokenizer_dir: Path
    logits: list[np.ndarray]
    entities: list[list[dict]]
    rows_per_s: float


def tokenizer_dir(config: BuildConfig) -> Path:
    return Path(config.tokenizer or config.checkpoint)


@dataclass
class TaggerGate:
    """One variant measured against PyTorch and the pipeline on the eval texts, as the server runs it."""

    variant: str
    file: str
    passed: bool = False
    max_abs: float = float("inf")  # logits over real tokens
    token_agreement: float = 0.0  # argmax label agreement over real tokens
    entity_agreement: float = 0.0  # entities equal to the pipeline's / (reference + extra served entities)
    texts_equal: float = 0.0  # fraction of texts whose entity list equals the pipeline's
    max_score_diff: float = 0.0
    rows_per_s: float = 0.0  # per-row, 1 thread, tokenization included (exporter.speed.measure_per_row)
    reasons: list[str] = field(default_factory=list)
    gated: bool = True  # False: not gated (a faster variant passed, so it could not be selected)
    runtime_settings: dict | None = None  # OpenVINO variants: what ran (exporter.openvino_ir.save_ir's record)

    @property
    def reason(self) -> str:
        """The gate's verdict in words (exporter.steps.Verdict)."""
        return "; ".join(self.reasons) if self.reasons else ("within budget" if self.passed else "not gated")

    def brief(self) -> dict:
        """The verdict-bearing numbers."""
        keys = ("token_agreement", "entity_agreement", "max_abs", "passed")
        return {k: getattr(self, k) for k in keys} | {"reason": self.reason}


@dataclass
class TaggerReport(BuildRecord):
    """Everything a tagger build decided and measured (build/report.json): the one build record plus the
    tagger's own fields."""

    checkpoint: str
    labels: list[str]
    aggregation: str
    max_length: int
    eval_data: str
    n_texts: int
    variants: dict[str, TaggerGate]
    selected: str | None = None
    optimization: dict = field(default_factory=dict)
    pipeline_rows_per_s: float = 0.0  # transformers.pipeline, one text at a time, 1 thread (same texts, same run)
    long_text: str = "truncate"  # chunk: overlapping windows merged by offset (the pipeline's stride)
    chunk_overlap: int = 0


def export_tagger(checkpoint: Path, out_dir: Path, target) -> tuple[Path, dict]:
    """Optimum's token-classification export (the served input names, token_type_ids added), then the
    transformers fusions every variant starts from (exporter.optimize, as for classifiers): (graph, record)."""
    import onnx
    from optimum.exporters.onnx import main_export

    try:
        main_export(str(checkpoint), out_dir, task="token-classification", do_validation=False,
                    local_files_only=True, library_name="transformers")
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot export {checkpoint} to ONNX: {exc}") from exc
    path = out_dir / "model.onnx"
    model = onnx.load(str(path))
    ensure_token_type_ids(model)
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return optimize_onnx(out_dir, out_dir.parent / "optimized", target)


def make_variant(precision: Precision, fp32: Path, dst: Path) -> Path:
    """The ``precision`` copy of the fp32 graph at ``dst``."""
    if precision is Precision.FP32:
        dst.write_bytes(fp32.read_bytes())
    elif precision is Precision.FP16:
        convert_fp16(fp32, dst)
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32), str(dst), weight_type=QuantType.QInt8)
    return dst


def reference(config: BuildConfig, texts: list[str]) -> Reference:
    """(PyTorch logits [tokens, labels] per text, the pipeline's entities per text, the pipeline's texts/s one at
    a time on one thread), truncated at max_length (or in windows: the pipeline's stride)."""
    ref, pipe = reference_outputs(config, texts)
    ref.rows_per_s = pipeline_speed(pipe, texts)
    return ref


def reference_outputs(config: BuildConfig, texts: list[str]):
    """(the Reference without its speed, the transformers pipeline that made it)."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    source = tokenizer_dir(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, model_max_length=config.max_length, local_files_only=True)
        model = AutoModelForTokenClassification.from_pretrained(config.checkpoint, local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load token classifier {config.checkpoint}: {exc}") from None
    if not tokenizer.is_fast:
        raise CheckpointError(f"{source}: a token classifier needs a fast tokenizer (tokenizer.json) for offsets")
    chunked = config.long_text is LongText.CHUNK
    windows = dict(stride=config.chunk_overlap, return_overflowing_tokens=True, padding=True) if chunked else {}
    with torch.inference_mode():
        logits = []
        for text in texts:
            enc = tokenizer(text, truncation=True, return_tensors="pt", **windows)
            enc.pop("overflow_to_sample_mapping", None)
            out = model(**enc).logits.float().numpy()
            logits.append(np.concatenate([out[i][enc["attention_mask"][i].numpy() == 1] for i in range(len(out))]))
    pipe = pipeline("token-classification", model=model, tokenizer=tokenizer, aggregation_strategy=config.aggregation.value,
                    device="cpu", **({"stride": config.chunk_overlap} if chunked else {}))
    rows = [pipe(text) for text in texts]
    entities = [[{k: (float(v) if k == "score" else v) for k, v in e.items()} for e in row] for row in rows]
    return Reference(texts, read_labels(config.checkpoint), tokenizer_dir(config), logits, entities, 0.0), pipe


def pipeline_speed(pipe, texts: list[str]) -> float:
    """The transformers pipeline's texts/s, one text at a time on one thread (as the served tagger runs)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for text in texts[:WARMUP_ROWS]:
            pipe(text)
        start = time.perf_counter()
        for text in texts:
            pipe(text)
        return len(texts) / max(time.perf_counter() - start, 1e-9)
    finally:
        torch.set_num_threads(threads)


def served_tagger(onnx_path: Path, tokenizer_dir: Path, config: BuildConfig, labels: list[str]) -> "ServedTagger":
    """text -> (logits [tokens, labels], entities) as the served tagger computes them: the text alone, cut
    before tokenizing (serving.models.tokenization), one thread, the session the served model opens
    (serving.models.runtime: OpenVINO when an IR lies beside ``onnx_path``, else ONNX Runtime)."""
    from tokenizers import Tokenizer

    settings = tokenizer_settings(tokenizer_dir)
    tok = tokenization.LengthTokenizer(Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")), config.max_length,
                                       settings["truncation_side"], long_text=config.long_text.value,
                                       overlap=config.chunk_overlap, max_windows=config.max_chunks)
    unk = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get("unk_token") \
        if (tokenizer_dir / "tokenizer_config.json").is_file() else None
    vocab = entities.Vocabulary.of(tok.probe, unk.get("content") if isinstance(unk, dict) else unk)
    return ServedTagger(tok, vocab, runtime.open_session(onnx_path, 1), labels, config.aggregation.value)


@dataclass
class ServedTagger:
    """The served tagger's work on one text (:func:`served_tagger` opens it)."""

    tok: tokenization.LengthTokenizer
    vocab: entities.Vocabulary
    session: object
    labels: list[str]
    aggregation: str
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.names = [i.name for i in self.session.get_inputs()]

    def shape(self, text: str) -> tuple[int, ...]:
        """The token count of each window ``text`` runs as (what the runtime's per-shape work depends on)."""
        return tuple(len(enc.ids) for enc in self.tok.encode(text).encodings)

    def __call__(self, text: str):
        row = self.tok.encode(text)
        names, window = self.names, []
        for enc in row.encodings:
            cols = {"input_ids": enc.ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.type_ids}
            window.append(self.session.run(["logits"], {n: np.asarray([cols[n]], np.int64) for n in names})[0][0])
        return np.concatenate(window), entities.text_entities(text, row.encodings, window, self.labels, self.vocab,
                                                              self.aggregation, row.shift)


def served(onnx_path: Path, tokenizer_dir: Path, texts: list[str], config: BuildConfig, labels: list[str]):
    """(logits per text, entities per text) as the served tagger computes them: each text alone (its speed is
    :func:`measure_speed`'s, taken when the variant is built)."""
    one = served_tagger(onnx_path, tokenizer_dir, config, labels)
    done = [one(text) for text in texts]
    return [d[0] for d in done], [d[1] for d in done]


def measure_speed(onnx_path: Path, ref: Reference, config: BuildConfig) -> float:
    """The variant's texts/s as served, measured the way the classifier's is (exporter.speed.measure_per_row:
    each text tokenized and run alone on one thread for --speed-seconds)."""
    one = served_tagger(onnx_path, ref.tokenizer_dir, config, ref.labels)
    return speed.measure_per_row(one, lambda text: text, ref.texts, config.speed_seconds, 1,
                                 shape=one.shape).throughput_seq_s


def compare_entities(ref: list[list[dict]], got: list[list[dict]], key: str, tolerance: float = math.inf
                     ) -> tuple[float, float, float]:
    """(entity agreement: entities equal in label, word, start and end over the reference's and the extra served
    ones; the fraction of texts whose lists are equal, each score within ``tolerance`` of the reference's; the
    largest score difference of agreeing entities). The gate and ``loadtest bench`` both judge by it."""
    matched = total = equal = 0
    worst = 0.0
    for r, g in zip(ref, got, strict=True):
        spans = {(e[key], e["word"], e["start"], e["end"]): e["score"] for e in g}
        hits = [(e, spans[(e[key], e["word"], e["start"], e["end"])]) for e in r
                if (e[key], e["word"], e["start"], e["end"]) in spans]
        diffs = [abs(float(e["score"]) - float(s)) for e, s in hits]  # labels, words, offsets equal; scores may differ
        worst = max([worst, *diffs])
        matched += len(hits)
        total += len(r) + len(g) - len(hits)
        equal += int(len(hits) == len(r) == len(g) and all(d <= tolerance for d in diffs))
    return (matched / total if total else 1.0), equal / max(len(ref), 1), worst


def gate(name: str, path: Path, config: BuildConfig, ref: Reference, precision: Precision | None = None
         ) -> TaggerGate:
    """Measure one variant; the budgets of its precision (default: the one its name says) decide."""
    result = TaggerGate(name, path.name)
    logits, found = served(path, ref.tokenizer_dir, ref.texts, config, ref.labels)
    agree = count = 0
    worst = 0.0
    for r, g in zip(ref.logits, logits):
        if r.shape != g.shape:
            result.reasons.append(f"token count differs from PyTorch ({g.shape[0]} vs {r.shape[0]})")
            worst = float("inf")
            continue
        worst = max(worst, float(np.max(np.abs(r - g))) if r.size else 0.0)
        agree += int(np.sum(r.argmax(-1) == g.argmax(-1)))
        count += r.shape[0]
    result.max_abs, result.token_agreement = worst, agree / max(count, 1)
    result.entity_agreement, result.texts_equal, result.max_score_diff = compare_entities(
        ref.entities, found, entity_key(config.aggregation))
    b = config.budgets
    max_abs, minimum = {"fp32": (b.fp32_max_abs, b.fp32_min_agreement), "fp16": (b.fp16_max_abs, b.fp16_min_agreement),
                        "int8": (float("inf"), b.int8_min_agreement)}[(precision or Precision(name)).value]
    if not np.isfinite(worst) and np.isfinite(max_abs) or worst > max_abs:
        result.reasons.append(f"max |logit diff| {worst:.3g} > {max_abs:g}")
    if result.token_agreement < minimum:
        result.reasons.append(f"token label agreement {result.token_agreement:.4f} < {minimum:g}")
    if result.entity_agreement < minimum:
        result.reasons.append(f"entity agreement with the pipeline {result.entity_agreement:.4f} < {minimum:g}")
    result.passed = not result.reasons
    return result


def build_tagger(config: BuildConfig):
    """Build, gate, report and (when a variant passes) serve a token classifier: the one pipeline
    (exporter.pipeline) with :class:`TaggerTask`."""
    return pipeline.build(config, TaggerTask())


@dataclass
class TaggerInputs:
    checkpoint: Path
    labels: list[str]
    texts: list[str]
    warnings: list[str] = field(default_factory=list)


@dataclass
class TaggerTask:
    """What the tagger supplies to exporter.pipeline: its eval texts, PyTorch/pipeline reference, Optimum export,
    fp32/fp16/int8 variants, per-token and per-entity gate, report and the tagger it adds to a repository."""

    label: str = "tagger variant"

    def prepare(self, config: BuildConfig) -> TaggerInputs:
        labels = read_labels(config.checkpoint)
        if config.target is not Target.CPU:
            raise ExporterError("a token classifier (tagger) is served on the cpu target only (--target cpu)")
        if config.long_text is LongText.CHUNK and config.aggregation.value == "none":
            raise ExporterError("--long-text chunk merges entities by offset: choose an --aggregation other than "
                                "none (as the pipeline's stride)")
        return TaggerInputs(Path(config.checkpoint), labels, _eval_texts(config))

    def weights_bytes(self, inputs: TaggerInputs) -> int | None:
        return weights_size(inputs.checkpoint)

    def reference(self, run: Run) -> None:
        run.reference, run.state = reference_outputs(run.config, run.inputs.texts)

    def measure_reference(self, run: Run) -> None:
        pipe, run.state = run.state, None
        run.reference.rows_per_s = run.reference_speed = pipeline_speed(pipe, run.inputs.texts)

    def export(self, run: Run) -> None:
        run.base, run.export_record = export_tagger(run.config.checkpoint, run.scratch / "export", run.config.target)

    def plan(self, run: Run) -> list[Step]:
        steps = [Step(p.value, p) for p in run.config.precisions]
        if run.config.openvino and Precision.FP32 in run.config.precisions and openvino.available():
            steps.append(Step(openvino.OV_FP32, openvino.gate_precision(openvino.default_precision())))
        return steps

    def make(self, run: Run, step: Step) -> tuple[TaggerGate, bool]:
        ov = step.name == openvino.OV_FP32
        path = run.out / step.name / runtime.ONNX_FILE if ov else run.out / f"{step.name}.onnx"
        settings = None
        try:
            with run.stages(f"{step.name}-build"):
                if ov:  # the fused fp32 graph converted to OpenVINO IR (model.xml beside model.onnx), in a worker
                    path.parent.mkdir(parents=True, exist_ok=True)
                    settings = worker.call("ov-convert", src=str(run.base), dst=str(path))
                else:
                    make_variant(step.precision, run.base, path)
        except Exception as exc:  # noqa: BLE001 - a converter/quantizer failure fails the variant, not the build
            log.warning("tagger %s variant failed: %s", step.name, exc)
            return TaggerGate(step.name, "", reasons=[f"conversion failed: {exc}"]), False
        with run.stages(f"{step.name}-speed"):
            rows_per_s = measure_speed(path, run.reference, run.config)
        return TaggerGate(step.name, path.relative_to(run.out).as_posix(), rows_per_s=rows_per_s, gated=False,
                          runtime_settings=settings), True

    def gate(self, run: Run, step: Step) -> Gate:
        return lambda path: gate(step.name, path, run.config, run.reference, step.precision)

    def file(self, run: Run, record: TaggerGate) -> Path:
        return run.out / record.file

    def candidate(self, run: Run, name: str, record: TaggerGate) -> Candidate:
        return Candidate(name, name, record.passed, record.rows_per_s if record.file else None)

    def judged(self, run: Run, record: TaggerGate, verdict: TaggerGate | None, reason: str = "") -> None:
        if verdict is None:
            record.reasons = [reason]
            return
        for name in ("passed", "max_abs", "token_agreement", "entity_agreement", "texts_equal", "max_score_diff",
                     "reasons"):
            setattr(record, name, getattr(verdict, name))
        record.gated = True
        log.info("tagger %s: %s", record.variant, record)

    def report(self, run: Run, selected: str | None) -> TaggerReport:
        config = run.config
        return TaggerReport(str(Path(config.checkpoint).absolute()), run.inputs.labels, config.aggregation.value,
                            config.max_length, str(config.eval_data), len(run.inputs.texts), run.variants, selected,
                            long_text=config.long_text.value, chunk_overlap=config.chunk_overlap,
                            pipeline_rows_per_s=run.reference_speed, optimization=run.export_record,
                            stage_seconds=run.stages.seconds, versions=versions())

    def write_report(self, report: TaggerReport, out: Path, figure: bool = True) -> None:
        write_report(report, out)

    def write_repository(self, run: Run, report: TaggerReport) -> Path:
        return write_tagger(run.config, report, run.inputs.labels)


def write_report(report: TaggerReport, out: Path) -> None:
    """``out/report.json``, atomically."""
    atomic_write_text(Path(out) / "report.json", json.dumps(to_dict(report), indent=2, default=str) + "\n")


def _eval_texts(config: BuildConfig) -> list[str]:
    if config.eval_data is None:
        raise EvalDataError("a token classifier is gated on held-out text: give --eval-data CSV (a text column)")
    texts = read_texts(config.eval_data, config.text_column or "text", config.eval_size)
    if not texts:
        raise EvalDataError(f"{config.eval_data}: no text rows")
    return texts


def write_tagger(config: BuildConfig, report: TaggerReport, labels: list[str]) -> Path:
    """The selected variant into the repository as ``tagger`` (or --model-name), beside the models there."""

    model = ServedModel(name=config.model_name or DEFAULT_TAGGER, head=Head.TOKEN_CLASSIFICATION,
                        labels=tuple(labels), aggregation=config.aggregation)
    onnx_model = config.out / report.variants[report.selected].file
    provenance = {"source": "exporter", "checkpoint": report.checkpoint, "variant": report.selected,
                  "gate": asdict(report.variants[report.selected]), "aggregation": report.aggregation}
    repo = RepositoryConfig(target=config.target, max_length=config.max_length, encoder_instances=config.instances,
                            intra_op_threads=config.intra_op_threads, pin_instances=config.pin_instances,
                            max_request_bytes=config.max_request_bytes, long_text=config.long_text.value,
                            chunk_overlap=config.chunk_overlap, max_chunks=config.max_chunks)
    kwargs = dict(onnx_model=onnx_model, tokenizer_dir=tokenizer_dir(config), config=repo, provenance=provenance)
    try:
        if accepts_models(Path(config.repository), config.target):
            return Path(add_model(Path(config.repository), model=model, keep_versions=config.keep_versions, **kwargs))
        return Path(write_repository(Path(config.repository), id2label=dict(enumerate(labels)), model=model,
                                     **kwargs))
    except ServingError as exc:
        raise ExporterError(f"cannot write the repository {config.repository}: {exc}") from exc


def summary(report: TaggerReport) -> str:
    """The build's table in Markdown (the CLI prints it; report.json holds every figure)."""
    lines = [f"# Tagger build: {report.checkpoint}", "",
             f"aggregation {report.aggregation}, max_length {report.max_length}, {report.n_texts} eval texts; "
             f"selected: {report.selected or 'none'}; transformers.pipeline: {report.pipeline_rows_per_s:.0f} texts/s "
             "(1 thread, one text at a time, tokenization included; the variants' rows/s likewise)", "",
             "| variant | passed | max abs logit | token agreement | entity agreement | texts equal | rows/s |",
             "|---|---|---|---|---|---|---|"]
    for v in report.variants.values():
        lines.append(f"| {v.variant} | {'yes' if v.passed else 'no: ' + '; '.join(v.reasons)} | {v.max_abs:.3g} | "
                     f"{v.token_agreement:.4f} | {v.entity_agreement:.4f} | {v.texts_equal:.4f} | {v.rows_per_s:.0f} |")
    long = (f"long texts: overlapping windows ({report.chunk_overlap} tokens shared), entities merged by offset"
            if report.long_text == "chunk" else "long texts: truncated as saved")
    return "\n".join(lines + ["", long])
