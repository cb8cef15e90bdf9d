"""Python-backend model sources; serving.repository copies them into a repository as `<model>/1/model.py`,
with `textmodel.py` (shared code), `metrics.py` (every textclf_* metric) and `contract.py` (serving.contract)
beside each.

`classifier.py` is the CPU target's one served model; `tokenizer.py` and `postprocess.py` are the python
steps of the GPU target's ensemble. They import only numpy, tokenizers, onnxruntime, the standard library,
triton_python_backend_utils and the copied modules, because they run inside the Triton python stub.
"""
