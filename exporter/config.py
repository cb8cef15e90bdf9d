"""Build configuration: precisions, target, parity budgets (dataclasses validated on creation)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from exporter.choices import Pooling, Precision, Target, Task
from exporter.chunking import DEFAULT_MAX_CHUNKS, DEFAULT_OVERLAP, ChunkConfig, LongText, default_overlap
from exporter.errors import ExporterError
from exporter.reranker import read_cross_encoder
from serving.contract import DEFAULT_AGGREGATION, Aggregation, ContractError, check_model_name
from serving.models.token_batch import DEFAULT_MAX_BATCH_TOKENS

__all__ = ["Budgets", "BuildConfig", "Pooling", "Precision", "Target", "Task", "parse_precisions"]


@dataclass(frozen=True)
class Budgets:
    """Parity budgets per precision. Agreements are fractions (0..1), drops are accuracy points."""

    fp32_max_abs: float = field(default=1e-4,
                                metadata={"help": "fp32 budget: largest absolute LOGIT difference vs PyTorch "
                                                  "(regression: the predicted value)"})
    fp32_min_agreement: float = field(default=1.0, metadata={"help": "fp32 budget: label agreement fraction"})
    fp16_max_abs: float = field(default=2e-2,
                                metadata={"help": "fp16 budget: largest absolute LOGIT difference vs PyTorch "
                                                  "(regression: the predicted value)"})
    fp16_min_agreement: float = field(default=0.995, metadata={"help": "fp16 budget: label agreement fraction"})
    int8_max_accuracy_drop: float = field(default=0.5, metadata={"help": "int8 budget: accuracy drop in points"})
    int8_min_agreement: float = field(default=0.98, metadata={"help": "int8 budget: label agreement fraction"})

    def __post_init__(self) -> None:
        for name in ("fp32_max_abs", "fp16_max_abs", "int8_max_accuracy_drop"):
            if getattr(self, name) < 0:
                raise ExporterError(f"budget {name} must be >= 0, got {getattr(self, name)}")
        for name in ("fp32_min_agreement", "fp16_min_agreement", "int8_min_agreement"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ExporterError(f"budget {name} must be within 0..1, got {getattr(self, name)}")


DEFAULT_MAX_LENGTH = 128


def _default_max_length(checkpoint: Path) -> int:
    """A CrossEncoder's saved max_length (what its ``predict`` truncates at), else 128."""
    cross = read_cross_encoder(checkpoint) if Path(checkpoint).is_dir() else None
    return cross.max_length if cross is not None and cross.max_length else DEFAULT_MAX_LENGTH


def parse_precisions(text: str | tuple | list) -> tuple[Precision, ...]:
    """``"fp32,int8"`` -> (Precision.FP32, Precision.INT8); unknown names are a user error."""
    items = [p.strip().lower() for p in text.split(",")] if isinstance(text, str) else list(text)
    out: list[Precision] = []
    for item in items:
        if not item:
            continue
        try:
            precision = Precision(item)
        except ValueError:
            known = ", ".join(p.value for p in Precision)
            raise ExporterError(f"unknown precision {item!r} (known: {known})") from None
        if precision not in out:
            out.append(precision)
    if not out:
        raise ExporterError("no precision given")
    return tuple(out)


@dataclass
class BuildConfig:
    """Everything `python -m exporter build` needs."""

    checkpoint: Path = field(metadata={"help": "Hugging Face sequence-classification checkpoint directory"})
    out: Path = field(default=Path("build"), metadata={"help": "build directory"})
    repository: Path | None = field(default=Path("model_repository"),
                                    metadata={"help": "Triton repository to write the selected variant into"})
    keep_versions: int = field(default=2, metadata={
        "help": "versions of the model the repository keeps when it already serves it (the new one beside "
                "the previous ones, for a rollback)"})
    target: Target = field(default=Target.CPU,
                           metadata={"help": "cpu: every row alone, one pinned instance per core; gpu: token-budget "
                                             "batches on ONNX Runtime's CUDA provider, fp16"})
    precisions: tuple[Precision, ...] = field(default=(Precision.FP32, Precision.FP16, Precision.INT8),
                                              metadata={"help": "comma list of the precisions to build"})
    eval_data: Path | None = field(default=None,
                                   metadata={"help": "held-out CSV (text,label); default <metrics.json "
                                                     "data_dir>/test.csv"})
    eval_size: int = field(default=1000, metadata={"help": "rows of eval data used"})
    calibration_size: int = field(default=256, metadata={"help": "training rows for static int8 calibration"})
    max_length: int | None = field(default=None, metadata={
        "help": "token truncation (default: a CrossEncoder's saved max_length, else 128)"})
    batch_size: int = field(default=32, metadata={"help": "parity/throughput batch"})
    budgets: Budgets = field(default_factory=Budgets, metadata={"help": "parity budgets per precision"})
    speed_seconds: float = field(default=1.0, metadata={"help": "timing budget per variant, split between batch-1 "
                                                                "latency and batch throughput"})
    max_exclusion_rounds: int = field(default=3,
                                      metadata={"help": "int8: retries excluding the most sensitive nodes"})
    exhaustive: bool = field(default=False, metadata={
        "help": "gate every variant and run every int8 exclusion search, even for a variant slower than one "
                "that passed (which can never be selected; by default its gate is skipped)"})
    tuning_size: int = field(default=512, metadata={"help": "int8: rows (from validation/train, never the eval set) "
                                                            "used to pick exclusions"})
    seed: int = field(default=0, metadata={"help": "random seed of the calibration and int8 tuning row samples"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer directory, or the base model fine-tuned from (local Hugging Face cache), used when the "
                "checkpoint has no tokenizer (Trainer.save_model without one) or instead of its own"})
    base: Path | None = field(default=None, metadata={
        "help": "PEFT adapter folders: the base checkpoint folder the adapter applies to (default: the adapter's "
                "base_model_name_or_path when that is a local folder)"})
    text_column: str | None = field(default=None, metadata={
        "help": "CSV column holding the text (default: the one finetune train recorded, else 'text')"})
    label_column: str | None = field(default=None, metadata={
        "help": "CSV column holding the label (default: the one finetune train recorded, else 'label')"})
    text_pair_column: str | None = field(default=None, metadata={
        "help": "CSV column holding the second text of a text pair (cross-encoders, NLI); default: none"})
    task: Task = field(default=Task.CLASSIFICATION, metadata={
        "help": "classification: a fine-tuned classifier; embedding: a sentence-transformers directory (or a plain "
                "encoder with --pooling) served as a sentence embedder"})
    model_name: str | None = field(default=None, metadata={
        "help": "served model name (default: classifier / embedder / reranker); the model is added beside the "
                "other models already in --repository (a model of the same name is replaced)"})
    pooling: Pooling | None = field(default=None, metadata={
        "help": "embedding: pooling of a plain encoder (a sentence-transformers directory specifies its own)"})
    normalize: bool | None = field(default=None, metadata={
        "help": "embedding: L2-normalise the pooled vector (default: as the modules say; plain encoder: no)"})
    aggregation: Aggregation = field(default=DEFAULT_AGGREGATION, metadata={
        "help": "token classification: how tokens become entities, as transformers.pipeline's aggregation_strategy "
                "(none, simple, first, average, max); gated and served"})
    threshold: float = field(default=0.5, metadata={
        "help": "multi-label heads: a label is on when its sigmoid probability is >= this (gated and served)"})
    instances: int = field(default=0, metadata={
        "help": "served instances of the model (cpu: 0 = one per usable core of this machine; gpu: 0 = 1)"})
    intra_op_threads: int = field(default=1, metadata={
        "help": "cpu target: ONNX Runtime threads per served instance (the gate and the speed check use 1)"})
    pin_instances: bool = field(default=True, metadata={
        "help": "cpu target: pin each served instance to cores of its own (skipped under a CPU quota or when "
                "instances x threads exceed the server's cores)"})
    max_batch_tokens: int = field(default=DEFAULT_MAX_BATCH_TOKENS, metadata={
        "help": "gpu target: most tokens (rows x longest row, padding included) one encoder call of the served "
                "model computes; the gate runs the same sub-batches"})
    openvino: bool = field(default=True, metadata={  # OpenVINO hook (exporter/openvino.py)
        "help": "cpu target: also build OpenVINO IR variants (ov_fp32 for fp32, ov_int8 for int8), gated, timed "
                "and selectable beside the ONNX Runtime ones"})
    variant: str | None = field(default=None, metadata={
        "help": "serve this variant (e.g. ov_int8) if it passes its gate, instead of the fastest passing one"})
    tensorrt: bool = field(default=False, metadata={
        "help": "gpu target: the served model tries ONNX Runtime's TensorRT provider (fp16) before CUDA"})
    long_text: LongText = field(default=LongText.TRUNCATE, metadata={
        "help": "truncate: a text is truncated at max-length as the checkpoint saves it; chunk: its tokens in "
                "windows, the windows' logits (embeddings: vectors before normalisation) averaged "
                "(docs/LONG_TEXT.md; cpu target)"})
    chunk_overlap: int | None = field(default=None, metadata={
        "help": f"chunk: tokens consecutive windows share, at most half a window (default: {DEFAULT_OVERLAP}, or a "
                "quarter window when that is less)"})
    max_chunks: int = field(default=DEFAULT_MAX_CHUNKS, metadata={
        "help": "chunk: most windows per text, the first ones on the truncation side (a text costs at most "
                "this many encoder rows)"})
    max_request_bytes: int = field(default=4 << 20, metadata={
        "help": "served: most UTF-8 bytes of text in one request (>= 1 MiB; more gets 400); no text is refused "
                "for its length below it"})

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)
        self.tokenizer = str(self.tokenizer) if self.tokenizer is not None else None
        self.base = Path(self.base) if self.base is not None else None
        columns = [c for c in (self.text_column, self.label_column, self.text_pair_column) if c is not None]
        if any(not c.strip() for c in columns) or len(set(columns)) != len(columns):
            raise ExporterError(f"the text, label and text-pair columns must be distinct non-empty names, got {columns}")
        self.out = Path(self.out)
        self.repository = Path(self.repository) if self.repository is not None else None
        self.eval_data = Path(self.eval_data) if self.eval_data is not None else None
        try:
            self.target = Target(self.target)
        except ValueError:
            raise ExporterError(f"unknown target {self.target!r} (known: cpu, gpu)") from None
        self.precisions = parse_precisions(self.precisions)
        if self.max_length is None:
            self.max_length = _default_max_length(self.checkpoint)
        checks = {
            "eval_size": self.eval_size >= 1,
            "calibration_size": self.calibration_size >= 1,
            "keep_versions": self.keep_versions >= 1,
            "max_length": 8 <= self.max_length <= 4096,
            "batch_size": self.batch_size >= 1,
            "speed_seconds": self.speed_seconds > 0,
            "max_exclusion_rounds": self.max_exclusion_rounds >= 0,
            "tuning_size": self.tuning_size >= 1,
            "threshold": 0.0 < self.threshold < 1.0,
            "instances": self.instances >= 0,
            "intra_op_threads": self.intra_op_threads >= 0,
            "max_batch_tokens": self.max_batch_tokens >= self.max_length,
        }
        for name, ok in checks.items():
            if not ok:
                raise ExporterError(f"invalid {name.replace('_', '-')}: {getattr(self, name)}")
        if self.tensorrt and self.target is not Target.GPU:
            raise ExporterError("--tensorrt needs --target gpu")
        self._check_task()
        self._check_long_text()
        if self.repository is not None and self.repository.absolute() == self.out.absolute():
            raise ExporterError("--repository and --out must be different directories")

    def _check_long_text(self) -> None:
        """--long-text, its window options and the request-size cap."""
        try:
            self.long_text = LongText(self.long_text)
        except ValueError:
            raise ExporterError(f"unknown long-text {self.long_text!r} (known: truncate, chunk)") from None
        if self.max_request_bytes < 1 << 20:
            raise ExporterError(f"invalid max-request-bytes: {self.max_request_bytes} (must be >= 1 MiB)")
        if self.long_text is LongText.CHUNK and self.target is not Target.CPU:
            raise ExporterError("--long-text chunk is built for the cpu target (the gpu target truncates)")
        if self.task is Task.EMBEDDING:  # windows of the pipeline's max_seq_length: exporter.embedding_flow
            ChunkConfig(self.chunk_overlap or 0, self.max_chunks)  # the ranges, checked now
            self.chunk = None
            return
        if self.chunk_overlap is None:
            self.chunk_overlap = default_overlap(self.max_length)
        self.chunk = self.chunk_config(self.max_length)
        if self.long_text is LongText.CHUNK:
            self.chunk.check(self.max_length)

    def chunk_config(self, max_length: int) -> ChunkConfig:
        """The windows at ``max_length`` tokens (an embedder's max_seq_length): --chunk-overlap, else the
        default overlap at that length."""
        overlap = default_overlap(max_length) if self.chunk_overlap is None else self.chunk_overlap
        return ChunkConfig(overlap, self.max_chunks)

    def _check_task(self) -> None:
        """The task, the served model name and the embedding-only options agree."""
        try:
            self.task = Task(self.task)
        except ValueError:
            raise ExporterError(f"unknown task {self.task!r} (known: {', '.join(t.value for t in Task)})") from None
        try:
            self.aggregation = Aggregation(self.aggregation)
        except ValueError:
            raise ExporterError(f"unknown aggregation {self.aggregation!r} "
                                f"(known: {', '.join(a.value for a in Aggregation)})") from None
        if self.pooling is not None:
            try:
                self.pooling = Pooling(self.pooling)
            except ValueError:
                raise ExporterError(f"unknown pooling {self.pooling!r} "
                                    f"(known: {', '.join(p.value for p in Pooling)})") from None
        if self.task is not Task.EMBEDDING and (self.pooling is not None or self.normalize is not None):
            raise ExporterError("--pooling and --normalize are for --task embedding")
        if self.model_name is not None:
            try:
                check_model_name(self.model_name)
            except ContractError as exc:
                raise ExporterError(str(exc)) from None
