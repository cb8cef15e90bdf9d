"""Triton python-backend model `<name>` (CPU target, embedding head): TEXT -> tokenizer -> ONNX Runtime
(pooling and normalisation inside the graph) -> EMBEDDING (FP32 [dim]), in one model.

As for the classifier (classifier.py), every row runs ALONE at its own length in a session with
intra_op_num_threads from the config (1 by default); one instance per core. So a row's embedding is a
function of the row alone, whatever shares its request or its dynamic batch.
"""
import textmodel


class TritonPythonModel(textmodel.RowModel):
    def answer(self, texts, pairs=None):
        windows, _ = self.run_rows(texts, None)
        return [textmodel.embedding_output(self.model, [row[0][0][0] for row in windows])]
