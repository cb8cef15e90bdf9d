"""Triton python-backend model `<name>` (CPU target, embedding head): TEXT -> tokenizer -> ONNX Runtime
(pooling and normalisation inside the graph) -> EMBEDDING (FP32 [dim]), in one model.

As for the classifier (classifier.py), every row runs ALONE at its own length in a session with
intra_op_num_threads from the config (1 by default); one instance per core. So a row's embedding is a
function of the row alone, whatever shares its request or its dynamic batch.
"""
import numpy as np
import textmodel


class TritonPythonModel:
    def initialize(self, args):
        _, params, self.model = textmodel.read_config(args)
        self.max_chars = int(params["max_text_chars"])
        self.tokenizer = textmodel.load_tokenizer(args, params, pad=False)
        self.session = textmodel.row_session(args, params)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = list(self.model.encoder_outputs)

    def _row(self, text):
        enc = self.tokenizer.encode(text)
        columns = {"input_ids": enc.ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.type_ids}
        feeds = {name: np.asarray([columns[name]], dtype=np.int64) for name in self.inputs}
        return self.session.run(self.outputs, feeds)[0][0]

    def _handle(self, request):
        texts = textmodel.decode_texts(request, self.max_chars)
        return [textmodel.embedding_output(self.model, [self._row(text) for text in texts])]

    def execute(self, requests):
        return textmodel.respond(requests, self._handle, self.model.name)
