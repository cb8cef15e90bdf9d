"""Triton python-backend model `<name>_postprocess` (GPU target, embedding head): the encoder's
``embedding`` (pooled and normalised inside the graph, FP32 or FP16) -> EMBEDDING, FP32 as the contract says.
"""
import contract
import textmodel
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        _, _, self.model = textmodel.read_config(args)

    def _handle(self, request):
        embedding = pb_utils.get_input_tensor_by_name(request, contract.ENCODER_EMBEDDING).as_numpy()
        return [textmodel.embedding_output(self.model, embedding)]

    def execute(self, requests):
        return textmodel.respond(requests, self._handle, self.model.part("postprocess"))
