"""Python-backend model sources; serving.repository copies them into a repository as `<model>/1/model.py`,
with `textmodel.py` (shared code), `metrics.py` (every textclf_* metric) and `contract.py` (serving.contract)
beside each.

`classifier.py` and `embedder.py` are the CPU target's served models (every row alone); `batched.py` is the GPU
target's served model for every head (token-budget sub-batches, `token_batch.py` beside it). They import
only numpy, tokenizers, onnxruntime (or openvino: `runtime.py` opens either), the standard library,
triton_python_backend_utils and the two copied modules, because they run inside the Triton python stub.
"""
