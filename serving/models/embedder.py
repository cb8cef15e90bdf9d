"""Triton python-backend model `<name>` (CPU target, embedding head): TEXT -> tokenizer -> ONNX Runtime
(pooling and normalisation inside the graph) -> EMBEDDING (FP32 [dim]), in one model.

As for the classifier (classifier.py), every row runs ALONE at its own length in a session with
intra_op_num_threads from the config (1 by default); one instance per core. So a row's embedding is a
function of the row alone, whatever shares its request or its dynamic batch.

A chunked model (``long_text`` chunk) runs each window of a text alone; its graph answers the pooled (and
Dense-projected) vector BEFORE normalisation, the model averages a text's window vectors and then
L2-normalises the mean when the ``normalize`` parameter says the pipeline normalises (docs/LONG_TEXT.md), and
answers WINDOWS beside EMBEDDING.
"""
import numpy as np
import textmodel

NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's, as sentence-transformers' Normalize uses it


def mean_of_windows(vectors, normalize):
    """One text's embedding from its windows' vectors [windows, dim]: the mean, L2-normalised when asked."""
    mean = np.asarray(vectors, dtype=np.float64).mean(axis=0)
    if normalize:
        mean = mean / max(float(np.linalg.norm(mean)), NORMALIZE_EPS)
    return mean.astype(np.float32)


class TritonPythonModel(textmodel.RowModel):
    def initialize(self, args):
        super().initialize(args)
        _, params, _ = textmodel.read_config(args)
        self.normalize = params.get("normalize", "false") == "true"

    def answer(self, texts, pairs=None):
        windows, rows = self.run_rows(texts, None)
        if not self.model.chunked:
            return [textmodel.embedding_output(self.model, [row[0][0][0] for row in windows])]
        vectors = [mean_of_windows([w[0][0] for w in row], self.normalize) for row in windows]
        return [textmodel.embedding_output(self.model, vectors), textmodel.windows_output(rows)]
