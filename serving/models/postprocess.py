"""Triton python-backend model `<name>_postprocess` (GPU target): logits, probabilities -> LABEL,
PROBABILITIES, LOGITS (multi-label: LABEL is the JSON list of labels >= threshold; regression: logits -> SCORE). The encoder may emit FP16; the client contract is FP32, so the cast happens here.
"""
import contract
import textmodel
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        _, _, self.model = textmodel.read_config(args)

    def _handle(self, request):
        logits = pb_utils.get_input_tensor_by_name(request, contract.ENCODER_LOGITS).as_numpy()
        probs = pb_utils.get_input_tensor_by_name(request, contract.ENCODER_PROBABILITIES)
        probs = logits if probs is None else probs.as_numpy()  # regression: no probabilities
        return textmodel.head_outputs(self.model, logits, probs)

    def execute(self, requests):
        return textmodel.respond(requests, self._handle, self.model.part("postprocess"))
