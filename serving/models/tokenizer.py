"""Triton python-backend model `tokenizer`: TEXT (UTF-8 bytes) -> input_ids, attention_mask, token_type_ids.

One `tokenizers.Tokenizer` per model instance (the backend calls `execute` serially per instance, so it is
never shared between threads). Every row is padded to `max_length` so that requests batch dynamically, and
truncated at `max_length`. A text longer than `max_text_chars` characters is refused (INVALID_ARG, HTTP 400):
with `max_batch_size` rows this bounds a request's size (Triton 2.51 has no --http-max-input-size).

Input handling (each request of a dynamic batch is handled on its own, so a bad one fails only itself):
- bytes that are not valid UTF-8 -> the request fails with INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT);
- an empty or whitespace-only text is the empty sequence ([CLS] [SEP]): a defined, normal result;
- a long text (up to `max_text_chars`) is truncated at `max_length` tokens: a normal result;
- a text over `max_text_chars` characters -> INVALID_ARG naming the row and the limit.
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

OUTPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _error(message):
    return pb_utils.InferenceResponse(
        output_tensors=[], error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.max_length = int(params["max_length"])
        self.max_chars = int(params.get("max_text_chars", "100000"))
        path = os.path.join(args["model_repository"], args["model_version"], "tokenizer", "tokenizer.json")
        self.tokenizer = Tokenizer.from_file(path)
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self.tokenizer.enable_padding(
            length=self.max_length, pad_id=int(params.get("pad_id", "0")), pad_token=params.get("pad_token", "[PAD]")
        )

    def _decode(self, texts):
        """Row strings of a TEXT tensor, or an error message naming the first bad row."""
        out = []
        for i, value in enumerate(texts.reshape(-1)):
            if isinstance(value, str):
                text = value
            else:
                try:
                    text = bytes(value).decode("utf-8")
                except UnicodeDecodeError as exc:
                    return None, f"TEXT row {i} is not valid UTF-8: {exc}"
                except TypeError:
                    return None, f"TEXT row {i} is not a string"
            if len(text) > self.max_chars:
                return None, f"TEXT row {i} has {len(text)} characters; the limit is {self.max_chars} (max_text_chars)"
            out.append(text)
        return out, None

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, "TEXT")
                if tensor is None:
                    responses.append(_error("missing input TEXT"))
                    continue
                texts, problem = self._decode(tensor.as_numpy())
                if problem is not None:
                    responses.append(_error(problem))
                    continue
                encodings = self.tokenizer.encode_batch(texts) if texts else []
                rows = len(texts)
                arrays = {
                    "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                    "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                    "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
                }
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(name, arrays[name].reshape(rows, self.max_length)) for name in OUTPUTS
                ]))
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail the batch
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"tokenizer failed: {exc}")
                ))
        return responses
