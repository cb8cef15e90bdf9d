"""Thin client of the `classifier` ensemble over HTTP or gRPC, sync (`TextClassifier`) and asyncio
(`AsyncTextClassifier`). No tokenizer here: the server tokenizes.

Large inputs are split into chunks of at most the model's ``max_batch_size`` rows. Connection failures,
UNAVAILABLE (queue full / queue timeout / server starting) and Triton's 500 "Stub process ... is not healthy"
(a dead python-backend stub; see serving.supervisor) are retried with bounded exponential backoff, at most
``retries`` times and never past ``timeout_s`` after the first attempt; errors come back as the typed
exceptions of ``serving.errors``.
"""
from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from serving.errors import (
    ClientError,
    InvalidInputError,
    RequestTimeoutError,
    ServerUnavailableError,
)

log = logging.getLogger(__name__)


class Protocol(str, enum.Enum):
    HTTP = "http"
    GRPC = "grpc"


@dataclass(frozen=True)
class Prediction:
    """One text's result: the label, its probability, and the probability of every label."""

    label: str
    score: float
    probabilities: dict[str, float]
    logits: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"label": self.label, "score": self.score, "probabilities": self.probabilities}
        if self.logits is not None:
            out["logits"] = self.logits
        return out


@dataclass
class ClientConfig:
    url: str = "127.0.0.1:8000"
    protocol: Protocol = Protocol.HTTP
    model: str = "classifier"
    timeout_s: float = 30.0
    retries: int = 4
    backoff_s: float = 0.1
    backoff_max_s: float = 2.0
    return_logits: bool = False

    def __post_init__(self) -> None:
        try:
            self.protocol = Protocol(self.protocol)
        except ValueError as exc:
            raise ClientError(f"protocol must be http or grpc, got {self.protocol!r}") from exc
        for prefix in ("http://", "https://", "grpc://"):
            if self.url.startswith(prefix):
                self.url = self.url[len(prefix):]
        self.url = self.url.rstrip("/")
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0:
            raise ClientError("timeout_s must be > 0, retries and backoff_s >= 0")

    def delay(self, attempt: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * (2 ** attempt))


# ------------------------------------------------------------------------------ shared pure helpers

_INVALID = {"400", "404", "StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND", "StatusCode.UNIMPLEMENTED"}
_UNAVAILABLE = {"503", "502", "StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED"}
_TIMEOUT = {"504", "StatusCode.DEADLINE_EXCEEDED"}
_STUB_UNHEALTHY = "is not healthy"  # "Stub process '<instance>' is not healthy." (500 / INTERNAL)
_NO_VERSIONS = "has no available versions"  # "Request for unknown model: 'm' has no available versions"


class _Retry(Exception):
    """A failure worth retrying; carries the error to raise if the retries run out."""

    def __init__(self, error: ClientError) -> None:
        super().__init__(str(error))
        self.error = error


def classify_error(exc: BaseException, url: str) -> ClientError | _Retry:
    """Map a tritonclient / transport exception to a typed error (or a retryable one)."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        message = exc.message() or str(exc)
        if _NO_VERSIONS in message:
            # the model is being unloaded (server shutting down or restarting): transient, not a bad request
            return _Retry(ServerUnavailableError(f"{url}: {message} ({status or 'unavailable'})"))
        if status in _INVALID:
            return InvalidInputError(f"{message} ({status})")
        if status in _TIMEOUT or "Deadline Exceeded" in message or "timed out" in message.lower():
            return RequestTimeoutError(f"{message} ({status or 'timeout'})")
        if status in _UNAVAILABLE or "failed to connect" in message.lower() or "connection" in message.lower():
            return _Retry(ServerUnavailableError(f"{url}: {message} ({status or 'unavailable'})"))
        if _STUB_UNHEALTHY in message:
            # Triton 2.51 after a python-backend stub died: the request never ran, and classification is
            # idempotent, so it is safe to retry while serving.supervisor restarts the server (RELIABILITY.md).
            return _Retry(ServerUnavailableError(f"{url}: {message} ({status or '500'}, stub restarting)"))
        if status.startswith("4"):
            return InvalidInputError(f"{message} ({status})")
        return ClientError(f"server error: {message} ({status})")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) or type(exc).__name__ in ("timeout", "ServerTimeoutError"):
        return RequestTimeoutError(f"{url}: no answer within the timeout ({type(exc).__name__})")
    if isinstance(exc, (ConnectionError, OSError)) or type(exc).__name__ in (
            "ClientConnectorError", "ClientOSError", "HTTPConnectionClosed"):  # the last: geventhttpclient
        return _Retry(ServerUnavailableError(f"{url}: cannot connect: {exc or type(exc).__name__}"))
    return ClientError(f"{url}: {type(exc).__name__}: {exc}")


def _texts(texts: str | Iterable[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    out = list(texts)
    bad = [i for i, t in enumerate(out) if not isinstance(t, str)]
    if bad:
        raise InvalidInputError(f"texts must be strings; items {bad[:5]} are not")
    return out


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _parse_config(config: Any) -> tuple[int, list[str]]:
    """max_batch_size and labels from a model config (HTTP dict, gRPC JSON dict, or protobuf)."""
    if hasattr(config, "config") and not isinstance(config, dict):  # gRPC protobuf response
        cfg = config.config
        mbs = cfg.max_batch_size
        labels_json = cfg.parameters["labels"].string_value if "labels" in cfg.parameters else None
    else:
        cfg = config.get("config", config)
        mbs = int(cfg.get("max_batch_size", 0))
        labels_json = (cfg.get("parameters", {}).get("labels") or {}).get("string_value")
    if not labels_json:
        raise ClientError("the model config has no 'labels' parameter; is this the classifier ensemble?")
    return int(mbs), list(json.loads(labels_json))


def _predictions(labels_out, probs, logits, labels: list[str]) -> list[Prediction]:
    out = []
    for i in range(len(probs)):
        raw = labels_out[i][0] if getattr(labels_out[i], "shape", ()) else labels_out[i]
        label = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        probabilities = {name: float(p) for name, p in zip(labels, probs[i])}
        out.append(Prediction(
            label=label, score=probabilities.get(label, float(max(probs[i]))), probabilities=probabilities,
            logits=[float(x) for x in logits[i]] if logits is not None else None,
        ))
    return out


def _inputs(module, texts: list[str]):
    import numpy as np

    data = np.array([t.encode("utf-8") for t in texts], dtype=np.object_).reshape(-1, 1)
    tensor = module.InferInput("TEXT", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    outputs = [module.InferRequestedOutput(n) for n in ("LABEL", "PROBABILITIES")]
    return [tensor], outputs


# ----------------------------------------------------------------------------------------- sync client


@dataclass
class _ClassifierBase:
    """What the sync and asyncio clients share: their settings and the validated ClientConfig."""

    url: str = "127.0.0.1:8000"
    protocol: Protocol | str = Protocol.HTTP
    model: str = "classifier"
    timeout_s: float = 30.0
    retries: int = 4
    backoff_s: float = 0.1
    return_logits: bool = False
    _cfg: ClientConfig = field(init=False, repr=False)
    _client: Any = field(init=False, default=None, repr=False)
    _meta: tuple[int, list[str]] | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self._cfg = ClientConfig(self.url, self.protocol, self.model, self.timeout_s, self.retries,
                                 self.backoff_s, return_logits=self.return_logits)
        self.protocol = self._cfg.protocol


@dataclass
class TextClassifier(_ClassifierBase):
    """Classify texts with the served `classifier` ensemble (sync)."""

    @property
    def _module(self):
        if self._cfg.protocol is Protocol.HTTP:
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
        return module

    def _connect(self):
        if self._client is None:
            cfg = self._cfg
            if cfg.protocol is Protocol.HTTP:
                self._client = self._module.InferenceServerClient(
                    cfg.url, connection_timeout=cfg.timeout_s, network_timeout=cfg.timeout_s
                )
            else:
                self._client = self._module.InferenceServerClient(cfg.url)
        return self._client

    def _call(self, func, *args, **kwargs):
        """Run ``func`` with retries on connection failures and UNAVAILABLE."""
        attempt, deadline = 0, time.monotonic() + self._cfg.timeout_s
        while True:
            try:
                return func(*args, **kwargs)
            except ClientError:
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to typed errors below
                error = classify_error(exc, self._cfg.url)
                if not isinstance(error, _Retry):
                    raise error from exc
                delay = self._cfg.delay(attempt)
                if attempt >= self._cfg.retries or time.monotonic() + delay > deadline:
                    raise error.error from exc
                log.debug("retrying in %.2f s after: %s", delay, error)
                time.sleep(delay)
                attempt += 1

    def _grpc_timeout(self) -> dict[str, Any]:
        return {"client_timeout": self._cfg.timeout_s} if self._cfg.protocol is Protocol.GRPC else {}

    def metadata(self) -> tuple[int, list[str]]:
        """(max_batch_size, labels) of the model, read once from its config."""
        if self._meta is None:
            client = self._connect()
            kwargs = {"as_json": True, **self._grpc_timeout()} if self._cfg.protocol is Protocol.GRPC else {}
            self._meta = _parse_config(self._call(client.get_model_config, self._cfg.model, **kwargs))
        return self._meta

    @property
    def labels(self) -> list[str]:
        return self.metadata()[1]

    def is_ready(self) -> bool:
        """True if the server and the model answer ready (no retries)."""
        try:
            client = self._connect()
            return bool(client.is_server_ready() and client.is_model_ready(self._cfg.model))
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False

    def classify(self, texts: str | Sequence[str]) -> list[Prediction]:
        """Classify texts; one Prediction per text, in order."""
        items = _texts(texts)
        if not items:
            return []
        max_batch, labels = self.metadata()
        client, module = self._connect(), self._module
        results: list[Prediction] = []
        for chunk in _chunks(items, max(1, max_batch)):
            inputs, outputs = _inputs(module, chunk)
            if self._cfg.return_logits:
                outputs.append(module.InferRequestedOutput("LOGITS"))
            response = self._call(client.infer, self._cfg.model, inputs, outputs=outputs, **self._grpc_timeout())
            logits = response.as_numpy("LOGITS") if self._cfg.return_logits else None
            results += _predictions(response.as_numpy("LABEL"), response.as_numpy("PROBABILITIES"), logits, labels)
        return results

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "TextClassifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------- async client


@dataclass
class AsyncTextClassifier(_ClassifierBase):
    """The asyncio twin of TextClassifier (tritonclient.http.aio / tritonclient.grpc.aio)."""

    @property
    def _module(self):
        if self._cfg.protocol is Protocol.HTTP:
            import tritonclient.http.aio as module
        else:
            import tritonclient.grpc.aio as module
        return module

    def _connect(self):
        if self._client is None:
            if self._cfg.protocol is Protocol.HTTP:
                self._client = self._module.InferenceServerClient(self._cfg.url, conn_timeout=self._cfg.timeout_s)
            else:
                self._client = self._module.InferenceServerClient(self._cfg.url)
        return self._client

    async def _call(self, func, *args, **kwargs):
        attempt, deadline = 0, time.monotonic() + self._cfg.timeout_s
        while True:
            try:
                return await asyncio.wait_for(func(*args, **kwargs), timeout=self._cfg.timeout_s)
            except ClientError:
                raise
            except Exception as exc:  # noqa: BLE001
                error = classify_error(exc, self._cfg.url)
                if not isinstance(error, _Retry):
                    raise error from exc
                delay = self._cfg.delay(attempt)
                if attempt >= self._cfg.retries or time.monotonic() + delay > deadline:
                    raise error.error from exc
                await asyncio.sleep(delay)
                attempt += 1

    def _grpc_timeout(self) -> dict[str, Any]:
        return {"client_timeout": self._cfg.timeout_s} if self._cfg.protocol is Protocol.GRPC else {}

    async def metadata(self) -> tuple[int, list[str]]:
        if self._meta is None:
            client = self._connect()
            kwargs = {"as_json": True, **self._grpc_timeout()} if self._cfg.protocol is Protocol.GRPC else {}
            self._meta = _parse_config(await self._call(client.get_model_config, self._cfg.model, **kwargs))
        return self._meta

    async def classify(self, texts: str | Sequence[str]) -> list[Prediction]:
        """Classify texts; the chunks of a large input are sent concurrently."""
        items = _texts(texts)
        if not items:
            return []
        max_batch, labels = await self.metadata()
        client, module = self._connect(), self._module

        async def one(chunk: list[str]) -> list[Prediction]:
            inputs, outputs = _inputs(module, chunk)
            if self._cfg.return_logits:
                outputs.append(module.InferRequestedOutput("LOGITS"))
            response = await self._call(client.infer, self._cfg.model, inputs, outputs=outputs,
                                        **self._grpc_timeout())
            logits = response.as_numpy("LOGITS") if self._cfg.return_logits else None
            return _predictions(response.as_numpy("LABEL"), response.as_numpy("PROBABILITIES"), logits, labels)

        parts = await asyncio.gather(*(one(c) for c in _chunks(items, max(1, max_batch))))
        return [p for part in parts for p in part]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> "AsyncTextClassifier":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
