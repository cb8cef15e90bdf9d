"""Triton python-backend model `<name>` (CPU target): TEXT (, TEXT_PAIR) -> tokenizer -> ONNX Runtime -> LABEL,
PROBABILITIES, LOGITS (regression: SCORE), in one model (one hop per request).

Every row runs ALONE, at its own length (no padding), in a session with intra_op_num_threads from the
config (1 by default) and one inter-op thread; one instance per core. So a row's answer is a function of
the row alone: whatever shares its request or its dynamic batch (dynamic int8 picks its activation scales
per tensor, so a padded batch would make rows depend on their neighbours). Dynamic batching only groups
requests into one ``execute`` call.
"""
import os

import numpy as np
import onnxruntime as ort
import textmodel


class TritonPythonModel:
    def initialize(self, args):
        _, params, self.model = textmodel.read_config(args)
        self.max_chars = int(params["max_text_chars"])
        self.tokenizer = textmodel.load_tokenizer(args, params, pad=False)
        options = ort.SessionOptions()
        threads = int(params.get("intra_op_threads", "1"))
        if threads > 0:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = list(self.model.encoder_outputs)
        self.width = self.model.num_outputs

    def _row(self, text, pair=None):
        enc = self.tokenizer.encode(text) if pair is None else self.tokenizer.encode(text, pair)
        columns = {"input_ids": enc.ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.type_ids}
        feeds = {name: np.asarray([columns[name]], dtype=np.int64) for name in self.inputs}
        return self.session.run(self.outputs, feeds)

    def _handle(self, request):
        texts, pairs = textmodel.decode_rows(request, self.model, self.max_chars)
        results = [self._row(text, None if pairs is None else pairs[i]) for i, text in enumerate(texts)]
        logits = np.concatenate([r[0] for r in results]) if results else np.zeros((0, self.width), np.float32)
        probs = np.concatenate([r[-1] for r in results]) if results else np.zeros((0, self.width), np.float32)
        return textmodel.head_outputs(self.model, logits, probs)

    def execute(self, requests):
        return textmodel.respond(requests, self._handle, self.model.name)
