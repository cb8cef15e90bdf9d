"""Triton python-backend model `<name>_tokenizer` (GPU target): TEXT (, TEXT_PAIR) -> input_ids, attention_mask
(, token_type_ids), each padded to max_length so that the encoder batches with fixed shapes.

One `tokenizers.Tokenizer` per instance (the backend calls `execute` serially per instance). Input handling
(each request of a dynamic batch on its own, so a bad one fails only itself): bytes that are not UTF-8 or a
request over `max_request_bytes` bytes of text -> INVALID_ARG (HTTP 400); an empty text is the empty sequence;
a text of any length is truncated at max_length tokens on the checkpoint's truncation side (cut before
tokenizing: tokenization.py).
"""
import numpy as np
import textmodel
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config, params, self.model = textmodel.read_config(args)
        self.max_bytes = int(params["max_request_bytes"])
        self.max_length = int(params["max_length"])
        self.tokenizer = textmodel.length_tokenizer(args, params)
        self.pad_id, self.left = int(params["pad_id"]), params.get("padding_side", "right") == "left"
        self.outputs = [t["name"] for t in config["output"]]

    def _padded(self, values, fill):
        pad = [fill] * (self.max_length - len(values))
        return pad + list(values) if self.left else list(values) + pad

    def _handle(self, request):
        texts, pairs = textmodel.decode_rows(request, self.model, self.max_bytes)
        encodings = [self.tokenizer.encode(t, None if pairs is None else pairs[i]).encodings[0]
                     for i, t in enumerate(texts)]
        columns = {
            "input_ids": [self._padded(e.ids, self.pad_id) for e in encodings],
            "attention_mask": [self._padded(e.attention_mask, 0) for e in encodings],
            "token_type_ids": [self._padded(e.type_ids, 0) for e in encodings],
        }
        return [pb_utils.Tensor(name, np.asarray(columns[name], dtype=np.int64).reshape(len(texts), self.max_length))
                for name in self.outputs]

    def execute(self, requests):
        return textmodel.respond(requests, self._handle, self.model.part("tokenizer"))
