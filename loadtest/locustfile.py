"""Locust users for a served classifier or embedder: KServe v2 HTTP/JSON and Triton gRPC.

Run it through ``python -m loadtest run`` or directly; without a user class named, the host's scheme picks
one (``http://``/``https://`` -> TritonHttpUser, ``grpc://``/``grpcs://`` -> TritonGrpcUser)::

    locust -f loadtest/locustfile.py --headless -u 32 -r 8 -t 60s --host http://127.0.0.1:8000 \
        --texts data/test.csv --texts-per-request 4
    locust -f loadtest/locustfile.py ... --host grpc://127.0.0.1:8001

With ``--model-name`` naming an embedding model (say ``embedder``), the embedding users run instead
(TritonEmbedHttpUser / TritonEmbedGrpcUser: every answer must be a finite FP32 [rows, dim] EMBEDDING); naming
a text-pair model (say ``reranker``), the rerank users (TritonRerankHttpUser / TritonRerankGrpcUser: one
query and ``--texts-per-request`` documents a request, one finite SCORE per document); naming a tagger (say
``tagger``), the tag users (TritonTagHttpUser / TritonTagGrpcUser: ENTITIES, one JSON list of entities per text).

Each request sends ``--texts-per-request`` real texts drawn at random from ``--texts`` (a CSV with a
``text`` column; default data/test.csv, else the packaged corpus), so lengths are mixed. Requests are
built and answers checked through ``serving.contract``; a request fails when the status is not success
or the answer breaks the contract. ``--request-rate R`` paces each user at R requests/s (Locust's
constant_throughput: open-ish loop); the default 0 is a closed loop (no wait).
"""
from __future__ import annotations

# gRPC under gevent: patch grpc's IO before any channel exists (as Locust documents for gRPC users).
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import ssl  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

from locust import FastHttpUser, User, events, task  # noqa: E402
from locust.runners import WorkerRunner  # noqa: E402
from locust.user.wait_time import constant_throughput  # noqa: E402

from loadtest import payload  # noqa: E402
from loadtest.long_docs import long_documents  # noqa: E402
from loadtest.run import USER_CLASS  # noqa: E402
from loadtest.texts import load_texts  # noqa: E402
from serving.client import TextClassifier  # noqa: E402
from serving.contract import (  # noqa: E402
    DEFAULT_CLASSIFIER,
    EMBEDDING,
    ENTITIES,
    LABEL,
    SCORE,
    Activation,
    ContractError,
    Head,
    Protocol,
    ServedModel,
    decode_embedding,
    decode_entities,
    decode_scores,
    http_infer_body,
    http_outputs,
    infer_inputs,
    infer_path,
    parse_endpoint,
    requested_outputs,
)

log = logging.getLogger(__name__)

@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("triton-textclf", "options of loadtest/locustfile.py")
    group.add_argument("--texts", type=str, env_var="LOADTEST_TEXTS", default="",
                       help="CSV with a 'text' column (default data/test.csv, else the packaged corpus)")
    group.add_argument("--texts-per-request", type=int, env_var="LOADTEST_TEXTS_PER_REQUEST", default=1,
                       help="texts (rows) per inference request")
    group.add_argument("--long-texts", type=int, env_var="LOADTEST_LONG_TEXTS", default=0,
                       help="send long documents instead: a pool of N texts of 2,000-50,000 characters joined from "
                            "--texts (0: the texts as they are)")
    group.add_argument("--model-name", type=str, env_var="LOADTEST_MODEL", default=DEFAULT_CLASSIFIER,
                       help="served model to call")
    group.add_argument("--request-rate", type=float, env_var="LOADTEST_REQUEST_RATE", default=0.0,
                       help="requests/s per user (0: closed loop, no wait)")
    group.add_argument("--request-timeout", type=float, env_var="LOADTEST_REQUEST_TIMEOUT", default=30.0,
                       help="seconds before a request counts as failed")
    group.add_argument("--check-labels", type=str, env_var="LOADTEST_CHECK_LABELS", default="true",
                       help="check every answer against the model's contract (labels from its config)")
    group.add_argument("--client-retries", type=int, env_var="LOADTEST_CLIENT_RETRIES", default=12,
                       help="TritonClientUser: retries of serving.client (backoff from 0.2 s, all within "
                            "--request-timeout)")


_POOLS: dict[str, tuple[str, ...]] = {}


def text_pool(path: str | None, long_texts: int = 0) -> tuple[str, ...]:
    """The texts of ``path`` (default data/test.csv, else the corpus), loaded once per process; with
    ``long_texts`` N, N long documents (2k-50k characters) joined from them (loadtest/long_docs.py).

    Users call it from on_start with the options in force, which on a distributed worker are the
    master's (so ``--texts`` must name a file that exists on every worker machine).
    """
    key = f"{path or ''}\x00{long_texts}"
    if key not in _POOLS:
        texts = load_texts(path or None)
        pool = texts.texts
        if long_texts > 0:
            pool = tuple(long_documents(pool, long_texts))
        _POOLS[key] = pool
        log.info("loaded %d texts from %s%s", len(pool), texts.source, " (long documents)" if long_texts else "")
    return _POOLS[key]


@events.init.add_listener
def _check_options(environment, runner=None, **_kwargs) -> None:
    opts = environment.parsed_options
    if opts is not None and opts.texts_per_request < 1:
        raise SystemExit("--texts-per-request must be >= 1")
    if opts is not None and not getattr(opts, "user_classes", None) and not isinstance(runner, WorkerRunner):
        _pick_user_class(environment)


def _pick_user_class(environment) -> None:
    """No user class named: keep the one the host's scheme calls for (a worker follows its master)."""
    if not environment.host or len(environment.user_classes) < 2:
        return
    try:
        protocol = parse_endpoint(environment.host).protocol
    except ContractError as exc:
        raise SystemExit(f"--host: {exc}") from exc
    served = _served_contract(environment.host, getattr(environment.parsed_options, "model_name", DEFAULT_CLASSIFIER))
    wanted = task_users(served).users[protocol]
    environment.user_classes[:] = [u for u in environment.user_classes if u.__name__ == wanted]
    log.info("host %s: running %s", environment.host, wanted)


def _opts(user: User):
    return user.environment.parsed_options


def _wait(user: User) -> float:
    rate = getattr(_opts(user), "request_rate", 0.0) or 0.0
    return constant_throughput(rate)(user) if rate > 0 else 0.0


def _check_labels(user: User) -> bool:
    return str(getattr(_opts(user), "check_labels", "true")).lower() not in ("0", "false", "no")


def served_model(user: User, fetch) -> ServedModel | None:
    """The model's contract from ``fetch()`` (its config), or None when label checks are off."""
    return ServedModel.from_config(fetch()) if _check_labels(user) else None


def _setup(user: User, protocol: Protocol) -> None:
    user.rng = random.Random()
    user.pool = text_pool(_opts(user).texts, getattr(_opts(user), "long_texts", 0) or 0)
    user.n = _opts(user).texts_per_request
    user.model = _opts(user).model_name
    user.name = payload.request_name(protocol.value, user.n)


class TritonHttpUser(FastHttpUser):
    """KServe v2 JSON over HTTP (geventhttpclient, cheap on the load generator's CPU); https:// uses TLS."""

    wait_time = _wait

    def on_start(self) -> None:
        _setup(self, Protocol.HTTP)
        url = f"{self.host.rstrip('/')}/v2/models/{self.model}/config"

        def fetch() -> dict:  # outside Locust's stats so the report holds inference requests only
            with urllib.request.urlopen(url, timeout=10, context=ssl.create_default_context()) as resp:
                return json.load(resp)

        self.served = served_model(self, fetch)
        self.body_outputs = self.served.default_outputs if self.served else (LABEL,)

    @task
    def infer(self) -> None:
        texts = payload.pick_texts(self.pool, self.n, self.rng)
        with self.client.post(
            infer_path(self.model), json=http_infer_body(texts, outputs=self.body_outputs), name=self.name,
            catch_response=True, timeout=_opts(self).request_timeout,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                check_answer(self.served, http_outputs(resp.json()), len(texts))
            except (ContractError, ValueError) as exc:
                resp.failure(f"invalid response: {exc}")


_GRPC_CLIENTS: list = []  # every gRPC client this process made, closed at the latest when Locust quits


def grpc_client(endpoint):
    """A tritonclient gRPC client that is closed explicitly (on_stop, or when Locust quits), never from the
    garbage collector: tritonclient's ``__del__`` closes the channel again, and under gevent that can block
    the interpreter's shutdown for good (seen here: Locust runs that never exited)."""
    import tritonclient.grpc as grpcclient

    class _Client(grpcclient.InferenceServerClient):
        closed = False

        def close(self) -> None:
            if not self.closed:
                self.closed = True
                super().close()

        def __del__(self) -> None:
            pass

    client = _Client(endpoint.address, ssl=endpoint.tls)
    _GRPC_CLIENTS.append(client)
    return client


@events.quitting.add_listener
def _close_grpc_clients(**_kwargs) -> None:
    while _GRPC_CLIENTS:
        _GRPC_CLIENTS.pop().close()


class TritonGrpcUser(User):
    """Triton's gRPC protocol through tritonclient.grpc (gevent-patched grpc); grpcs:// uses TLS."""

    wait_time = _wait

    def on_start(self) -> None:
        import tritonclient.grpc as grpcclient

        _setup(self, Protocol.GRPC)
        self._grpc = grpcclient
        endpoint = parse_endpoint(self.host, Protocol.GRPC)
        self.client = grpc_client(endpoint)
        self.served = served_model(self, lambda: self.client.get_model_config(self.model, as_json=True))
        names = self.served.default_outputs if self.served else (LABEL,)
        self.outputs = requested_outputs(grpcclient, names)
        self.output_names = names

    def on_stop(self) -> None:
        self.client.close()

    @task
    def infer(self) -> None:
        texts = payload.pick_texts(self.pool, self.n, self.rng)
        start = time.perf_counter()
        length, exc = 0, None
        try:
            result = self.client.infer(self.model, infer_inputs(self._grpc, texts), outputs=self.outputs,
                                       client_timeout=_opts(self).request_timeout)
            check_answer(self.served, {n: result.as_numpy(n) for n in self.output_names}, len(texts))
            length = result.get_response().ByteSize()
        except Exception as err:  # every failure is a failed request in the report
            exc = err
        self.environment.events.request.fire(
            request_type="grpc", name=self.name, response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length, exception=exc, context={},
        )



class TritonClientUser(User):
    """Requests through ``serving.client.TextClassifier`` with its retry policy (``--client-retries``, backoff
    from 0.2 s, all within ``--request-timeout``): a request fails only when the client gives up, and its
    time includes the retries, which is what an application sees (``loadtest soak --chaos``). The host's
    scheme picks HTTP or gRPC. An answer is correct when its label is one of the model's and, for a text
    this user asked before, the same label as then (rows run alone, so a text's answer does not change;
    do not roll out a new version during such a run)."""

    wait_time = _wait

    def on_start(self) -> None:
        endpoint = parse_endpoint(self.host)
        _setup(self, endpoint.protocol)
        self.request_type = f"client-{endpoint.protocol.value}"
        opts = _opts(self)
        self.client = TextClassifier(self.host, model=self.model, retries=opts.client_retries, backoff_s=0.2,
                                     timeout_s=opts.request_timeout)
        self.labels = set(self.client.served_model().labels) if _check_labels(self) else None
        self.seen: dict[str, str] = {}

    def on_stop(self) -> None:
        self.client.close()

    def _check(self, texts, predictions) -> None:
        if len(predictions) != len(texts):
            raise ContractError(f"{len(predictions)} answers to {len(texts)} texts")
        for text, p in zip(texts, predictions):
            if self.labels is not None and p.label not in self.labels:
                raise ContractError(f"label {p.label!r} is not one of the model's")
            if self.seen.setdefault(text, p.label) != p.label:
                raise ContractError(f"answer changed: {self.seen[text]!r} before, {p.label!r} now")

    @task
    def infer(self) -> None:
        texts = payload.pick_texts(self.pool, self.n, self.rng)
        start = time.perf_counter()
        exc = None
        try:
            self._check(texts, self.client.classify(texts))
        except Exception as err:  # noqa: BLE001 - every failure is a failed request in the report
            exc = err
        self.environment.events.request.fire(
            request_type=self.request_type, name=self.name, response_time=(time.perf_counter() - start) * 1000.0,
            response_length=0, exception=exc, context={},
        )


# ------------------------------------------------------------------------------------------ embeddings

EMBED_USER_CLASS = {Protocol.HTTP: "TritonEmbedHttpUser", Protocol.GRPC: "TritonEmbedGrpcUser"}


def check_answer(model: ServedModel | None, outputs, n_rows: int) -> None:
    """Check an answer against the model's contract: by its task's check (:data:`TASK_USERS`: embeddings by shape
    and finiteness, entities by their fields), classifications through loadtest.payload."""
    check = task_users(model).check
    if check is not None:
        check(model, outputs, n_rows)
        return
    if model is None and EMBEDDING in outputs:
        if len(outputs[EMBEDDING]) == 0 or not all(len(row) for row in outputs[EMBEDDING]):
            raise ContractError(f"{EMBEDDING} has an empty row")
        return
    payload.check_response(model, outputs, n_rows)


def _served_contract(host: str, model: str) -> ServedModel | None:
    """The served ``model``'s contract (asked only for a model other than the default classifier, so plain
    ``locust -f`` runs as before); None when the server cannot tell."""
    if not model or model == DEFAULT_CLASSIFIER:
        return None
    try:
        endpoint = parse_endpoint(host)
        if endpoint.protocol is Protocol.HTTP:
            url = f"{endpoint.url}/v2/models/{model}/config"
            with urllib.request.urlopen(url, timeout=10, context=ssl.create_default_context()) as resp:
                config = json.load(resp)
        else:
            client = grpc_client(endpoint)
            try:
                config = client.get_model_config(model, as_json=True)
            finally:
                client.close()
        return ServedModel.from_config(config)
    except Exception as exc:  # noqa: BLE001 - the classifier users stay, their checks report the problem
        log.warning("cannot read the config of %s at %s (%s): running the classifier users", model, host, exc)
        return None


class TritonEmbedHttpUser(TritonHttpUser):
    """An embedding model over KServe v2 HTTP/JSON: TEXT rows in, EMBEDDING [rows, dim] out."""

    def on_start(self) -> None:
        super().on_start()
        self.body_outputs = (EMBEDDING,)


class TritonEmbedGrpcUser(TritonGrpcUser):
    """An embedding model over Triton gRPC."""

    def on_start(self) -> None:
        super().on_start()
        self.outputs = requested_outputs(self._grpc, (EMBEDDING,))
        self.output_names = (EMBEDDING,)


# --------------------------------------------------------------------------------------------- taggers

TAG_USER_CLASS = {Protocol.HTTP: "TritonTagHttpUser", Protocol.GRPC: "TritonTagGrpcUser"}


def check_entities(model: ServedModel, outputs, n_rows: int) -> None:
    """A tagger's answer: one JSON list of entities per text, each with a known label, a score in [0, 1] and
    offsets start <= end (a float32 softmax may round a hair above 1)."""
    key, labels = ("entity" if model.aggregation.value == "none" else "entity_group"), set(model.labels)
    groups = {label.split("-", 1)[-1] for label in labels}
    for row in decode_entities(model, outputs, n_rows):
        for e in row:
            if e[key] not in labels | groups or not 0.0 <= e["score"] <= 1.0 + 1e-6 or not 0 <= e["start"] <= e["end"]:
                raise ContractError(f"{ENTITIES}: bad entity {e}")


class TritonTagHttpUser(TritonHttpUser):
    """A tagger (token classification) over KServe v2 HTTP/JSON: TEXT rows in, ENTITIES out."""

    def on_start(self) -> None:
        super().on_start()
        self.body_outputs = (ENTITIES,)


class TritonTagGrpcUser(TritonGrpcUser):
    """A tagger over Triton gRPC."""

    def on_start(self) -> None:
        super().on_start()
        self.outputs = requested_outputs(self._grpc, (ENTITIES,))
        self.output_names = (ENTITIES,)


# ------------------------------------------------------------------------------------------- rerankers

RERANK_USER_CLASS = {Protocol.HTTP: "TritonRerankHttpUser", Protocol.GRPC: "TritonRerankGrpcUser"}


def check_scores(model: ServedModel | None, outputs, n_rows: int) -> None:
    """A reranker's answer: one finite SCORE per document (within [0, 1] after a sigmoid)."""
    scores = decode_scores(model, outputs, n_rows) if model is not None else list(outputs[SCORE].reshape(-1))
    if len(scores) != n_rows or not all(math.isfinite(x) for x in scores):
        raise ContractError(f"{SCORE}: expected {n_rows} finite scores, got {scores[:4]}")
    if model is not None and model.activation is Activation.SIGMOID and not all(0.0 <= x <= 1.0 for x in scores):
        raise ContractError(f"{SCORE} outside [0, 1] after a sigmoid")


class TritonRerankHttpUser(FastHttpUser):
    """A reranker (a text-pair model) over KServe v2 HTTP/JSON: one query and ``--texts-per-request``
    documents per request (TEXT = the query on every row, TEXT_PAIR = the documents), SCORE rows out.
    (Not a TritonHttpUser subclass: Locust would run that class's classify task too.)"""

    wait_time = _wait
    on_start = TritonHttpUser.on_start

    @task
    def infer(self) -> None:
        query, *docs = payload.pick_texts(self.pool, self.n + 1, self.rng)
        body = http_infer_body([query] * len(docs), docs, outputs=(SCORE,))
        with self.client.post(infer_path(self.model), json=body, name=self.name, catch_response=True,
                              timeout=_opts(self).request_timeout) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                check_scores(self.served, http_outputs(resp.json()), len(docs))
            except (ContractError, ValueError) as exc:
                resp.failure(f"invalid response: {exc}")


class TritonRerankGrpcUser(User):
    """A reranker over Triton gRPC (one query, ``--texts-per-request`` documents a request)."""

    wait_time = _wait
    on_start = TritonGrpcUser.on_start
    on_stop = TritonGrpcUser.on_stop

    @task
    def infer(self) -> None:
        query, *docs = payload.pick_texts(self.pool, self.n + 1, self.rng)
        start, length, exc = time.perf_counter(), 0, None
        try:
            result = self.client.infer(self.model, infer_inputs(self._grpc, [query] * len(docs), docs),
                                       outputs=requested_outputs(self._grpc, (SCORE,)),
                                       client_timeout=_opts(self).request_timeout)
            check_scores(self.served, {SCORE: result.as_numpy(SCORE)}, len(docs))
            length = result.get_response().ByteSize()
        except Exception as err:  # every failure is a failed request in the report
            exc = err
        self.environment.events.request.fire(
            request_type="grpc", name=self.name, response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length, exception=exc, context={},
        )


# ------------------------------------------------------------------------------------- users per served task


@dataclass(frozen=True)
class TaskUsers:
    """The Locust users (per protocol) that load one kind of served model, and how the plain users check its
    answers (None: loadtest.payload's classification check)."""

    users: dict[Protocol, str]
    check: Callable[[ServedModel, dict, int], None] | None = None


PAIR = "text_pair"  # a text-pair classifier (a CrossEncoder) is loaded as a reranker
CLASSIFIER_USERS = TaskUsers(USER_CLASS)
# Keyed by the served model's head (serving.contract), or PAIR: a new task adds its entry here.
TASK_USERS: dict[str, TaskUsers] = {
    Head.EMBEDDING.value: TaskUsers(EMBED_USER_CLASS, decode_embedding),
    Head.TOKEN_CLASSIFICATION.value: TaskUsers(TAG_USER_CLASS, check_entities),
    PAIR: TaskUsers(RERANK_USER_CLASS),
}


def task_users(served: ServedModel | None) -> TaskUsers:
    """The users and answer check of ``served`` (None, or a classifier head: the classifier's)."""
    if served is None:
        return CLASSIFIER_USERS
    return TASK_USERS.get(PAIR if served.text_pair else served.head.value, CLASSIFIER_USERS)
