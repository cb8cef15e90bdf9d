"""Triton python-backend model `<name>` (CPU target): TEXT (, TEXT_PAIR) -> tokenizer -> ONNX Runtime -> LABEL,
PROBABILITIES, LOGITS (regression: SCORE), in one model (one hop per request).

Every row runs ALONE, at its own length (no padding), in a session with intra_op_num_threads from the
config (1 by default) and one inter-op thread; one instance per core. So a row's answer is a function of
the row alone: whatever shares its request or its dynamic batch (dynamic int8 picks its activation scales
per tensor, so a padded batch would make rows depend on their neighbours). Dynamic batching only groups
requests into one ``execute`` call.
"""
import numpy as np
import textmodel


class TritonPythonModel(textmodel.RowModel):
    def answer(self, texts, pairs=None):
        results = [self.run_row(text, None if pairs is None else pairs[i]) for i, text in enumerate(texts)]
        logits = np.concatenate([r[0] for r in results]) if results else np.zeros((0, self.model.num_outputs), np.float32)
        probs = np.concatenate([r[-1] for r in results]) if results else np.zeros((0, self.model.num_outputs), np.float32)
        return textmodel.head_outputs(self.model, logits, probs, self.metrics)
