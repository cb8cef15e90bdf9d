"""Triton python-backend model `postprocess`: logits, probabilities -> LABEL, PROBABILITIES, LOGITS (FP32).

LABEL is the argmax of the probabilities mapped through the `labels` parameter (a JSON list in id order).
The encoder may emit FP16 (GPU target); the client contract is FP32, so the cast happens here.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.labels = np.array(
            [label.encode("utf-8") for label in json.loads(config["parameters"]["labels"]["string_value"])],
            dtype=np.object_,
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                probs = pb_utils.get_input_tensor_by_name(request, "probabilities").as_numpy().astype(np.float32)
                logits = pb_utils.get_input_tensor_by_name(request, "logits").as_numpy().astype(np.float32)
                labels = self.labels[np.argmax(probs, axis=1)].reshape(-1, 1)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("LABEL", labels),
                    pb_utils.Tensor("PROBABILITIES", probs),
                    pb_utils.Tensor("LOGITS", logits),
                ]))
            except Exception as exc:  # noqa: BLE001
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"postprocess failed: {exc}")
                ))
        return responses
