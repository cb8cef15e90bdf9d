"""Python-backend model sources; serving.repository copies them into a repository as `<model>/1/model.py`.

They are self-contained: they import only numpy, tokenizers, onnxruntime, json and
triton_python_backend_utils, because they run inside the Triton python-backend stub.
"""
