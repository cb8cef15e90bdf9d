"""Triton python-backend model `encoder` (CPU target): an onnxruntime InferenceSession over the ONNX model.

The requests of a dynamic batch are concatenated and run as one ONNX Runtime call. Each batch is trimmed
to its longest real sequence (the tokenizer pads every row to max_length; with right padding and an
attention mask, dropping all-pad columns does not change a BERT's outputs). If the batched call fails, each
request is run alone so that only the bad one fails.
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.input_names = [t["name"] for t in config["input"]]
        self.outputs = [(t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["output"]]
        self.trim = params.get("trim_batch", "true").lower() == "true"
        options = ort.SessionOptions()
        threads = int(params.get("intra_op_threads", "0"))
        if threads > 0:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self.output_names = [name for name, _ in self.outputs]

    def _run(self, feeds):
        if self.trim and "attention_mask" in feeds:
            mask = feeds["attention_mask"]
            longest = max(int(mask.sum(axis=1).max()) if mask.size else 1, 1)
            feeds = {k: np.ascontiguousarray(v[:, :longest]) for k, v in feeds.items()}
        return self.session.run(self.output_names, feeds)

    def _response(self, results):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.ascontiguousarray(value.astype(dtype, copy=False)))
            for (name, dtype), value in zip(self.outputs, results)
        ])

    def execute(self, requests):
        per_request = []
        for request in requests:
            per_request.append({
                name: pb_utils.get_input_tensor_by_name(request, name).as_numpy().astype(np.int64, copy=False)
                for name in self.input_names
            })
        sizes = [len(f[self.input_names[0]]) for f in per_request]
        try:
            feeds = {n: np.concatenate([f[n] for f in per_request]) for n in self.input_names}
            results = self._run(feeds)
        except Exception:  # noqa: BLE001 - fall back to one call per request, so only a bad one fails
            results = None
        responses = []
        if results is not None:
            start = 0
            for size in sizes:
                responses.append(self._response([r[start:start + size] for r in results]))
                start += size
            return responses
        for feeds in per_request:
            try:
                responses.append(self._response(self._run(feeds)))
            except Exception as exc:  # noqa: BLE001
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"encoder failed: {exc}")
                ))
        return responses
