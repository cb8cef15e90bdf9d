"""Every ``textclf_*`` metric a served model exports, declared in one place (copied beside each ``model.py``
as ``metrics.py``, like textmodel.py; docs/METRICS.md lists them).

The metrics go through the python backend's own API (``pb_utils.MetricFamily``), so they appear on Triton's
metrics port beside ``nv_*``, each with the label ``model``. Every metric operation is a round trip from the
stub to the server process that holds the GIL while it waits (measured here: ~35 us on a quiet machine,
milliseconds when the cores are busy: 7 operations per one-text request made requests 1.6x slower). So the
served path only appends to Python lists, and a daemon thread sends what accumulated every
``FLUSH_INTERVAL_S``: one increment per counter series that moved. The two distributions are classic
Prometheus histograms written as their series (``<name>_bucket{le}`` cumulative, ``<name>_sum``,
``<name>_count``, all counters), so they too cost one operation per moved series per flush instead of one
per text; PromQL (``histogram_quantile``) reads them exactly like a histogram.

Rows of a request count only once the request was answered (:meth:`ModelMetrics.commit`). A model calls,
per row, :meth:`ModelMetrics.observe_row` (real tokens, computed tokens, truncated, windows) and, per
request of a classifier, :meth:`ModelMetrics.observe_predictions` (the labels given and the top-1
probability of each row).
"""
import bisect
import json
import os
import threading
import time

import triton_python_backend_utils as pb_utils

import contract

# top-1 probability: 1/num_labels .. 1; fine steps near 1 where confident models live
CONFIDENCE_BUCKETS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
# real tokens per text, up to long documents (chunked models count every window's tokens)
TOKEN_BUCKETS = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]

FLUSH_INTERVAL_S = 0.5

# name: (kind, description); the single source of the names docs/METRICS.md, the dashboard and the rules use
FAMILIES = {
    "textclf_rows_total": ("COUNTER", "Texts (rows) answered"),
    "textclf_predictions_total": ("COUNTER", "Labels served, per label (multi-label: every label given)"),
    "textclf_confidence_bucket": ("COUNTER", "Histogram of the top-1 probability of each answered text "
                                             "(classifiers): texts with top-1 probability <= le"),
    "textclf_confidence_sum": ("COUNTER", "Histogram of the top-1 probability: sum over the answered texts"),
    "textclf_confidence_count": ("COUNTER", "Histogram of the top-1 probability: answered texts"),
    "textclf_input_tokens_bucket": ("COUNTER", "Histogram of the real tokens per answered text: texts with "
                                               "<= le tokens"),
    "textclf_input_tokens_sum": ("COUNTER", "Histogram of the real tokens per answered text: sum"),
    "textclf_input_tokens_count": ("COUNTER", "Histogram of the real tokens per answered text: texts"),
    "textclf_input_tokens_total": ("COUNTER", "Real tokens of the answered texts, special tokens included"),
    "textclf_computed_tokens_total": ("COUNTER", "Tokens the encoder ran for the answered texts, padding included"),
    "textclf_truncated_rows_total": ("COUNTER", "Answered texts that were longer than max_length tokens"),
    "textclf_windows_total": ("COUNTER", "Encoder windows run for the answered texts (1 per text unless chunked)"),
    "textclf_stage_seconds_total": ("COUNTER", "Seconds the served model spent in each part of its execute calls "
                                               "(stage: execute, decode, answer, tokenize, encoder, flush)"),
    "textclf_baseline_label_share": ("GAUGE", "Share of each label on the build's eval set (from the build)"),
    "textclf_baseline_confidence_mean": ("GAUGE", "Mean top-1 probability on the build's eval set (from the build)"),
}
_COUNTERS = ("textclf_input_tokens_total", "textclf_computed_tokens_total", "textclf_truncated_rows_total",
             "textclf_windows_total")
HISTOGRAMS = {"textclf_input_tokens": TOKEN_BUCKETS, "textclf_confidence": CONFIDENCE_BUCKETS}
# the parts of a model's execute that it times itself (textmodel.RowModel; `loadtest profile` reads them): the
# whole call, decoding TEXT, answer() (tokenize + encoder + head), the tokenizer, the ONNX Runtime session, and
# this module's flush thread (its metric operations hold the GIL the execute thread needs)
STAGES = ("execute", "decode", "answer", "tokenize", "encoder", "flush")


def _le(bound):
    """The ``le`` label of a bucket bound, as Prometheus clients write it (``16.0``, ``0.95``, ``+Inf``)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


def bucket_counts(values, bounds):
    """Cumulative counts of ``values`` per bound of ``bounds`` plus +Inf (a classic histogram's buckets)."""
    counts = [0] * (len(bounds) + 1)
    for v in values:
        counts[bisect.bisect_left(bounds, v)] += 1
    running, out = 0, []
    for c in counts:
        running += c
        out.append(running)
    return out


def series_labels(model_name, version=""):
    """The labels every series of this stub carries: ``model``, ``version`` (the model version it serves) and
    ``stub`` (this stub's pid), so that no two instances ever share a series.

    Why ``stub`` (docs/RELIABILITY.md, "A model's second load"): Triton 2.51 merges the series of every
    instance that declares the same name and labels into one object, but counts its references per
    MetricFamily, i.e. per instance. When the instances a load replaces drop their metrics at unload, the
    shared series is freed while the new instances still increment it: heap corruption, and tritonserver
    crashes or hangs (seen as a second version load that never ends). Sum over ``stub`` in PromQL."""
    return {"model": model_name, "version": str(version), "stub": str(os.getpid())}


def _family(name):
    kind, description = FAMILIES[name]
    return pb_utils.MetricFamily(name=name, description=description, kind=getattr(pb_utils.MetricFamily, kind))


def parse_baseline(value):
    """The baseline a config parameter carries (JSON: ``label_share`` {label: share}, ``confidence_mean``);
    None when absent or unreadable (metrics never stop a model from loading)."""
    if not value:
        return None
    try:
        baseline = json.loads(value)
        return baseline if isinstance(baseline, dict) else None
    except ValueError:
        return None


class ModelMetrics:
    """The metrics of one instance of a served model (labels: :func:`series_labels`): observations buffered
    in Python, sent by a daemon thread every ``FLUSH_INTERVAL_S``.

    ``head`` is a :class:`contract.Head`; classifiers (single- and multi-label) also get a prediction
    counter per label and the confidence histogram; ``baseline`` (:func:`parse_baseline`) sets the baseline
    gauges. ``enabled=False`` declares nothing and ignores every call."""

    def __init__(self, model_name, head, labels=(), baseline=None, enabled=True, version=""):
        self.enabled = enabled
        self.classifier = contract.Head(head) in (contract.Head.SINGLE_LABEL, contract.Head.MULTI_LABEL)
        self._families, self._metrics = {}, {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self.discard()
        if not enabled:
            return
        model = series_labels(model_name, version)
        for name in ("textclf_rows_total", *_COUNTERS):
            self._metric(name, model)
        self._histogram("textclf_input_tokens", model)
        for stage in STAGES:
            self._metric("textclf_stage_seconds_total", {**model, "stage": stage}, key=stage)
        if self.classifier:
            self._histogram("textclf_confidence", model)
            for label in labels:
                self._metric("textclf_predictions_total", {**model, "label": label}, key=label)
        if baseline and self.classifier:
            self._set_baseline(model, labels, baseline)
        self._thread = threading.Thread(target=self._flush_every, name="textclf-metrics", daemon=True)
        self._thread.start()

    def _histogram(self, name, model):
        for bound in [*HISTOGRAMS[name], float("inf")]:
            self._metric(f"{name}_bucket", {**model, "le": _le(bound)}, key=_le(bound))
        self._metric(f"{name}_sum", model)
        self._metric(f"{name}_count", model)

    def _metric(self, name, labels, key=None):
        if name not in self._families:
            self._families[name] = _family(name)
        metric = self._families[name].Metric(labels=labels)
        self._metrics[name if key is None else (name, key)] = metric
        return metric

    def _set_baseline(self, model, labels, baseline):
        shares = baseline.get("label_share") or {}
        for label in labels:
            if label in shares:
                self._metric("textclf_baseline_label_share", {**model, "label": label}, key=label).set(
                    float(shares[label]))
        if baseline.get("confidence_mean") is not None:
            self._metric("textclf_baseline_confidence_mean", model).set(float(baseline["confidence_mean"]))

    # -- observations (pure Python: buffered) ----------------------------------------------------------
    def observe_row(self, tokens, computed_tokens=None, truncated=False, windows=1):
        """One text run by the encoder: its real tokens, the tokens computed for it (padding included;
        default: the real ones), whether it was truncated, and the windows it took."""
        self._rows.append((int(tokens), int(tokens if computed_tokens is None else computed_tokens),
                           bool(truncated), int(windows)))

    def observe_rows(self, token_counts, computed_tokens=None, truncated=None, windows=None):
        """:meth:`observe_row` for several texts (per-row sequences; None: the defaults)."""
        n = len(token_counts)
        for i in range(n):
            self.observe_row(token_counts[i], None if computed_tokens is None else computed_tokens[i],
                             False if truncated is None else truncated[i], 1 if windows is None else windows[i])

    def observe_predictions(self, given, confidences):
        """The labels served for each text (a label, or a sequence of labels for multi-label) and the top-1
        probability of each."""
        for labels in given:
            for label in ([labels] if isinstance(labels, str) else labels):
                self._labels[label] = self._labels.get(label, 0) + 1
        self._confidences.extend(float(c) for c in confidences)

    def commit(self):
        """The request whose rows were observed was answered: keep them for the next flush."""
        with self._lock:
            self._committed_rows.extend(self._rows)
            self._committed_labels.append(self._labels)
            self._committed_confidences.extend(self._confidences)
        self._rows, self._labels, self._confidences = [], {}, []

    def add_stage_ns(self, stage_ns):
        """Add ``{stage: nanoseconds}`` (STAGES) of an execute call; sent with the next flush, warm-up included."""
        with self._lock:
            for stage, ns in stage_ns.items():
                self._stage_ns[stage] = self._stage_ns.get(stage, 0) + ns

    def discard(self):
        """Forget every observation not flushed yet."""
        with self._lock:
            self._committed_rows, self._committed_labels, self._committed_confidences = [], [], []
            self._stage_ns = {}
        self._rows, self._labels, self._confidences = [], {}, []

    def rollback(self):
        """Forget the observations of the request in progress (it failed)."""
        self._rows, self._labels, self._confidences = [], {}, []

    # -- metric operations: on the flush thread, one per moved series ---------------------------------
    def _take(self):
        with self._lock:
            taken = self._committed_rows, self._committed_labels, self._committed_confidences
            self._committed_rows, self._committed_labels, self._committed_confidences = [], [], []
            stages, self._stage_ns = self._stage_ns, {}
        return taken, stages

    def flush(self):
        """Send the committed observations to the server (the flush thread calls this every
        ``FLUSH_INTERVAL_S``; finalize once more). The flush's own time is the next flush's ``flush`` stage."""
        t0 = time.perf_counter_ns()
        if self._send():
            self.add_stage_ns({"flush": time.perf_counter_ns() - t0})

    def _send(self):
        """One increment per series that moved; True when rows were sent."""
        (rows, label_counts, confidences), stages = self._take()
        if not self.enabled or not (rows or any(stages.values())):
            return False
        m = self._metrics
        for stage, ns in stages.items():
            if ns and ("textclf_stage_seconds_total", stage) in m:
                m[("textclf_stage_seconds_total", stage)].increment(ns / 1e9)
        if not rows:  # only stage time (the flush's own): not timed again, so an idle model goes quiet
            return False
        m["textclf_rows_total"].increment(len(rows))
        for name, total in zip(_COUNTERS, [sum(r[i] for r in rows) for i in range(4)]):
            if total:
                m[name].increment(total)
        labels = {}
        for counts in label_counts:
            for label, n in counts.items():
                labels[label] = labels.get(label, 0) + n
        for label, n in labels.items():
            if ("textclf_predictions_total", label) in m:
                m[("textclf_predictions_total", label)].increment(n)
        self._send_histogram("textclf_input_tokens", [r[0] for r in rows])
        if self.classifier:
            self._send_histogram("textclf_confidence", confidences)
        return True

    def _send_histogram(self, name, values):
        if not values:
            return
        bounds = HISTOGRAMS[name]
        for bound, count in zip([*bounds, float("inf")], bucket_counts(values, bounds)):
            if count:
                self._metrics[(f"{name}_bucket", _le(bound))].increment(count)
        self._metrics[f"{name}_sum"].increment(float(sum(values)))
        self._metrics[f"{name}_count"].increment(len(values))

    def _flush_every(self):
        while not self._stop.wait(FLUSH_INTERVAL_S):
            try:
                self.flush()
            except Exception as exc:  # noqa: BLE001 - a metric failure must never take the model down
                pb_utils.Logger.log_warn(f"textclf metrics: flush failed: {exc}")

    def close(self):
        """Stop the flush thread, send what is left, then drop the metrics before their families (the
        backend requires that order)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self.flush()
        self._metrics.clear()
        self._families.clear()
