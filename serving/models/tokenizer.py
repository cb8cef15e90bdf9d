"""Triton python-backend model `<name>_tokenizer` (GPU target): TEXT (, TEXT_PAIR) -> input_ids, attention_mask
(, token_type_ids), each padded to max_length so that the encoder batches with fixed shapes.

One `tokenizers.Tokenizer` per instance (the backend calls `execute` serially per instance). Input handling
(each request of a dynamic batch on its own, so a bad one fails only itself): bytes that are not UTF-8 or a
text over `max_text_chars` characters -> INVALID_ARG (HTTP 400); an empty text is the empty sequence; a long
text is truncated at max_length tokens on the checkpoint's truncation side.
"""
import numpy as np
import textmodel
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config, params, self.model = textmodel.read_config(args)
        self.max_chars = int(params["max_text_chars"])
        self.max_length = int(params["max_length"])
        self.tokenizer = textmodel.load_tokenizer(args, params, pad=True)
        self.outputs = [t["name"] for t in config["output"]]

    def _handle(self, request):
        texts, pairs = textmodel.decode_rows(request, self.model, self.max_chars)
        encodings = ([self.tokenizer.encode(t) for t in texts] if pairs is None
                     else [self.tokenizer.encode(t, p) for t, p in zip(texts, pairs)])
        columns = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        return [pb_utils.Tensor(name, np.asarray(columns[name], dtype=np.int64).reshape(len(texts), self.max_length))
                for name in self.outputs]

    def execute(self, requests):
        return textmodel.respond(requests, self._handle, self.model.part("tokenizer"))
