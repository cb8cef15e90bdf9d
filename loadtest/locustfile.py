"""Locust users for the served classifier: KServe v2 HTTP/JSON and Triton gRPC.

Run it through ``python -m loadtest run`` or directly, e.g.::

    locust -f loadtest/locustfile.py --headless -u 32 -r 8 -t 60s --host http://127.0.0.1:8000 \
        --texts data/test.csv --texts-per-request 4 TritonHttpUser
    locust -f loadtest/locustfile.py ... --host grpc://127.0.0.1:8001 TritonGrpcUser

Each request sends ``--texts-per-request`` real texts drawn at random from ``--texts`` (a CSV with a
``text`` column; default data/test.csv, else the packaged corpus), so lengths are mixed. A request
fails when the status is not success or the answer breaks the contract (see loadtest.payload).
``--request-rate R`` paces each user at R requests/s (Locust's constant_throughput: open-ish loop);
the default 0 is a closed loop (no wait).
"""
from __future__ import annotations

# gRPC under gevent: patch grpc's IO before any channel exists (as Locust documents for gRPC users).
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

import numpy as np  # noqa: E402
from locust import FastHttpUser, User, events, task  # noqa: E402
from locust.user.wait_time import constant_throughput  # noqa: E402

from loadtest import payload  # noqa: E402
from loadtest.texts import load_texts  # noqa: E402

log = logging.getLogger(__name__)

@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("triton-textclf", "options of loadtest/locustfile.py")
    group.add_argument("--texts", type=str, env_var="LOADTEST_TEXTS", default="",
                       help="CSV with a 'text' column (default data/test.csv, else the packaged corpus)")
    group.add_argument("--texts-per-request", type=int, env_var="LOADTEST_TEXTS_PER_REQUEST", default=1,
                       help="texts (rows) per inference request")
    group.add_argument("--model-name", type=str, env_var="LOADTEST_MODEL", default=payload.MODEL,
                       help="served model to call")
    group.add_argument("--request-rate", type=float, env_var="LOADTEST_REQUEST_RATE", default=0.0,
                       help="requests/s per user (0: closed loop, no wait)")
    group.add_argument("--request-timeout", type=float, env_var="LOADTEST_REQUEST_TIMEOUT", default=30.0,
                       help="seconds before a request counts as failed")
    group.add_argument("--check-labels", type=str, env_var="LOADTEST_CHECK_LABELS", default="true",
                       help="check each LABEL is the argmax of PROBABILITIES (needs the labels parameter)")


_POOLS: dict[str, tuple[str, ...]] = {}


def text_pool(path: str | None) -> tuple[str, ...]:
    """The texts of ``path`` (default data/test.csv, else the corpus), loaded once per process.

    Users call it from on_start with the options in force, which on a distributed worker are the
    master's (so ``--texts`` must name a file that exists on every worker machine).
    """
    key = path or ""
    if key not in _POOLS:
        texts = load_texts(path or None)
        _POOLS[key] = texts.texts
        log.info("loaded %d texts from %s", len(texts.texts), texts.source)
    return _POOLS[key]


@events.init.add_listener
def _check_options(environment, **_kwargs) -> None:
    opts = environment.parsed_options
    if opts is not None and opts.texts_per_request < 1:
        raise SystemExit("--texts-per-request must be >= 1")


def _opts(user: User):
    return user.environment.parsed_options


def _wait(user: User) -> float:
    rate = getattr(_opts(user), "request_rate", 0.0) or 0.0
    return constant_throughput(rate)(user) if rate > 0 else 0.0


def _check_labels(user: User) -> bool:
    return str(getattr(_opts(user), "check_labels", "true")).lower() not in ("0", "false", "no")


def grpc_target(host: str) -> str:
    """``host:port`` for tritonclient.grpc from ``grpc://host:port``, ``http://host:port`` or ``host:port``."""
    for scheme in ("grpc://", "http://", "https://"):
        if host.startswith(scheme):
            host = host[len(scheme):]
    return host.rstrip("/")


class TritonHttpUser(FastHttpUser):
    """KServe v2 JSON over HTTP (geventhttpclient, cheap on the load generator's CPU)."""

    wait_time = _wait

    def on_start(self) -> None:
        self.rng = random.Random()
        self.pool = text_pool(_opts(self).texts)
        self.n = _opts(self).texts_per_request
        self.model = _opts(self).model_name
        self.name = payload.request_name("http", self.n)
        self.label_set = None
        if _check_labels(self):
            # fetched outside Locust's stats so the report holds inference requests only
            url = f"{self.host.rstrip('/')}/v2/models/{self.model}/config"
            with urllib.request.urlopen(url, timeout=10) as resp:
                self.label_set = payload.labels_from_model_config(json.load(resp))

    @task
    def infer(self) -> None:
        texts = payload.pick_texts(self.pool, self.n, self.rng)
        with self.client.post(
            payload.infer_path(self.model), json=payload.http_infer_body(texts), name=self.name,
            catch_response=True, timeout=_opts(self).request_timeout,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                payload.validate_http_response(resp.json(), len(texts), self.label_set)
            except (payload.InvalidResponse, ValueError) as exc:
                resp.failure(f"invalid response: {exc}")


class TritonGrpcUser(User):
    """Triton's gRPC protocol through tritonclient.grpc (gevent-patched grpc)."""

    wait_time = _wait

    def on_start(self) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.rng = random.Random()
        self.pool = text_pool(_opts(self).texts)
        self.n = _opts(self).texts_per_request
        self.model = _opts(self).model_name
        self.name = payload.request_name("grpc", self.n)
        self.client = grpcclient.InferenceServerClient(grpc_target(self.host))
        self.outputs = [grpcclient.InferRequestedOutput(payload.LABEL),
                        grpcclient.InferRequestedOutput(payload.PROBABILITIES)]
        self.label_set = None
        if _check_labels(self):
            cfg = self.client.get_model_config(self.model, as_json=True)
            self.label_set = payload.labels_from_model_config(cfg.get("config", cfg))

    def on_stop(self) -> None:
        self.client.close()

    @task
    def infer(self) -> None:
        texts = payload.pick_texts(self.pool, self.n, self.rng)
        inp = self._grpc.InferInput(payload.INPUT, [len(texts), 1], "BYTES")
        inp.set_data_from_numpy(np.array(texts, dtype=object).reshape(-1, 1))
        start = time.perf_counter()
        length, exc = 0, None
        try:
            result = self.client.infer(self.model, [inp], outputs=self.outputs,
                                       client_timeout=_opts(self).request_timeout)
            payload.validate_outputs(result.as_numpy(payload.LABEL), result.as_numpy(payload.PROBABILITIES),
                                     len(texts), self.label_set)
            length = result.get_response().ByteSize()
        except Exception as err:  # every failure is a failed request in the report
            exc = err
        self.environment.events.request.fire(
            request_type="grpc", name=self.name, response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length, exception=exc, context={},
        )
