"""Thin client of a served model over HTTP or gRPC, sync (`TextClassifier`) and asyncio
(`AsyncTextClassifier`). No tokenizer here: the server tokenizes.

Every request is built and every response decoded through ``serving.contract``; the model's labels and
``max_batch_size`` come from its config (``ServedModel.from_config``). ``https://`` and ``grpcs://`` URLs
use TLS; nothing is ever downgraded to plaintext.

The transport (connection, retries, chunking into at most ``max_batch_size`` rows) lives in
``_SyncTransport`` / ``_AsyncTransport``; a task is a thin decode on top (``TextClassifier`` decodes
classifications; an embedder or a text-pair task adds its own decode over the same transport).
Connection failures, UNAVAILABLE (queue full / queue timeout / server starting) and Triton's 500 "Stub
process ... is not healthy" (a dead python-backend stub; see serving.supervisor) are retried as
``RetryPolicy`` says: bounded exponential backoff, at most ``retries`` times and never past ``timeout_s``
after the first attempt; errors come back as the typed exceptions of ``serving.errors``.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from serving.contract import (
    DEFAULT_CLASSIFIER,
    DEFAULT_EMBEDDER,
    DEFAULT_RERANKER,
    DEFAULT_TAGGER,
    decode_entities,
    LOGITS,
    ContractError,
    Endpoint,
    Prediction,
    Protocol,
    Ranked,
    ServedModel,
    decode_classification,
    decode_scores,
    infer_inputs,
    parse_endpoint,
    rank,
    requested_outputs,
    text_rows,
)
from serving.errors import (
    ClientError,
    InvalidInputError,
    RequestTimeoutError,
    ServerUnavailableError,
)

__all__ = ["AsyncTextClassifier", "ClientConfig", "Prediction", "Protocol", "RetryPolicy", "TextClassifier",
           "classify_error", "connect"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff: ``delays()`` yields the pause before each retry, and stops when the
    retries run out or the next pause would end past ``timeout_s`` after the first attempt."""

    retries: int = 4
    backoff_s: float = 0.1
    backoff_max_s: float = 2.0
    timeout_s: float = 30.0

    def delays(self) -> Iterator[float]:
        start = wake = time.monotonic()
        for attempt in range(self.retries):
            delay = min(self.backoff_max_s, self.backoff_s * (2 ** attempt))
            wake = max(time.monotonic(), wake) + delay  # the caller sleeps ``delay`` after this point
            if wake > start + self.timeout_s:
                return
            yield delay


@dataclass
class ClientConfig:
    """Where and how to call a served model. ``url`` may carry a scheme (``http://``, ``https://``,
    ``grpc://``, ``grpcs://``); without ``protocol`` the scheme decides (default HTTP)."""

    url: str = "127.0.0.1:8000"
    protocol: Protocol | str | None = None
    model: str = DEFAULT_CLASSIFIER
    timeout_s: float = 30.0
    retries: int = 4
    backoff_s: float = 0.1
    backoff_max_s: float = 2.0
    return_logits: bool = False
    endpoint: Endpoint = field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            Protocol(self.protocol if self.protocol is not None else Protocol.HTTP)
        except ValueError as exc:
            raise ClientError(f"protocol must be http or grpc, got {self.protocol!r}") from exc
        try:
            self.endpoint = parse_endpoint(self.url, self.protocol)
        except ContractError as exc:
            raise ClientError(str(exc)) from exc
        self.protocol, self.url = self.endpoint.protocol, self.endpoint.address
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0:
            raise ClientError("timeout_s must be > 0, retries and backoff_s >= 0")

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(self.retries, self.backoff_s, self.backoff_max_s, self.timeout_s)


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


def _server_error(status: str, message: str, url: str) -> ClientError | _Retry:
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


def classify_error(exc: BaseException, url: str) -> ClientError | _Retry:
    """Map a tritonclient / transport exception to a typed error (or a retryable one)."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, _Retry):
        return exc
    if isinstance(exc, InferenceServerException):
        return _server_error(str(exc.status() or ""), exc.message() or str(exc), url)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) or type(exc).__name__ in ("timeout", "ServerTimeoutError"):
        return RequestTimeoutError(f"{url}: no answer within the timeout ({type(exc).__name__})")
    if isinstance(exc, (ConnectionError, OSError)) or type(exc).__name__ in (
            "ClientConnectorError", "ClientOSError", "HTTPConnectionClosed"):  # the last: geventhttpclient
        return _Retry(ServerUnavailableError(f"{url}: cannot connect: {exc or type(exc).__name__}"))
    return ClientError(f"{url}: {type(exc).__name__}: {exc}")


def _next_delay(exc: Exception, url: str, delays: Iterator[float]) -> float:
    """The pause before retrying after ``exc``; raises the typed error when it is final."""
    if isinstance(exc, ClientError):
        raise exc
    error = classify_error(exc, url)
    if not isinstance(error, _Retry):
        raise error from exc
    delay = next(delays, None)
    if delay is None:
        raise error.error from exc
    log.debug("retrying in %.2f s after: %s", delay, error)
    return delay


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def tritonclient_module(protocol: Protocol, aio: bool = False) -> Any:
    """tritonclient.http / .grpc, or their asyncio twins."""
    return importlib.import_module(f"tritonclient.{Protocol(protocol).value}{'.aio' if aio else ''}")


def connect(endpoint: Endpoint, *, aio: bool = False, timeout_s: float = 60.0, conn_limit: int = 100) -> Any:
    """A tritonclient InferenceServerClient for ``endpoint``: TLS exactly when the endpoint says so."""
    module = tritonclient_module(endpoint.protocol, aio)
    if endpoint.protocol is Protocol.GRPC:
        return module.InferenceServerClient(endpoint.address, ssl=endpoint.tls)
    if aio:
        return module.InferenceServerClient(endpoint.address, conn_limit=max(1, conn_limit), conn_timeout=timeout_s,
                                            ssl=endpoint.tls)
    return module.InferenceServerClient(endpoint.address, connection_timeout=timeout_s, network_timeout=timeout_s,
                                        ssl=endpoint.tls)


def _texts(texts: str | Iterable[str]) -> list[str]:
    try:
        return text_rows(texts)
    except ContractError as exc:
        raise InvalidInputError(str(exc)) from exc


# ------------------------------------------------------------------------------------------ transport


@dataclass
class _Base(ClientConfig):
    """What the sync and asyncio clients share: their (validated) ClientConfig and connection state."""

    _client: Any = field(init=False, default=None, repr=False)
    _served: ServedModel | None = field(init=False, default=None, repr=False)
    # (output names, their InferRequestedOutput objects): built once, tritonclient only reads them
    _requested: tuple[tuple[str, ...], list[Any]] | None = field(init=False, default=None, repr=False)

    _aio = False  # the asyncio transport sets True

    @property
    def _module(self) -> Any:
        return tritonclient_module(self.protocol, self._aio)

    def _connect(self) -> Any:
        if self._client is None:
            self._client = connect(self.endpoint, aio=self._aio, timeout_s=self.timeout_s)
        return self._client

    def _grpc_timeout(self) -> dict[str, Any]:
        return {"client_timeout": self.timeout_s} if self.protocol is Protocol.GRPC else {}

    def _config_kwargs(self) -> dict[str, Any]:
        return {"as_json": True, **self._grpc_timeout()} if self.protocol is Protocol.GRPC else {}

    def _outputs(self, served: ServedModel) -> list[str]:
        names = list(served.default_outputs)
        has_logits = any(t.name == LOGITS for t in served.outputs)  # regression models serve SCORE only
        return names + [LOGITS] if self.return_logits and has_logits and LOGITS not in names else names

    def _request(self, served: ServedModel, chunk: list) -> tuple[tuple, dict[str, Any]]:
        """(args, kwargs) of ``client.infer`` for one chunk (texts, or (text, pair) tuples), built through
        the contract."""
        module = self._module
        names = tuple(self._outputs(served))
        if self._requested is None or self._requested[0] != names:
            self._requested = (names, requested_outputs(module, names))
        outputs = self._requested[1]
        texts, pairs = _split_pairs(chunk)
        return (self.model, infer_inputs(module, texts, pairs)), {"outputs": outputs, **self._grpc_timeout()}

    def _read(self, served: ServedModel, response: Any) -> dict[str, Any]:
        """The requested outputs of an answer. One that lacks any came from a failing server (seen on Triton
        2.51 as the python backend crashed under load): retried like UNAVAILABLE, since classification is
        idempotent (docs/RELIABILITY.md)."""
        outputs = {name: response.as_numpy(name) for name in self._outputs(served)}
        missing = [name for name, value in outputs.items() if value is None]
        if missing:
            raise _Retry(ServerUnavailableError(f"{self.url}: the answer lacks {missing} (a failing server)"))
        return outputs

    def _chunks(self, served: ServedModel, items: list[str]) -> Iterable[list[str]]:
        return _chunks(items, max(1, served.max_batch_size))


def _rows(texts: str | Iterable[str], pairs: str | Iterable[str] | None) -> list:
    """The request rows: texts, or (text, pair) tuples when pairs are given (one per text)."""
    items = _texts(texts)
    if pairs is None:
        return items
    second = _texts(pairs)
    if len(second) != len(items):
        raise InvalidInputError(f"{len(items)} texts but {len(second)} text pairs")
    return list(zip(items, second))


def _split_pairs(chunk: list) -> tuple[list[str], list[str] | None]:
    if chunk and isinstance(chunk[0], tuple):
        return [t for t, _ in chunk], [p for _, p in chunk]
    return chunk, None


class _SyncTransport(_Base):
    """Connection, retries and chunking for the sync clients."""

    def _call(self, func, *args, **kwargs):
        """Run ``func`` with the retry policy on connection failures and UNAVAILABLE."""
        delays = self.retry.delays()
        while True:
            try:
                return func(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - mapped to typed errors
                time.sleep(_next_delay(exc, self.url, delays))

    def served_model(self) -> ServedModel:
        """The model's contract (labels, max_batch_size), read once from its config."""
        if self._served is None:
            config = self._call(self._connect().get_model_config, self.model, **self._config_kwargs())
            try:
                self._served = ServedModel.from_config(config)
            except ContractError as exc:
                raise ClientError(f"{self.model}: {exc}") from exc
        return self._served

    def _infer(self, texts: str | Sequence[str],
               pairs: str | Sequence[str] | None = None) -> tuple[ServedModel | None, list[dict[str, Any]]]:
        """The decoded outputs of every chunk of ``texts`` (with their ``pairs``)."""
        items = _rows(texts, pairs)
        if not items:
            return self._served, []
        served, client = self.served_model(), self._connect()
        outs = []
        for chunk in self._chunks(served, items):
            args, kwargs = self._request(served, chunk)
            outs.append(self._call(lambda: self._read(served, client.infer(*args, **kwargs))))
        return served, outs

    def is_ready(self) -> bool:
        """True if the server and the model answer ready (no retries)."""
        try:
            client = self._connect()
            return bool(client.is_server_ready() and client.is_model_ready(self.model))
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _AsyncTransport(_Base):
    """Connection, retries and chunking for the asyncio clients (chunks are sent concurrently)."""

    _aio = True

    async def _call(self, func, *args, **kwargs):
        delays = self.retry.delays()
        while True:
            try:
                return await asyncio.wait_for(func(*args, **kwargs), timeout=self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - mapped to typed errors
                await asyncio.sleep(_next_delay(exc, self.url, delays))

    async def served_model(self) -> ServedModel:
        if self._served is None:
            config = await self._call(self._connect().get_model_config, self.model, **self._config_kwargs())
            try:
                self._served = ServedModel.from_config(config)
            except ContractError as exc:
                raise ClientError(f"{self.model}: {exc}") from exc
        return self._served

    async def _infer(self, texts: str | Sequence[str],
                     pairs: str | Sequence[str] | None = None) -> tuple[ServedModel | None, list[dict[str, Any]]]:
        items = _rows(texts, pairs)
        if not items:
            return self._served, []
        served, client = await self.served_model(), self._connect()

        async def one(chunk: list[str]) -> dict[str, Any]:
            args, kwargs = self._request(served, chunk)

            async def once() -> dict[str, Any]:
                return self._read(served, await client.infer(*args, **kwargs))

            return await self._call(once)

        return served, list(await asyncio.gather(*(one(c) for c in self._chunks(served, items))))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


# ------------------------------------------------------------------------------------------- tasks


def _decode_rows(decode, served: ServedModel | None, outs: list[dict[str, Any]]) -> list[Any]:
    """Every chunk's answers decoded by ``decode`` (a serving.contract decoder), in order."""
    if served is None or not outs:
        return []
    try:
        return [row for out in outs for row in decode(served, out)]
    except ContractError as exc:
        raise ClientError(f"{served.name}: {exc}") from exc


def _decode(served: ServedModel | None, outs: list[dict[str, Any]]) -> list[Prediction]:
    return _decode_rows(decode_classification, served, outs)


def _decode_scores(served: ServedModel | None, outs: list[dict[str, Any]]) -> list[float]:
    return _decode_rows(decode_scores, served, outs)


@dataclass
class TextClassifier(_SyncTransport):
    """Classify texts with a served classifier (sync)."""

    def metadata(self) -> tuple[int, list[str]]:
        """(max_batch_size, labels) of the model, read once from its config."""
        served = self.served_model()
        return served.max_batch_size, list(served.labels)

    @property
    def labels(self) -> list[str]:
        return list(self.served_model().labels)

    def classify(self, texts: str | Sequence[str], pairs: str | Sequence[str] | None = None) -> list[Prediction]:
        """Classify texts (text pairs: ``pairs[i]`` is the second text of ``texts[i]``); one Prediction per
        text, in order."""
        return _decode(*self._infer(texts, pairs))

    def score(self, texts: str | Sequence[str], pairs: str | Sequence[str] | None = None) -> list[float]:
        """A regression model's prediction (SCORE) per text (or text pair), in order."""
        return _decode_scores(*self._infer(texts, pairs))


@dataclass
class AsyncTextClassifier(_AsyncTransport):
    """The asyncio twin of TextClassifier (tritonclient.http.aio / tritonclient.grpc.aio)."""

    async def metadata(self) -> tuple[int, list[str]]:
        served = await self.served_model()
        return served.max_batch_size, list(served.labels)

    async def classify(self, texts: str | Sequence[str],
                       pairs: str | Sequence[str] | None = None) -> list[Prediction]:
        """Classify texts (or text pairs); the chunks of a large input are sent concurrently."""
        return _decode(*await self._infer(texts, pairs))


# ----------------------------------------------------------------------------------------- embedder


def _embeddings(served: ServedModel | None, outs: list[dict[str, Any]], sizes: list[int]) -> "np.ndarray":
    import numpy as np

    from serving.contract import decode_embedding

    if served is None or not outs:
        return np.zeros((0, served.embedding_dim if served is not None else 0), np.float32)
    try:
        return np.concatenate([decode_embedding(served, out, n) for out, n in zip(outs, sizes)])
    except ContractError as exc:
        raise ClientError(f"{served.name}: {exc}") from exc


def _chunk_sizes(served: ServedModel | None, texts: str | Sequence[str]) -> list[int]:
    items = _texts(texts)
    size = max(1, served.max_batch_size) if served is not None else max(1, len(items))
    return [len(c) for c in _chunks(items, size)]


@dataclass
class Embedder(_SyncTransport):
    """Embed texts with a served embedding model (sync): ``embed(texts)`` -> float32 [n, dim]."""

    model: str = DEFAULT_EMBEDDER

    @property
    def dim(self) -> int:
        return self.served_model().embedding_dim

    def embed(self, texts: str | Sequence[str]) -> "np.ndarray":
        """One row per text, in order (the server runs each row alone: a row's vector ignores its neighbours)."""
        served, outs = self._infer(texts)
        return _embeddings(served, outs, _chunk_sizes(served, texts))


@dataclass
class AsyncEmbedder(_AsyncTransport):
    """The asyncio twin of Embedder."""

    model: str = DEFAULT_EMBEDDER

    async def dim(self) -> int:
        return (await self.served_model()).embedding_dim

    async def embed(self, texts: str | Sequence[str]) -> "np.ndarray":
        served, outs = await self._infer(texts)
        return _embeddings(served, outs, _chunk_sizes(served, texts))


__all__ += ["AsyncEmbedder", "Embedder"]


def _rerank_rows(query: str, documents: str | Sequence[str], top_k: int | None) -> tuple[list[str], list[str]]:
    """([query], documents) checked before any request: one query string, string documents, top_k >= 1."""
    if not isinstance(query, str):
        raise ClientError("rerank takes one query string")
    try:
        rank([0.0], top_k)  # the same check the ranking applies
        return [query], text_rows(documents, "documents")
    except ContractError as exc:
        raise ClientError(str(exc)) from None


@dataclass
class Reranker(_SyncTransport):
    """Rerank documents for a query with a served reranker (a text-pair regression model; a CrossEncoder's
    SCORE is its saved activation, as ``CrossEncoder.predict``)."""

    model: str = DEFAULT_RERANKER

    def rerank(self, query: str, documents: str | Sequence[str], top_k: int | None = None) -> list[Ranked]:
        """The documents' (index, score), highest score first (text-embeddings-inference's /rerank order)."""
        query, docs = _rerank_rows(query, documents, top_k)
        if not docs:
            return []
        return rank(_decode_scores(*self._infer(query * len(docs), docs)), top_k)


@dataclass
class AsyncReranker(_AsyncTransport):
    """The asyncio twin of Reranker."""

    model: str = DEFAULT_RERANKER

    async def rerank(self, query: str, documents: str | Sequence[str], top_k: int | None = None) -> list[Ranked]:
        query, docs = _rerank_rows(query, documents, top_k)
        if not docs:
            return []
        return rank(_decode_scores(*(await self._infer(query * len(docs), docs))), top_k)


__all__ += ["AsyncReranker", "Reranker"]


def _decode_entities(served: ServedModel | None, outs: list[dict[str, Any]], sizes: list[int]) -> list[list[dict]]:
    if served is None or not outs:
        return []
    try:
        return [row for out, n in zip(outs, sizes) for row in decode_entities(served, out, n)]
    except ContractError as exc:
        raise ClientError(f"{served.name}: {exc}") from exc


@dataclass
class Tagger(_SyncTransport):
    """Entities of texts from a served tagger (token classification): per text, a list of {entity_group,
    score, word, start, end} (``entity`` and ``index`` per token without aggregation), character offsets into
    the text as sent, as ``transformers.pipeline("token-classification")`` answers."""

    model: str = DEFAULT_TAGGER

    def entities(self, texts: str | Sequence[str]) -> list[list[dict]]:
        rows = _texts(texts)
        served, outs = self._infer(rows)
        return _decode_entities(served, outs, [len(c) for c in self._chunks(served, rows)] if served else [])


@dataclass
class AsyncTagger(_AsyncTransport):
    """The asyncio twin of Tagger."""

    model: str = DEFAULT_TAGGER

    async def entities(self, texts: str | Sequence[str]) -> list[list[dict]]:
        rows = _texts(texts)
        served, outs = await self._infer(rows)
        return _decode_entities(served, outs, [len(c) for c in self._chunks(served, rows)] if served else [])


__all__ += ["AsyncTagger", "Tagger"]
