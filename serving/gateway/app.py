"""The gateway's ASGI app: OpenAI (``/v1/embeddings``, ``/v1/models``) and text-embeddings-inference
(``/embed``, ``/predict``, ``/rerank``, ``/tokenize``, ``/info``, ``/health``) routes over :mod:`.backend`.

Every route but ``/health`` needs ``Authorization: Bearer KEY`` when a key is configured (compared in constant
time). The body, the rows per request and each text have caps (``GatewayConfig``), each refused with one
413. Errors come in the shape of the route's family: OpenAI's ``{"error": {"message", "type", "param",
"code"}}`` under ``/v1/``, text-embeddings-inference's ``{"error", "error_type"}`` elsewhere. Bugs are logged
here and answered with a generic 500: no traceback or internal detail reaches a client.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serving.errors import GatewayError
from serving.gateway import openai_api, tei_api
from serving.gateway.backend import Models
from serving.gateway.config import GatewayConfig
from serving.gateway.state import Gateway, json_response

log = logging.getLogger(__name__)

Handler = Callable[[Gateway, Request], Awaitable[Response]]


_OPENAI_TYPES = {"auth": ("invalid_request_error", "invalid_api_key"), "not_found": ("invalid_request_error",
                 "model_not_found"), "validation": ("invalid_request_error", None), "too_large": (
                 "invalid_request_error", "request_too_large"), "overloaded": ("server_error", "overloaded"),
                 "timeout": ("server_error", "timeout"), "unhealthy": ("server_error", "unavailable")}
_TEI_TYPES = {"auth": "Unauthorized", "not_found": "Validation", "validation": "Validation",
              "too_large": "Validation", "overloaded": "Overloaded", "timeout": "Backend", "unhealthy": "Unhealthy",
              "empty": "Empty", "tokenizer": "Tokenizer"}


def openai_error(exc: GatewayError) -> Response:
    kind, code = _OPENAI_TYPES.get(exc.kind, ("server_error", None))
    return json_response({"error": {"message": str(exc), "type": kind, "param": getattr(exc, "param", None),
                                    "code": code}}, exc.status)


def tei_error(exc: GatewayError) -> Response:
    return json_response({"error": str(exc), "error_type": _TEI_TYPES.get(exc.kind, "Backend")}, exc.status)


def _endpoint(gateway: Gateway, handler: Handler, render: Callable[[GatewayError], Response], guarded: bool):
    async def endpoint(request: Request) -> Response:
        try:
            if guarded:
                gateway.authorize(request)
            return await handler(gateway, request)
        except GatewayError as exc:
            return render(exc)
        except Exception:  # noqa: BLE001 - the error boundary: full text to the log, a generic one out
            log.exception("%s %s failed", request.method, request.url.path)
            return render(GatewayError("internal error (see the gateway log)", 500, "backend"))

    return endpoint


ROUTES: tuple[tuple[str, str, Handler, str, bool], ...] = (
    # path, method, handler, error shape, needs the key
    ("/v1/embeddings", "POST", openai_api.embeddings, "openai", True),
    ("/v1/models", "GET", openai_api.list_models, "openai", True),
    ("/v1/models/{model:path}", "GET", openai_api.retrieve_model, "openai", True),
    ("/embed", "POST", tei_api.embed, "tei", True),
    ("/predict", "POST", tei_api.predict, "tei", True),
    ("/rerank", "POST", tei_api.rerank, "tei", True),
    ("/tokenize", "POST", tei_api.tokenize, "tei", True),
    ("/info", "GET", tei_api.info, "tei", True),
    ("/health", "GET", tei_api.health, "tei", False),
    ("/", "POST", tei_api.root, "tei", True),
)


def build_app(config: GatewayConfig, models: Models | None = None) -> Starlette:
    """The Starlette app; its lifespan opens and closes the gRPC pool."""
    gateway = Gateway(config, models)
    renderers = {"openai": openai_error, "tei": tei_error}
    routes = [Route(path, _endpoint(gateway, handler, renderers[shape], guarded), methods=[method])
              for path, method, handler, shape, guarded in ROUTES]

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await gateway.triton.start()
        log.info("gateway forwarding to tritonserver at %s (%d channels); models %s", config.triton_url,
                 config.channels, ", ".join(gateway.models.entries))
        try:
            yield
        finally:
            await gateway.triton.close()

    async def no_route(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        what = "no such route" if status == 404 else f"method {request.method} not allowed here"
        render = openai_error if request.url.path.startswith("/v1/") else tei_error
        return render(GatewayError(f"{what}: {request.url.path}", status, "not_found"))

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: no_route, 405: no_route})
    app.state.gateway = gateway
    return app
