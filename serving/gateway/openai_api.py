"""OpenAI-compatible routes: ``POST /v1/embeddings`` and ``GET /v1/models`` (the shapes of OpenAI's API
reference; the ``openai`` package is the test client)."""
from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.contract import EMBEDDING, Head
from serving.errors import GatewayError
from serving.gateway.state import Gateway, json_response

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response


OWNER = "triton-textclf"


def _input_texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, list) and value and all(isinstance(v, (int, list)) for v in value):
        raise _param(GatewayError("token arrays are not supported: send the text (a string or a list of strings)"),
                     "input")
    raise _param(GatewayError("'input' must be a string or a list of strings"), "input")


def _param(exc: GatewayError, name: str) -> GatewayError:
    exc.param = name  # OpenAI's error object names the offending parameter
    return exc


def _encode(vectors: np.ndarray, encoding: str) -> list[Any]:
    if encoding == "float":
        return list(vectors)  # rows of float32, written by orjson as JSON numbers
    little = vectors.astype("<f4", copy=False)
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in little]


async def embeddings(gw: "Gateway", request: "Request") -> "Response":
    """``{"model", "input", "encoding_format"}`` -> ``{"object": "list", "data": [...], "model", "usage"}``."""

    body = await gw.body(request)
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise _param(GatewayError("'model' must be a string"), "model")
    entry = gw.models.get(name, gw.models.embedder, "embedding", (Head.EMBEDDING,))
    texts = gw.check_rows(_input_texts(body.get("input")))
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise _param(GatewayError(f"encoding_format must be 'float' or 'base64', got {encoding!r}"), "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and dims != entry.contract.embedding_dim:
        raise _param(GatewayError(f"model {entry.name!r} has {entry.contract.embedding_dim} dimensions, "
                                  f"{dims!r} were asked for"), "dimensions")
    task = asyncio.ensure_future(gw.triton.infer(entry.contract, texts, None, (EMBEDDING,)))
    await asyncio.sleep(0)  # the request is on its way; count the tokens meanwhile
    try:
        tokens = sum(min(n, entry.max_length) for n in entry.token_counts(texts))
    except BaseException:
        task.cancel()
        raise
    vectors = (await task)[EMBEDDING].reshape(len(texts), -1)
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(_encode(vectors, encoding))]
    return json_response({"object": "list", "data": data, "model": entry.name,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": OWNER}


async def list_models(gw: "Gateway", request: "Request") -> "Response":
    """Every served model of the repository (embedders, classifiers, rerankers)."""

    return json_response({"object": "list", "data": [_model_object(n) for n in gw.models.entries]})


async def retrieve_model(gw: "Gateway", request: "Request") -> "Response":

    name = request.path_params["model"]
    if name not in gw.models.entries:
        raise _param(GatewayError(f"model {name!r} not found", 404, "not_found"), "model")
    return json_response(_model_object(name))
