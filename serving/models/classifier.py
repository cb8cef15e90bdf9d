"""Triton python-backend model `<name>` (CPU target): TEXT (, TEXT_PAIR) -> tokenizer -> ONNX Runtime -> LABEL,
PROBABILITIES, LOGITS (regression: SCORE), in one model (one hop per request).

A text of any length is answered as the checkpoint saves it (cut before tokenizing: tokenization.py); a
chunked model (``long_text`` chunk) runs each window of a text alone and averages the windows' logits before
the head's activation, and also answers WINDOWS. Every row runs ALONE, at its own length (no padding), in a session with intra_op_num_threads from the
config (1 by default) and one inter-op thread; one instance per core. So a row's answer is a function of
the row alone: whatever shares its request or its dynamic batch (dynamic int8 picks its activation scales
per tensor, so a padded batch would make rows depend on their neighbours). Dynamic batching only groups
requests into one ``execute`` call.
"""
import numpy as np
import textmodel


class TritonPythonModel(textmodel.RowModel):
    def initialize(self, args):
        super().initialize(args)
        self.width = self.model.num_outputs

    def answer(self, texts, pairs=None):
        windows, rows = self.run_rows(texts, pairs)
        if self.model.chunked:  # the windows' logits averaged, then the head's activation
            logits = np.stack([np.mean([w[0][0] for w in row], axis=0) for row in windows]).astype(np.float32) \
                if windows else np.zeros((0, self.width), np.float32)
            return textmodel.head_outputs(self.model, logits, _activation(self.model, logits), self.metrics) + \
                [textmodel.windows_output(rows)]
        results = [row[0] for row in windows]
        logits = np.concatenate([r[0] for r in results]) if results else np.zeros((0, self.width), np.float32)
        probs = np.concatenate([r[-1] for r in results]) if results else np.zeros((0, self.width), np.float32)
        return textmodel.head_outputs(self.model, logits, probs, self.metrics)


def _activation(model, logits):
    """The head's activation of (averaged) logits: softmax (single-label), sigmoid (multi-label)."""
    x = logits.astype(np.float64)
    if model.head.value == "multi_label_classification":
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    if model.head.value == "regression":
        return logits
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
