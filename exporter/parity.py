"""Stage 5: the parity gate. Every variant is compared with the PyTorch checkpoint on real text, run as
the target serves it: on the CPU target each row alone, trimmed to its own length, in a session with one
intra-op thread (``GateMode.PER_ROW``); on the GPU target in the served model's token-budget sub-batches
(``GateMode.BATCHED``: each window of ``--batch-size`` rows sorted by length and cut as the server cuts the
rows of one execute call, each sub-batch padded to its own longest row; serving.models.token_batch)."""
from __future__ import annotations

import collections
import itertools
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from exporter.artifacts import GateMode, ParityResult
from exporter.choices import Precision
from exporter.chunking import activation, average_rows
from exporter.config import Budgets
from exporter.progress import track
from serving.contract import DEFAULT_MULTI_LABEL_THRESHOLD, ENCODER_INPUTS, ENCODER_LOGITS, ENCODER_PROBABILITIES, Head
from serving.models import runtime, token_batch

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
ROWS = "_rows"  # a sub-batch's row positions in the evaluation set (sub-batches run rows out of order)


def tokenize(tokenizer, texts: Sequence[str], *, batch_size: int, max_length: int,
             pairs: Sequence[str] | None = None) -> list[Batch]:
    """Batches of int64 ``input_ids``/``attention_mask``/``token_type_ids``, each padded to its longest row
    (text pairs encoded as the tokenizer encodes pairs: both texts, their token types)."""
    input_ids, attention_mask, token_type_ids = ENCODER_INPUTS
    batches = []
    for start in range(0, len(texts), batch_size):
        second = None if pairs is None else list(pairs[start:start + batch_size])
        enc = tokenizer(list(texts[start:start + batch_size]), second, padding="longest", truncation=True,
                        max_length=max_length, return_tensors="np")
        ids = enc[input_ids].astype(np.int64)
        types = enc[token_type_ids].astype(np.int64) if token_type_ids in enc else np.zeros_like(ids)
        batches.append({input_ids: ids, attention_mask: enc[attention_mask].astype(np.int64), token_type_ids: types})
    return batches


def unbatch(batches: list[Batch]) -> list[Batch]:
    """Every row as a batch of its own, cut to its real length: how a request is run when it is served alone."""
    rows = []
    for batch in batches:
        for i, length in enumerate(batch[ENCODER_INPUTS[1]].sum(1)):
            rows.append({name: value[i:i + 1, :int(length)] for name, value in batch.items()})
    return rows


def load_torch_model(checkpoint: Path):
    """The checkpoint as an eval-mode PyTorch sequence classifier."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()


def torch_logits(model, batches: list[Batch], description: str = "") -> np.ndarray:
    """Reference logits from PyTorch (fp32), in the rows' order. Right-padded batches are run as
    :func:`by_length` regroups them (the same rows, fewer pad tokens: with the attention mask a row's logits
    do not depend on its padding); a progress bar named ``description`` when one is given."""
    import torch

    names = set(model.forward.__code__.co_varnames)
    batches = by_length(batches)
    out = []
    with torch.inference_mode():
        for batch in track(batches, description, total=len(batches)) if description else batches:
            feed = {k: torch.from_numpy(v) for k, v in batch.items() if k in names}
            out.append(model(**feed).logits.float().numpy())
    return _in_order(batches, out)


def right_padded(batch: Batch) -> bool:
    """Whether every row's real tokens come first (what :func:`unbatch` assumes)."""
    mask = batch[ENCODER_INPUTS[1]]
    return bool((mask == (np.arange(mask.shape[1]) < mask.sum(1, keepdims=True))).all())


def by_length(batches: list[Batch]) -> list[Batch]:
    """The rows of right-padded ``batches`` sorted by length and cut into batches of the same size, each
    padded to its own longest row (``ROWS``: the rows' positions); ``batches`` as they are otherwise
    (already carrying ``ROWS``, left-padded, or of one row each)."""
    if not batches or ROWS in batches[0] or max(len(b[ENCODER_INPUTS[0]]) for b in batches) == 1 \
            or not all(right_padded(b) for b in batches):
        return batches
    size = max(len(b[ENCODER_INPUTS[0]]) for b in batches)
    pad_ids = [int(p[0]) for b in batches if (p := b[ENCODER_INPUTS[0]][b[ENCODER_INPUTS[1]] == 0]).size]
    rows = [{name: value[0] for name, value in row.items()} for row in unbatch(batches)]
    order = np.argsort([len(r[ENCODER_INPUTS[0]]) for r in rows], kind="stable")
    return [{**token_batch.pad([rows[i] for i in group], pad_ids[0] if pad_ids else 0), ROWS: group}
            for group in (order[start:start + size] for start in range(0, len(rows), size))]


def providers_for(precision: Precision) -> list[str]:
    """fp16 runs on CUDA when onnxruntime-gpu is installed; everything else (and CI) on the CPU."""
    import onnxruntime as ort

    if precision is Precision.FP16 and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def gate_threads(mode: GateMode) -> int:
    """Intra-op threads of the sessions that judge a variant: 1 per row as the CPU server runs, else all."""
    return 1 if mode is GateMode.PER_ROW else 0


def session(path: Path, precision: Precision, *, threads: int = 0, arena: bool = True):
    """An ONNX Runtime session without spinning threads or the served session's disabled fusions
    (``runtime.DISABLED_OPTIMIZERS``); ``arena=False`` for sessions that only judge (the CPU arena keeps the
    peak of the largest batch for the session's lifetime)."""
    import onnxruntime as ort

    if runtime.ir_beside(path):  # OpenVINO hook: an OpenVINO variant's directory runs its IR
        return runtime.open_session(path, threads)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Spinning worker threads steal the cores they wait for on a shared machine: measured here on MiniLM,
    # batch 32 under load, no spinning ran 29-32 vs 20-25 seq/s (fp32) and 59-62 vs 41-46 (int8).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = arena
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers_for(precision),
                                disabled_optimizers=runtime.DISABLED_OPTIMIZERS)


def sub_batches(batches: list[Batch], max_batch_tokens: int = token_batch.DEFAULT_MAX_BATCH_TOKENS,
                overhead_tokens: int = token_batch.DEFAULT_OVERHEAD_TOKENS) -> list[Batch]:
    """The GPU server's sub-batches of each (right-padded) batch: its rows sorted by length and cut by
    ``token_batch.plan``, each padded to its own longest row; ``ROWS`` holds their positions in the set."""
    input_ids, attention_mask = ENCODER_INPUTS[:2]
    out, offset = [], 0
    for batch in batches:
        padding = batch[input_ids][batch[attention_mask] == 0]
        pad_id = int(padding[0]) if padding.size else 0
        rows = [{name: value[0] for name, value in row.items()} for row in unbatch([batch])]
        for group in token_batch.plan([len(r[input_ids]) for r in rows], max_batch_tokens, overhead_tokens):
            out.append({**token_batch.pad([rows[i] for i in group], pad_id), ROWS: offset + group})
        offset += len(rows)
    return out


def gate_feeds(batches: list[Batch], mode: GateMode,
               max_batch_tokens: int = token_batch.DEFAULT_MAX_BATCH_TOKENS) -> list[Batch]:
    """What the gate runs: every row alone and unpadded (per_row) or the served sub-batches (batched)."""
    return unbatch(batches) if mode is GateMode.PER_ROW else sub_batches(batches, max_batch_tokens)


def _in_order(batches: list[Batch], outputs: list[np.ndarray]) -> np.ndarray:
    """Concatenated per-batch outputs, put back in the set's row order when the batches carry ``ROWS``."""
    joined = np.concatenate(outputs)
    if not batches or ROWS not in batches[0]:
        return joined
    ordered = np.empty_like(joined)
    ordered[np.concatenate([b[ROWS] for b in batches])] = joined
    return ordered


def _run(sess, names: set[str], batch: Batch):
    """(logits, probabilities) of one batch; a graph without ``probabilities`` (regression) gives the logits."""
    outputs = [o.name for o in sess.get_outputs()] if hasattr(sess, "get_outputs") else [ENCODER_PROBABILITIES]
    if ENCODER_PROBABILITIES not in outputs:
        logits = sess.run([ENCODER_LOGITS], {k: v for k, v in batch.items() if k in names})[0]
        return logits, logits
    return sess.run([ENCODER_LOGITS, ENCODER_PROBABILITIES], {k: v for k, v in batch.items() if k in names})


def concurrent_runs(sess) -> int:
    """How many ``run`` calls :func:`outputs` overlaps on ``sess``: one per core this process may use for an
    ONNX Runtime session of one intra-op thread (its ``run`` is thread-safe and releases the GIL; each row
    still runs alone on one thread, so its answer is the one it gets alone), else 1 (an OpenVINO session
    has one infer request; a many-thread session already uses every core)."""
    import onnxruntime as ort

    if not isinstance(sess, ort.InferenceSession) or sess.get_session_options().intra_op_num_threads != 1:
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def outputs(sess, batches: Sequence[Batch]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(logits, probabilities) of each batch in turn (:func:`_run`), up to :func:`concurrent_runs` batches
    running at once, at most twice that many computed ahead of what the caller took (it may stop early)."""
    names = {i.name for i in sess.get_inputs()}
    workers = concurrent_runs(sess)
    if workers == 1:
        yield from (_run(sess, names, batch) for batch in batches)
        return
    items = iter(batches)
    with ThreadPoolExecutor(workers, thread_name_prefix="parity-row") as pool:
        pending = collections.deque(pool.submit(_run, sess, names, b) for b in itertools.islice(items, 2 * workers))
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(_run, sess, names, b) for b in itertools.islice(items, 1))
            yield result


def ort_outputs(sess, batches: list[Batch], description: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) of an ONNX Runtime session over the batches."""
    logits, probs = [], []
    results = outputs(sess, batches)
    for lo, pr in track(results, description or "parity", total=len(batches)) if description else results:
        logits.append(lo.astype(np.float32))
        probs.append(pr.astype(np.float32))
    return _in_order(batches, logits), _in_order(batches, probs)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -80.0, 80.0)))


def task_metrics(pred: np.ndarray, labels: np.ndarray, num_labels: int,
                 head: Head = Head.SINGLE_LABEL) -> dict:
    """The task metrics of predictions: class ids (single-label), 0/1 rows (multi-label: subset accuracy,
    macro-F1 over labels, micro-F1) or values (regression: MAE, Pearson; no accuracy)."""
    from sklearn.metrics import f1_score

    if head is Head.REGRESSION:
        pred, labels = pred.reshape(-1).astype(np.float64), labels.reshape(-1).astype(np.float64)
        finite = np.isfinite(pred)
        mae = float(np.abs(np.where(finite, pred, np.inf) - labels).mean())
        ok = finite.all() and pred.std() > 0 and labels.std() > 0
        return {"accuracy": None, "macro_f1": None, "mae": mae if np.isfinite(mae) else None,
                "pearson": float(np.corrcoef(pred, labels)[0, 1]) if ok else None}
    if head is Head.MULTI_LABEL:
        pred, labels = pred.astype(np.int64), labels.astype(np.int64)
        return {"accuracy": float((pred == labels).all(1).mean()),
                "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
                "micro_f1": float(f1_score(labels, pred, average="micro", zero_division=0))}
    return {
        "accuracy": float((pred == labels).mean()),
        "macro_f1": float(f1_score(labels, pred, average="macro", labels=list(range(num_labels)), zero_division=0)),
    }


def predictions(logits: np.ndarray, head: Head = Head.SINGLE_LABEL,
                threshold: float = DEFAULT_MULTI_LABEL_THRESHOLD) -> np.ndarray:
    """What a head serves from logits: argmax ids, 0/1 per label (sigmoid >= threshold), or the value.
    Non-finite rows predict -1 (never equal to a reference)."""
    finite = np.isfinite(logits).all(1)
    if head is Head.REGRESSION:
        return logits[:, 0]
    if head is Head.MULTI_LABEL:
        return np.where(finite[:, None], _sigmoid(np.nan_to_num(logits)) >= threshold, -1).astype(np.int64)
    return np.where(finite, np.nan_to_num(logits, nan=-np.inf).argmax(1), -1)


def disagreements(logits: np.ndarray, ref_logits: np.ndarray, head: Head = Head.SINGLE_LABEL,
                  threshold: float = DEFAULT_MULTI_LABEL_THRESHOLD) -> np.ndarray:
    """Per decision, whether the variant decides otherwise than the reference: one per row (single-label;
    regression: off by more than 1% of the reference predictions' spread) or one per row and label."""
    pred, ref = predictions(logits, head, threshold), predictions(ref_logits, head, threshold)
    if head is Head.REGRESSION:
        spread = max(float(np.std(ref_logits[:, 0])) if len(ref_logits) > 1 else 0.0, 1e-6)
        return ~(np.abs(pred - ref) <= 0.01 * spread)
    return pred != ref


@dataclass
class Reference:
    """PyTorch's answers on the evaluation set (labels: ids, multi-hot rows or values, per head)."""

    logits: np.ndarray
    labels: np.ndarray
    head: Head = Head.SINGLE_LABEL
    threshold: float = DEFAULT_MULTI_LABEL_THRESHOLD

    @property
    def metrics(self) -> dict:
        pred = predictions(self.logits, self.head, self.threshold)
        return {**task_metrics(pred, self.labels, self.logits.shape[1], self.head), "n_examples": len(self.labels)}


def serving_baseline(ref: Reference, labels: Sequence[str]) -> dict | None:
    """What the served model should look like on live traffic like the eval rows: the share of rows given
    each label (multi-label: rows given it, so shares can sum past 1) and the mean top-1 probability,
    from the reference's predictions. The server exports it as gauges (textclf_baseline_*) that the alert
    rules compare the live label mix and confidence with. None for regression (no labels)."""
    if ref.head not in (Head.SINGLE_LABEL, Head.MULTI_LABEL) or not len(ref.logits):
        return None
    logits = np.nan_to_num(ref.logits.astype(np.float64))
    if ref.head is Head.MULTI_LABEL:
        probs = _sigmoid(logits)
        given = probs >= ref.threshold
    else:
        exp = np.exp(logits - logits.max(1, keepdims=True))
        probs = exp / exp.sum(1, keepdims=True)
        given = np.eye(len(labels), dtype=bool)[probs.argmax(1)]
    shares = given.mean(0)
    return {"label_share": {str(label): round(float(x), 6) for label, x in zip(labels, shares)},
            "confidence_mean": round(float(probs.max(1).mean()), 6), "rows": int(len(logits)),
            "source": "pytorch reference on the eval rows"}


def compare(precision: Precision, ref: Reference, logits: np.ndarray, probs: np.ndarray, budgets: Budgets,
            mode: GateMode = GateMode.BATCHED) -> ParityResult:
    """Parity record of one variant against the reference, with its verdict and the reason for it.

    ``max_rel_diff`` is, per row, the largest absolute logit difference over the row's largest absolute
    reference logit, maximised over rows (elementwise ratios explode on logits near zero). The agreement
    and the task metrics are the head's (see :func:`disagreements`, :func:`task_metrics`).
    """
    diff = np.abs(np.where(np.isfinite(logits), logits, np.inf) - ref.logits)
    scale = np.maximum(np.abs(ref.logits).max(1), 1e-6)
    metrics, ref_metrics = task_metrics(predictions(logits, ref.head, ref.threshold), ref.labels,
                                        ref.logits.shape[1], ref.head), ref.metrics
    if ref.head is Head.SINGLE_LABEL:
        exp = np.exp(ref.logits - ref.logits.max(1, keepdims=True))
        ref_probs = exp / exp.sum(1, keepdims=True)
    else:  # multi-label: sigmoid; regression: the value itself
        ref_probs = _sigmoid(ref.logits) if ref.head is Head.MULTI_LABEL else ref.logits
    agreement = float(1.0 - disagreements(logits, ref.logits, ref.head, ref.threshold).mean())
    record = ParityResult(
        n_examples=int(len(ref.labels)), passed=False, reason="", label_agreement=agreement, gate_mode=mode,
        max_abs_diff=_num(diff.max()), mean_abs_diff=_num(diff.mean()), max_rel_diff=_num((diff.max(1) / scale).max()),
        max_prob_diff=_num(np.abs(np.where(np.isfinite(probs), probs, np.inf) - ref_probs).max()),
        accuracy=metrics["accuracy"], accuracy_drop_pts=_drop(ref_metrics["accuracy"], metrics["accuracy"]),
        macro_f1=metrics["macro_f1"], macro_f1_drop_pts=_drop(ref_metrics["macro_f1"], metrics["macro_f1"]),
        nan_inf=int((~np.isfinite(logits)).sum() + (~np.isfinite(probs)).sum()),
        budget=budget_for(precision, budgets),
        label_agreement_batch1=agreement if mode is GateMode.PER_ROW else None,
        head=ref.head.value, mae=metrics.get("mae"), pearson=metrics.get("pearson"),
    )
    if ref.head is Head.REGRESSION:
        spread = max(float(np.std(ref.labels)), 1e-6)
        record.mae_increase_pts = (None if metrics["mae"] is None or ref_metrics["mae"] is None
                                   else round((metrics["mae"] - ref_metrics["mae"]) / spread * 100, 4))
    return judge(precision, record, budgets)


def _drop(ref: float | None, got: float | None) -> float | None:
    return None if ref is None or got is None else round((ref - got) * 100, 4)


def judge(precision: Precision, record: ParityResult, budgets: Budgets) -> ParityResult:
    """Set ``passed``/``reason`` from the budgets (after any field of the record changed)."""
    failures = gate_failures(precision, record, budgets)
    record.passed = not failures
    record.reason = "; ".join(failures) if failures else "within budget"
    return record


def budget_for(precision: Precision, budgets: Budgets) -> dict:
    if precision is Precision.FP32:
        return {"max_abs_diff": budgets.fp32_max_abs, "min_label_agreement": budgets.fp32_min_agreement}
    if precision is Precision.FP16:
        return {"max_abs_diff": budgets.fp16_max_abs, "min_label_agreement": budgets.fp16_min_agreement}
    return {"max_accuracy_drop_pts": budgets.int8_max_accuracy_drop, "min_label_agreement": budgets.int8_min_agreement}


def gate_failures(precision: Precision, record: ParityResult, budgets: Budgets) -> list[str]:
    """Human-readable reasons a parity record leaves its budget (empty when it passes)."""
    failures = []
    if record.nan_inf:
        failures.append(f"{record.nan_inf} NaN/Inf outputs")
    budget = budget_for(precision, budgets)
    if "max_abs_diff" in budget and not _within(record.max_abs_diff, budget["max_abs_diff"]):
        failures.append(f"max abs logit diff {_fmt(record.max_abs_diff)} > {budget['max_abs_diff']:.3g}")
    # Regression has no labels to agree on: its agreement (rows within 1% of the reference spread) is recorded,
    # and the gate is the max abs difference (fp32/fp16) and the MAE increase (int8).
    regression = record.head == Head.REGRESSION.value
    if not regression and record.label_agreement < budget["min_label_agreement"]:
        failures.append(f"label agreement {record.label_agreement:.2%} < {budget['min_label_agreement']:.2%}")
    alone = None if regression else record.label_agreement_batch1
    if record.gate_mode is GateMode.BATCHED and alone is not None and alone < budget["min_label_agreement"]:
        failures.append(f"label agreement one row at a time {alone:.2%} < {budget['min_label_agreement']:.2%}")
    drop = budget.get("max_accuracy_drop_pts")
    if drop is not None and record.head == Head.REGRESSION.value:
        if not _within(record.mae_increase_pts, drop):
            failures.append(f"MAE increase {_fmt(record.mae_increase_pts)} pts of the targets' spread > {drop:.2f}")
    elif drop is not None and not _within(record.accuracy_drop_pts, drop):
        failures.append(f"accuracy drop {_fmt(record.accuracy_drop_pts)} pts > {drop:.2f}")
    return failures


def tuning_check(sess, batches: list[Batch], ref: Reference, budgets: Budgets,
                 mode: GateMode = GateMode.BATCHED) -> ParityResult:
    """The int8 gate on tuning rows (``batches`` as the gate runs them), stopping as soon as the label
    flips exceed what the budget allows on all rows; otherwise the full :func:`compare` record."""
    width = ref.logits.shape[1] if ref.head is Head.MULTI_LABEL else 1  # decisions per row
    allowed = math.floor((1.0 - budgets.int8_min_agreement) * len(ref.labels) * width + 1e-9)
    logits, probs, flips, start = [], [], 0, 0
    for batch, (lo, pr) in track(zip(batches, outputs(sess, batches)), "int8 tuning rows", total=len(batches)):
        end = start + len(lo)
        rows = batch[ROWS] if ROWS in batch else slice(start, end)
        flips += int(disagreements(lo.astype(np.float32), ref.logits[rows], ref.head, ref.threshold).sum())
        logits.append(lo.astype(np.float32))
        probs.append(pr.astype(np.float32))
        start = end
        if flips > allowed and end < len(ref.labels) and ref.head is not Head.REGRESSION:
            return ParityResult(n_examples=end, passed=False, label_agreement=1.0 - flips / (end * width),
                                gate_mode=mode,
                                early_stop=True, head=ref.head.value,
                                reason=f"{flips} label flips in the first {end} rows > {allowed} allowed on "
                                       f"{len(ref.labels)}")
    return compare(Precision.INT8, ref, _in_order(batches, logits), _in_order(batches, probs), budgets, mode)


def check_variant(path: Path, precision: Precision, ref: Reference, batches: list[Batch], budgets: Budgets,
                  mode: GateMode = GateMode.BATCHED,
                  max_batch_tokens: int = token_batch.DEFAULT_MAX_BATCH_TOKENS) -> ParityResult:
    """Run ``path`` on the evaluation rows as the target serves them and return its parity record.

    per_row: each row alone, unpadded, one intra-op thread (the CPU server). batched: the GPU server's
    token-budget sub-batches (:func:`sub_batches`);
    int8 is then also run one row at a time (``label_agreement_batch1``, same budget), because dynamic
    quantization picks one activation scale per batch tensor.
    """
    sess = session(path, precision, threads=gate_threads(mode), arena=False)
    logits, probs = ort_outputs(sess, gate_feeds(batches, mode, max_batch_tokens),
                                f"parity {Path(path).parent.name or path}")
    record = compare(precision, ref, logits, probs, budgets, mode)
    if mode is GateMode.BATCHED and precision is Precision.INT8 and not record.nan_inf:
        alone = ort_outputs(sess, unbatch(batches))[0]
        record.label_agreement_batch1 = float(1.0 - disagreements(alone, ref.logits, ref.head, ref.threshold).mean())
        judge(precision, record, budgets)
    log.info("parity %s (%s): max|d|=%s agreement=%.4f acc=%s drop=%s pts nan/inf=%d -> %s", path, mode.value,
             record.max_abs_diff, record.label_agreement, record.accuracy, record.accuracy_drop_pts, record.nan_inf,
             "pass" if record.passed else record.reason)
    return record


def check_chunked(path: Path, precision: Precision, ref: Reference, windows: list[Batch], counts: list[int],
                  budgets: Budgets) -> ParityResult:
    """A chunked variant (--long-text chunk) as the CPU target serves it: every window alone, one thread,
    the windows' logits averaged per row, then the head's activation; judged against ``ref`` (PyTorch on the
    same windows, averaged: exporter/chunking.py)."""
    sess = session(path, precision, threads=1, arena=False)
    logits = average_rows(ort_outputs(sess, windows, f"chunked parity {Path(path).parent.name or path}")[0], counts)
    record = compare(precision, ref, logits, activation(logits, ref.head), budgets, GateMode.PER_ROW)
    log.info("chunked parity %s: %d windows, max|d|=%s agreement=%.4f -> %s", path, len(windows),
             record.max_abs_diff, record.label_agreement, "pass" if record.passed else record.reason)
    return record


def _within(value: float | None, limit: float) -> bool:
    return value is not None and value <= limit


def _fmt(value: float | None) -> str:
    return "inf" if value is None else f"{value:.3g}"


def _num(value) -> float | None:
    """JSON-safe float (NaN/Inf become None)."""
    value = float(value)
    return value if math.isfinite(value) else None
