"""Token-budget batching of the GPU target (copied beside its ``model.py``; the exporter's gate imports it
from ``serving.models`` so that it measures the model the way the server runs it). numpy only.

Rows of every request of one ``execute`` call are sorted by length and cut into contiguous sub-batches;
each sub-batch is padded only to its own longest row. The cut minimises the tokens the encoder computes
(rows x longest row, padding included) plus ``overhead_tokens`` per sub-batch (the fixed cost of one
encoder call, in tokens), with every sub-batch's computed tokens at most ``max_batch_tokens`` (a row longer
than the budget runs alone). Sorting by length and cutting contiguous runs is optimal for that cost: a
dynamic programme over the sorted rows finds the best cut. :func:`providers` picks the model's ONNX Runtime
execution providers (TensorRT when asked, CUDA, then the CPU provider that stands in where no GPU is present).
"""
import re
from dataclasses import dataclass, field

import numpy as np

DEFAULT_MAX_BATCH_TOKENS = 16384  # text-embeddings-inference's --max-batch-tokens default
DEFAULT_OVERHEAD_TOKENS = 64  # what one more encoder call is worth in padded tokens (docs/SERVING.md)


@dataclass
class BatchRecord:
    """What one ``execute`` call computed: rows, sub-batches, real tokens, tokens run (padding included)."""

    rows: int = 0
    sub_batches: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0
    # tokens computed for each row of the call (its sub-batch's longest row), in the rows' order; not summed
    row_computed: list = field(default_factory=list, repr=False, compare=False)

    def add(self, other: "BatchRecord") -> None:
        self.rows += other.rows
        self.sub_batches += other.sub_batches
        self.real_tokens += other.real_tokens
        self.computed_tokens += other.computed_tokens

    @property
    def ratio(self) -> float:
        """Computed / real tokens (1.0: no padding)."""
        return self.computed_tokens / self.real_tokens if self.real_tokens else 1.0

    def line(self) -> str:
        """The one-line log form that :func:`parse_records` reads back."""
        return (f"token_batch rows={self.rows} sub_batches={self.sub_batches} real_tokens={self.real_tokens} "
                f"computed_tokens={self.computed_tokens}")


_RECORD = re.compile(r"token_batch rows=(\d+) sub_batches=(\d+) real_tokens=(\d+) computed_tokens=(\d+)")


def parse_records(log_text: str) -> BatchRecord:
    """The sum of every ``token_batch`` record in a server log."""
    total = BatchRecord()
    for match in _RECORD.finditer(log_text):
        total.add(BatchRecord(*(int(v) for v in match.groups())))
    return total


def plan(lengths, max_batch_tokens=DEFAULT_MAX_BATCH_TOKENS, overhead_tokens=DEFAULT_OVERHEAD_TOKENS):
    """Sub-batches (arrays of row indices, shortest rows first) of rows with these token lengths."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    n = len(lengths)
    if n == 0:
        return []
    order = np.argsort(lengths, kind="stable")
    sorted_len = np.maximum(lengths[order], 1)
    best = np.zeros(n + 1)  # best[j]: least cost of the first j sorted rows
    start = np.zeros(n + 1, dtype=np.int64)  # where the last sub-batch of that best cut starts
    for j in range(1, n + 1):
        longest = int(sorted_len[j - 1])
        first = max(0, j - max(1, max_batch_tokens // longest))  # sub-batches fit the budget
        sizes = j - np.arange(first, j)
        cost = best[first:j] + sizes * longest + overhead_tokens
        k = int(np.argmin(cost))
        best[j], start[j] = cost[k], first + k
    cuts, j = [], n
    while j > 0:
        cuts.append((int(start[j]), j))
        j = int(start[j])
    return [order[a:b] for a, b in reversed(cuts)]


def pad(rows, pad_id):
    """One sub-batch: per-row ``{name: token list}`` dicts -> ``{name: int64 [rows, longest]}``, padded with
    ``pad_id`` (input_ids) or 0 (attention_mask, token_type_ids) on the right, whatever the tokenizer's
    padding side: with the attention mask a right-padded row keeps its positions, so it computes what it
    computes alone (left padding would shift the absolute positions of a shorter row)."""
    longest = max(len(r["input_ids"]) for r in rows)
    out = {}
    for name in rows[0]:
        fill = pad_id if name == "input_ids" else 0
        arr = np.full((len(rows), longest), fill, dtype=np.int64)
        for i, row in enumerate(rows):
            arr[i, :len(row[name])] = row[name]
        out[name] = arr
    return out


def run_rows(run, rows, pad_id, *, max_batch_tokens=DEFAULT_MAX_BATCH_TOKENS,
             overhead_tokens=DEFAULT_OVERHEAD_TOKENS):
    """Run ``rows`` (per-row token dicts) in planned sub-batches through ``run(feeds) -> [arrays]`` and put
    each row's outputs back in its own place. Returns (list of output arrays [rows, ...], BatchRecord)."""
    lengths = [len(r["input_ids"]) for r in rows]
    record = BatchRecord(rows=len(rows), real_tokens=int(sum(lengths)), row_computed=[0] * len(rows))
    results = None
    for group in plan(lengths, max_batch_tokens, overhead_tokens):
        feeds = pad([rows[i] for i in group], pad_id)
        outputs = run(feeds)
        if results is None:
            results = [np.zeros((len(rows),) + o.shape[1:], o.dtype) for o in outputs]
        for result, output in zip(results, outputs):
            result[group] = output
        record.sub_batches += 1
        record.computed_tokens += int(feeds["input_ids"].size)
        for i in group:
            record.row_computed[int(i)] = int(feeds["input_ids"].shape[1])
    return results or [], record


GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def providers(params, available, device_id=0):
    """ONNX Runtime providers (with options) for this instance: TensorRT (when asked) and CUDA where present,
    the CPU provider always last."""
    chosen = []
    if params.get("tensorrt") == "true" and "TensorrtExecutionProvider" in available:
        chosen.append(("TensorrtExecutionProvider", {
            "device_id": device_id, "trt_fp16_enable": True, "trt_engine_cache_enable": True,
            "trt_engine_cache_path": params.get("trt_cache_path", "/tmp/trt_cache")}))
    if "CUDAExecutionProvider" in available:
        chosen.append(("CUDAExecutionProvider", {"device_id": device_id}))
    return chosen + [("CPUExecutionProvider", {})]
