"""The Triton side of the gateway: the repository's served models, their tokenizers, and a pool of asyncio
gRPC clients that run a request on tritonserver (split into chunks of the model's max_batch_size)."""
from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from serving.contract import (DEFAULT_CLASSIFIER, DEFAULT_EMBEDDER, DEFAULT_RERANKER, Head, ServedModel,
                              infer_inputs, requested_outputs)
from serving.errors import GatewayError, RepositoryError
from serving.gateway.config import GatewayConfig

log = logging.getLogger(__name__)

CLASSIFIERS = (Head.SINGLE_LABEL, Head.MULTI_LABEL)


@dataclass
class ModelEntry:
    """One served model: its contract, its tokenizer directory and its truncation length."""

    contract: ServedModel
    tokenizer_dir: Path
    max_length: int
    _tokenizer: Any = None

    @property
    def name(self) -> str:
        return self.contract.name

    def tokenizer(self):
        """The checkpoint's fast tokenizer (no truncation, no padding); loaded on first use. The gateway
        calls it only from its event-loop thread (fast tokenizers are not for concurrent use)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(self.tokenizer_dir / "tokenizer.json"))
            tok.no_truncation()
            tok.no_padding()
            self._tokenizer = tok
        return self._tokenizer

    def token_counts(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[int]:
        """Tokens of each text (or pair) as the model reads it, special tokens included, before truncation."""
        rows = list(texts) if pairs is None else list(zip(texts, pairs))
        return [len(e.ids) for e in self.tokenizer().encode_batch(rows)]


def _pick(models: dict[str, ModelEntry], chosen: str | None, default: str, heads, pairs: bool | None = None):
    """The configured name, else ``default`` when it fits, else the only model that fits (or None)."""
    fits = {n: m for n, m in models.items()
            if m.contract.head in heads and (pairs is None or m.contract.text_pair == pairs)}
    if chosen is not None:
        if chosen not in fits:
            raise GatewayError(f"model {chosen!r} is not a served {'/'.join(h.value for h in heads)} model "
                               f"(fitting: {sorted(fits) or 'none'})")
        return chosen
    if default in fits:
        return default
    return next(iter(fits)) if len(fits) == 1 else None


class Models:
    """The repository's served models and the default model of each route family."""

    def __init__(self, config: GatewayConfig) -> None:
        from serving.repository import read_repository

        try:
            info = read_repository(config.repository)
        except RepositoryError as exc:
            raise GatewayError(str(exc)) from None
        self.entries = {name: ModelEntry(m.contract, m.tokenizer_dir, _max_length(m)) for name, m in
                        sorted(info.models.items())}
        self.embedder = _pick(self.entries, config.embedder, DEFAULT_EMBEDDER, (Head.EMBEDDING,))
        self.classifier = _pick(self.entries, config.classifier, DEFAULT_CLASSIFIER, CLASSIFIERS)
        self.reranker = _pick(self.entries, config.reranker, DEFAULT_RERANKER, (Head.REGRESSION,), pairs=True)

    def get(self, name: str | None, default: str | None, what: str, heads) -> ModelEntry:
        """The model a request names (else the route's default); 404 unknown, 400 the wrong kind."""
        if name is None:
            if default is None:
                raise GatewayError(f"this repository serves no default {what} model: pass ?model=NAME",
                                   400, "validation")
            name = default
        entry = self.entries.get(name)
        if entry is None:
            raise GatewayError(f"model {name!r} not found (served: {', '.join(self.entries)})", 404, "not_found")
        if entry.contract.head not in heads:
            article = "an" if what[:1] in "aeiou" else "a"
            raise GatewayError(f"model {name!r} is a {entry.contract.head.value} model, not {article} {what} model",
                               400, "validation")
        return entry


def _max_length(info) -> int:
    param = info.config.parameters.get("max_length")
    if param is None and info.parts:
        param = next((p.parameters.get("max_length") for p in info.parts.values()
                      if p.parameters.get("max_length") is not None), None)
    return int(param.string_value) if param is not None and param.string_value else 512


_STATUS = {  # gRPC status of a failed inference -> (HTTP status, kind, message the client sees)
    "StatusCode.INVALID_ARGUMENT": (422, "validation", None),
    "StatusCode.UNAVAILABLE": (503, "overloaded", "tritonserver is busy or unavailable; retry later"),
    "StatusCode.DEADLINE_EXCEEDED": (504, "timeout", "tritonserver did not answer in time"),
    "StatusCode.RESOURCE_EXHAUSTED": (503, "overloaded", "tritonserver is busy; retry later"),
}


def backend_error(exc: Exception) -> GatewayError:
    """A tritonclient failure as the client's error: the model's own message only for invalid input."""
    status = str(getattr(exc, "status", lambda: None)() or "")
    code, kind, message = _STATUS.get(status, (502, "backend", "inference failed (see the gateway log)"))
    if message is None:
        message = str(getattr(exc, "message", lambda: str(exc))()).strip() or "invalid input"
    else:
        log.warning("tritonserver: %s %s", status or type(exc).__name__, exc)
    return GatewayError(message, code, kind)


class Triton:
    """A pool of asyncio gRPC clients (one HTTP/2 channel each), used round robin; ``start`` inside the loop."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.clients: list[Any] = []
        self._next = itertools.cycle([0])
        self._outputs: dict[tuple[str, tuple[str, ...]], list[Any]] = {}

    async def start(self) -> None:
        import tritonclient.grpc.aio as grpcclient

        self.module = grpcclient
        self.clients = [grpcclient.InferenceServerClient(self.config.triton_url) for _ in range(self.config.channels)]
        self._next = itertools.cycle(range(len(self.clients)))

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)

    def _client(self):
        return self.clients[next(self._next)]

    async def ready(self) -> bool:
        try:
            return bool(await self._client().is_server_ready(client_timeout=2.0))
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False

    async def _infer(self, model: ServedModel, texts: Sequence[str], pairs, outputs: tuple[str, ...]):
        key = (model.name, outputs)
        if key not in self._outputs:
            self._outputs[key] = requested_outputs(self.module, outputs)
        try:
            result = await self._client().infer(model.name, infer_inputs(self.module, texts, pairs),
                                                outputs=self._outputs[key], client_timeout=self.config.timeout_s)
        except Exception as exc:  # noqa: BLE001 - InferenceServerException or a transport error
            raise backend_error(exc) from None
        return {name: result.as_numpy(name) for name in outputs}

    async def infer(self, model: ServedModel, texts: Sequence[str], pairs: Sequence[str] | None,
                    outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Output name -> array with one row per text; requests above max_batch_size go as chunks at once."""
        step = model.max_batch_size or len(texts)
        if len(texts) <= step:
            return await self._infer(model, texts, pairs, outputs)
        chunks = [(texts[i:i + step], None if pairs is None else pairs[i:i + step])
                  for i in range(0, len(texts), step)]
        parts = await asyncio.gather(*(self._infer(model, t, p, outputs) for t, p in chunks))
        return {name: np.concatenate([p[name] for p in parts]) for name in outputs}
