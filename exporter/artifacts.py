"""The build report as typed dataclasses, and the one place that writes and reads it as JSON.

Every stage output the exporter leaves for later stages (``build/report.json``) goes through
:func:`to_json` / :func:`from_json`; readers (``loadtest``) call :func:`read_report` instead of guessing
at keys. ``schema_version`` changes whenever a field is renamed or its meaning changes.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_text
from exporter.errors import ExporterError

SCHEMA_VERSION = 1
REPORT_JSON = "report.json"
MODEL_FILE = "model.onnx"  # inside each variant's directory, beside config.json and the tokenizer files


class ArtifactError(ExporterError):
    """A report on disk is missing, unreadable or of another schema."""


class GateMode(str, enum.Enum):
    """How parity and speed were measured: each row alone and unpadded in a 1-thread session (what the
    CPU target serves), or the GPU target's token-budget sub-batches (rows sorted by length, each sub-batch
    padded to its own longest row: serving.models.token_batch)."""

    PER_ROW = "per_row"
    BATCHED = "batched"


@dataclass
class SpeedResult:
    """In-process speed of one model. ``throughput_seq_s`` is what selection compares. ``warmed_shapes``:
    distinct input shapes run once, unmeasured, before their first timed row (exporter.speed.FirstPerShape).
    ``probe``: set when this is the measure of the variant's int8 probe that left it there (the measure that
    decided; no second one is taken), saying which probe and how long it was timed."""

    mode: GateMode
    latency_ms_p50: float
    latency_ms_p99: float
    latency_samples: int
    throughput_seq_s: float
    throughput_rows: int
    throughput_batch_size: int = 1
    intra_op_threads: int | None = None  # None: the runtime's default (all cores)
    tokenization_included: bool = False
    warmed_shapes: int = 0
    probe: str | None = None


@dataclass
class ParityResult:
    """One variant against the PyTorch reference on the evaluation (or tuning) rows, with its verdict."""

    n_examples: int
    passed: bool
    reason: str
    label_agreement: float
    gate_mode: GateMode = GateMode.BATCHED
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    max_rel_diff: float | None = None
    max_prob_diff: float | None = None
    accuracy: float | None = None
    accuracy_drop_pts: float | None = None
    macro_f1: float | None = None
    macro_f1_drop_pts: float | None = None
    nan_inf: int = 0
    budget: dict[str, float] = field(default_factory=dict)
    label_agreement_batch1: float | None = None  # each row alone, unpadded (equals label_agreement per_row)
    early_stop: bool = False
    # The head judged: single-label (label_agreement: argmax), multi-label (label_agreement: every label's
    # on/off at the threshold; accuracy: subset accuracy; macro_f1 over labels), regression (label_agreement:
    # rows within 1% of the reference predictions' spread, recorded, not gated; accuracy/macro_f1 None; mae,
    # pearson; gated on max_abs_diff and mae_increase_pts).
    head: str = "single_label_classification"
    mae: float | None = None
    mae_increase_pts: float | None = None  # regression: MAE increase in % of the targets' standard deviation
    pearson: float | None = None
    gated: bool = True  # False: not gated (a faster or preferred variant passed, so it could not be selected)

    def brief(self) -> dict[str, Any]:
        """The verdict-bearing numbers, for the int8 search log."""
        keys = ("n_examples", "label_agreement", "accuracy_drop_pts", "max_abs_diff", "nan_inf", "passed", "reason")
        return {k: getattr(self, k) for k in keys}


@dataclass
class ReferenceResult:
    """PyTorch's own accuracy on the evaluation rows (the yardstick of every variant). Regression heads have
    no accuracy/macro_f1 (None) but mae and pearson."""

    accuracy: float | None
    macro_f1: float | None
    n_examples: int
    size_bytes: int | None = None
    speed: SpeedResult | None = None
    mae: float | None = None
    pearson: float | None = None
    # what the served model's predictions look like on the eval rows: label_share {label: share},
    # confidence_mean (top-1 probability), rows; None for regression (parity.serving_baseline)
    baseline: dict[str, Any] | None = None


@dataclass
class Variant:
    """One exported precision: its directory under build/, its gate verdict and its speed."""

    name: str
    precision: str
    file: str | None  # relative to the build directory: "<name>/model.onnx"
    size_bytes: int | None
    parity: ParityResult
    speed: SpeedResult | None = None
    servable: bool = False
    error: str | None = None
    fp32_nodes: list[str] | str | None = None  # "all" for fp32
    fp32_io: list[str] | None = None
    fp32_ops_present: list[str] | None = None
    converter: str | None = None
    mode: str | None = None  # int8: dynamic / static
    quantization: dict[str, Any] | None = None
    excluded_nodes: list[str] | None = None
    search: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    runtime_settings: dict[str, Any] | None = None  # OpenVINO variants: runtime, inference precision, IR files

    @property
    def directory(self) -> str | None:
        """The variant's directory (Optimum-loadable) relative to the build directory."""
        return str(Path(self.file).parent) if self.file else None


@dataclass
class MemoryStage:
    """The process's peak RSS after one stage, and how much the stage raised it."""

    stage: str
    peak_rss_bytes: int
    delta_bytes: int
    rss_after_bytes: int
    rss_before_bytes: int = 0
    worker_peak_rss_bytes: int = 0  # peak of a worker process that ran during this stage (0: none ran)


@dataclass
class MemoryRecord:
    """Peak RSS of the build process (ratio: over the checkpoint's fp32 weights) and of its export worker."""

    weights_bytes: int | None
    peak_rss_bytes: int = 0
    worker_peak_rss_bytes: int = 0
    stages: list[MemoryStage] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        """The build process's peak RSS over the fp32 weights."""
        return self.peak_rss_bytes / self.weights_bytes if self.weights_bytes else None

    @property
    def combined_peak_estimate_bytes(self) -> int:
        """The build and its largest worker together: the build process's RSS when that worker started
        plus the worker's peak (or the build process's own peak, if larger). An estimate: smaller workers
        started later, while the build process held more, are not tracked separately."""
        return max([self.peak_rss_bytes] + [s.rss_before_bytes + s.worker_peak_rss_bytes for s in self.stages
                                            if s.worker_peak_rss_bytes])


@dataclass(kw_only=True)
class BuildRecord:
    """The one build record: what every task's report (the classifier's BuildReport, EmbeddingReport,
    exporter.token_classification.TaggerReport) records besides its own results: warnings, versions, file
    hashes, the repository it wrote and the time of each stage (written after the report's own fields)."""

    warnings: list[str] = field(default_factory=list)
    versions: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    repository: str | None = None
    repository_error: str | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def variant_path(self, name: str, build_dir: Path) -> Path | None:
        """The ONNX file of variant ``name`` inside ``build_dir`` (None when it failed to build)."""
        file = self.variants[name].file
        return Path(build_dir) / file if file else None


@dataclass
class BuildReport(BuildRecord):
    """Everything `exporter build` decided and measured (build/report.json)."""

    checkpoint: str
    target: str
    gate_mode: GateMode
    selected: str | None
    reference: ReferenceResult
    eval_data: str
    settings: dict[str, Any]
    labels: list[str]
    variants: dict[str, Variant]
    int8_tuning_data: dict[str, Any] = field(default_factory=dict)
    optimization: dict[str, Any] = field(default_factory=dict)
    memory: MemoryRecord | None = field(default=None, kw_only=True)
    schema_version: int = field(default=SCHEMA_VERSION, kw_only=True)


# ----------------------------------------------------------------------------------------------- JSON


def to_dict(obj: Any) -> Any:
    """Dataclasses, enums and paths as plain JSON values (dataclass fields in declaration order, keyword-only
    ones last)."""
    if dataclasses.is_dataclass(obj):  # keyword-only fields (the shared BuildRecord, schema_version) last
        fields = sorted(dataclasses.fields(obj), key=lambda f: f.kw_only)
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def to_json(report: BuildReport) -> str:
    return json.dumps(to_dict(report), indent=2, allow_nan=False) + "\n"


def _convert(tp: Any, value: Any) -> Any:
    """``value`` (parsed JSON) as type ``tp``: dataclasses, enums, Optional, list/dict of those."""
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        for option in inner:
            if dataclasses.is_dataclass(option) or isinstance(option, type) and issubclass(option, enum.Enum):
                return _convert(option, value)
        return value
    if origin is dict and len(args) == 2:
        return {k: _convert(args[1], v) for k, v in value.items()}
    if origin is list and args:
        return [_convert(args[0], v) for v in value]
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    return value


def _from_dict(cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise ArtifactError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ArtifactError(f"{cls.__name__}: missing field {f.name!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{cls.__name__}: {exc}") from None


def from_json(text: str) -> BuildReport:
    """Parse report.json text of this schema version (an older or newer one is an error, not a guess)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ArtifactError(f"not JSON: {exc}") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"build report schema_version {version!r}, this toolkit reads {SCHEMA_VERSION} "
                            "(rebuild with `python -m exporter build`)")
    return _from_dict(BuildReport, data)


def write_report_json(report: BuildReport, build_dir: Path) -> Path:
    path = Path(build_dir) / REPORT_JSON
    atomic_write_text(path, to_json(report))
    return path


def _read_typed(build_dir: Path, parse):
    """``parse`` applied to ``build_dir/report.json``; a read or schema error names the file."""
    path = Path(build_dir) / REPORT_JSON
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return parse(text)
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None


def read_report(build_dir: Path) -> BuildReport:
    """The typed report of the build in ``build_dir`` (``build_dir/report.json``)."""
    return _read_typed(build_dir, from_json)


# ------------------------------------------------------------------------------------ embedding report

EMBEDDING_SCHEMA_VERSION = 1


@dataclass
class EmbeddingGate:
    """One variant's agreement with the reference on the held-out texts."""

    n_texts: int
    min_cosine: float | None
    mean_cosine: float | None
    max_norm_gap: float | None
    topk_overlap: float | None
    top_k: int
    nan_inf: bool
    budget_min_cosine: float
    budget_min_topk_overlap: float
    passed: bool
    reason: str
    gated: bool = True  # False: not gated (a faster or preferred variant passed, so it could not be selected)

    def brief(self) -> dict:
        """The verdict-bearing numbers, for the int8 exclusion search's log (exporter.int8_search.search)."""
        keys = ("n_texts", "min_cosine", "topk_overlap", "nan_inf", "passed", "reason")
        return {k: getattr(self, k) for k in keys}


@dataclass
class EmbeddingSpeed:
    """Per-row throughput: one row at a time, one intra-op thread, tokenization included.

    ``rows_per_s`` is the classifier's measure (exporter.speed.measure_per_row, wall time), the one selection
    ranks by; ``rows_per_cpu_s`` counts the process's CPU time instead (it hardly moves when other work shares
    the machine), reported beside it.
    """

    rows_per_s: float
    n_rows: int
    seconds: float
    intra_op_threads: int = 1
    rows_per_cpu_s: float = 0.0
    cpu_seconds: float = 0.0



@dataclass
class EmbeddingVariantResult:
    """One embedding variant as the report records it (gate and speed: measured by exporter.embedding_gate)."""

    precision: str
    file: str | None = None  # relative to the build directory
    size_bytes: int | None = None
    gate: EmbeddingGate | None = None
    speed: EmbeddingSpeed | None = None
    error: str | None = None
    excluded_nodes: list[str] = field(default_factory=list)
    runtime_settings: dict[str, Any] | None = None  # OpenVINO variants: runtime, inference precision, IR files

    @property
    def passed(self) -> bool:
        return self.error is None and self.gate is not None and self.gate.passed


@dataclass
class EmbeddingReport(BuildRecord):
    """Everything `exporter build --task embedding` decided and measured (build/report.json)."""

    model_dir: str
    model_name: str
    target: str
    gate_mode: GateMode
    selected: str | None
    pipeline: dict[str, Any]
    eval_data: str
    n_texts: int
    budgets: dict[str, Any]
    variants: dict[str, EmbeddingVariantResult]
    reference_speed: EmbeddingSpeed | None = None
    tuning_data: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    task: str = field(default="embedding", kw_only=True)
    schema_version: int = field(default=EMBEDDING_SCHEMA_VERSION, kw_only=True)


def embedding_report_from_json(text: str) -> EmbeddingReport:
    """Parse an embedding build's report.json of this schema version."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ArtifactError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("task") != "embedding":
        raise ArtifactError("not an embedding build report (build with `python -m exporter build --task embedding`)")
    if data.get("schema_version") != EMBEDDING_SCHEMA_VERSION:
        raise ArtifactError(f"embedding report schema_version {data.get('schema_version')!r}, this toolkit reads "
                            f"{EMBEDDING_SCHEMA_VERSION}")
    return _from_dict(EmbeddingReport, data)


def write_embedding_report_json(report: EmbeddingReport, build_dir: Path) -> Path:
    path = Path(build_dir) / REPORT_JSON
    atomic_write_text(path, json.dumps(to_dict(report), indent=2, allow_nan=False) + "\n")
    return path


def read_embedding_report(build_dir: Path) -> EmbeddingReport:
    """The typed report of the embedding build in ``build_dir``."""
    return _read_typed(build_dir, embedding_report_from_json)
