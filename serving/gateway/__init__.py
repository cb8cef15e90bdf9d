"""The gateway: OpenAI and text-embeddings-inference routes in front of tritonserver (docs/GATEWAY.md).

An ASGI app (Starlette on uvicorn) that translates ``POST /v1/embeddings``, ``/embed``, ``/predict``,
``/rerank``, ``/tokenize``, ``GET /v1/models``, ``/info`` and ``/health`` into KServe v2 requests sent over
gRPC (a pooled asyncio ``tritonclient``) to the served models of one repository. ``config`` holds its
options, ``backend`` the Triton side, ``app`` the routes, ``process`` the process ``serving up`` runs beside
tritonserver and supervises.
"""
