"""What the gateway's routes share: the ``Gateway`` state (config, served models, the Triton client pool,
the body and row checks) and the JSON response. The route modules (openai_api, tei_api) and the app import
it; it imports none of them."""
from __future__ import annotations

import hmac
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from serving.errors import GatewayError
from serving.gateway.backend import Models, Triton
from serving.gateway.config import GatewayConfig

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj, option=_JSON_OPTIONS), status, media_type="application/json")


class Gateway:
    """The state the routes share: the config, the served models and the Triton client pool."""

    def __init__(self, config: GatewayConfig, models: Models | None = None) -> None:
        self.config = config
        self.models = models if models is not None else Models(config)
        self.triton = Triton(config)
        self._key = config.api_key.encode() if config.api_key else None

    def authorize(self, request: Request) -> None:
        if self._key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._key):
            raise GatewayError("missing or wrong API key: send 'Authorization: Bearer KEY'", 401, "auth")

    async def body(self, request: Request) -> dict[str, Any]:
        """The JSON object of the body, read up to the body cap (413 above it; 400 when not a JSON object)."""
        cap = self.config.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > cap:
            raise GatewayError(f"request body over {cap} bytes", 413, "too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise GatewayError(f"request body over {cap} bytes", 413, "too_large")
            chunks.append(chunk)
        try:
            doc = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError:
            raise GatewayError("request body is not valid JSON", 400, "validation") from None
        if not isinstance(doc, dict):
            raise GatewayError("request body must be a JSON object", 422, "validation")
        return doc

    def check_rows(self, texts: list[str]) -> list[str]:
        """Row and text caps (413 each); an empty list is a 400."""
        if not texts:
            raise GatewayError("inputs cannot be empty", 400, "empty")
        if len(texts) > self.config.max_rows:
            raise GatewayError(f"{len(texts)} inputs in one request; at most {self.config.max_rows}", 413,
                               "too_large")
        cap = self.config.max_text_chars
        for i, text in enumerate(texts):
            if len(text) > cap:
                raise GatewayError(f"input {i} has {len(text)} characters; at most {cap}", 413, "too_large")
        return texts

