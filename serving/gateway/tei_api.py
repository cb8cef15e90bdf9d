"""text-embeddings-inference-compatible routes: ``/embed``, ``/predict``, ``/rerank``, ``/tokenize``,
``/info``, ``/health``, and ``POST /`` (dispatched on the model's kind, as text-embeddings-inference does).

Each serves the repository's default model of its kind; ``?model=NAME`` picks another. Differences from
text-embeddings-inference, on purpose: ``/predict`` on a multi-label model answers sigmoid scores (never a
softmax); a 2-string list is one pair only for a model that takes pairs (else two texts); ``/rerank`` is served
by a text-pair model with a regression head (a CrossEncoder reranker: its served SCORE, the saved activation;
another: sigmoid of its output; ``raw_scores``: the logit); a body with ``parameters`` (the Hugging Face
Inference API form ``InferenceClient.text_classification`` sends) gets that API's answer: one list per
input, ``top_k`` and ``function_to_apply`` honoured.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from common.cli import package_version
from serving.contract import EMBEDDING, LOGITS, PROBABILITIES, SCORE, Activation, Head, ServedModel
from serving.errors import GatewayError
from serving.gateway.backend import CLASSIFIERS, ModelEntry
from serving.gateway.state import Gateway, json_response

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response


ANY_HEAD = tuple(Head)


def _json(obj: Any, status: int = 200) -> "Response":

    return json_response(obj, status)


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise GatewayError(f"'{name}' must be true or false", 422)
    return value


def _texts(value: Any, name: str = "inputs") -> tuple[list[str], bool]:
    """(rows, whether one string was sent)."""
    if isinstance(value, str):
        return [value], True
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value, False
    raise GatewayError(f"'{name}' must be a string or a list of strings", 422)


def _model(gw: "Gateway", request: "Request", default: str | None, what: str, heads) -> ModelEntry:
    return gw.models.get(request.query_params.get("model"), default, what, heads)


def _check_length(gw: "Gateway", entry: ModelEntry, texts: list[str], truncate: bool,
                  pairs: list[str] | None = None) -> None:
    """``truncate: false``: an input over the model's max_length tokens is a 413, as text-embeddings-inference."""
    if truncate:
        return
    for i, n in enumerate(entry.token_counts(texts, pairs)):
        if n > entry.max_length:
            raise GatewayError(f"input {i} has {n} tokens; the model reads at most {entry.max_length} "
                               "(send truncate: true to cut it)", 413, "too_large")


async def embed(gw: "Gateway", request: "Request") -> "Response":
    """``{"inputs", "normalize": true, "truncate": true}`` -> one vector per input."""
    body = await gw.body(request)
    entry = _model(gw, request, gw.models.embedder, "embedding", (Head.EMBEDDING,))
    return await _embed(gw, entry, body)


async def _embed(gw: "Gateway", entry: ModelEntry, body: dict[str, Any]) -> "Response":
    texts = gw.check_rows(_texts(body.get("inputs"))[0])
    normalize, truncate = _flag(body, "normalize", True), _flag(body, "truncate", True)
    _check_length(gw, entry, texts, truncate)
    vectors = (await gw.triton.infer(entry.contract, texts, None, (EMBEDDING,)))[EMBEDDING]
    vectors = vectors.reshape(len(texts), -1).astype(np.float32, copy=False)
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms > 0, norms, 1.0)
    return _json(list(vectors))


def _predict_rows(value: Any, entry: ModelEntry) -> tuple[list[str], list[str] | None, bool]:
    """(texts, pairs or None, whether a single input was sent) of /predict's ``inputs``."""
    takes_pairs = entry.contract.text_pair
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        if not all(len(v) == 2 and all(isinstance(s, str) for s in v) for v in value):
            raise GatewayError("'inputs' as a list of lists must hold [text, text_pair] pairs", 422)
        rows, single = [v[0] for v in value], False
        pairs = [v[1] for v in value]
    elif takes_pairs and isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        rows, pairs, single = [value[0]], [value[1]], True
    else:
        rows, single = _texts(value)
        pairs = None
    if takes_pairs != (pairs is not None):
        need = "[text, text_pair] pairs" if takes_pairs else "single texts, not pairs"
        raise GatewayError(f"model {entry.name!r} takes {need}", 422)
    return rows, pairs, single


def _scores(entry: ModelEntry, out: dict[str, np.ndarray], n: int, transform: str | None) -> np.ndarray:
    """[n, labels] scores: the model's probabilities, its logits (``none``), or softmax / sigmoid of them."""
    if entry.contract.head is Head.REGRESSION:
        return out[SCORE].reshape(n, 1).astype(np.float64)
    if transform is None:
        return out[PROBABILITIES].reshape(n, -1).astype(np.float64)
    logits = out[LOGITS].reshape(n, -1).astype(np.float64)
    if transform == "none":
        return logits
    if transform == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _transform(body: dict[str, Any]) -> tuple[str | None, int | None, bool]:
    """(score transform, top_k, whether the Inference API form was sent) of a /predict body."""
    params = body.get("parameters")
    if params is None:
        return ("none" if _flag(body, "raw_scores", False) else None), None, False
    if not isinstance(params, dict):
        raise GatewayError("'parameters' must be an object", 422)
    transform, top_k = params.get("function_to_apply"), params.get("top_k")
    if transform not in (None, "none", "sigmoid", "softmax"):
        raise GatewayError("function_to_apply must be one of none, sigmoid, softmax", 422)
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise GatewayError("top_k must be an integer >= 1", 422)
    return transform, top_k, True


async def predict(gw: "Gateway", request: "Request") -> "Response":
    """``{"inputs", "raw_scores": false}`` -> every label with its score, highest first, per input."""
    body = await gw.body(request)
    heads = CLASSIFIERS + (Head.REGRESSION,)
    return await _predict(gw, _model(gw, request, gw.models.classifier, "classifier", heads), body)


async def _predict(gw: "Gateway", entry: ModelEntry, body: dict[str, Any]) -> "Response":
    texts, pairs, single = _predict_rows(body.get("inputs"), entry)
    gw.check_rows(texts)
    if pairs is not None:
        gw.check_rows(pairs)
    _check_length(gw, entry, texts, _flag(body, "truncate", True), pairs)
    transform, top_k, hf_form = _transform(body)
    head = entry.contract.head
    names = (SCORE,) if head is Head.REGRESSION else ((PROBABILITIES,) if transform is None else (LOGITS,))
    out = await gw.triton.infer(entry.contract, texts, pairs, names)
    scores = _scores(entry, out, len(texts), transform)
    labels = entry.contract.labels or ("score",)
    rows = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[:top_k]
        rows.append([{"label": labels[j], "score": float(row[j])} for j in order])
    return _json(rows[0] if single and not hf_form else rows)


async def rerank(gw: "Gateway", request: "Request") -> "Response":
    """``{"query", "texts", "raw_scores", "return_text", "top_n"}`` -> ``[{"index", "score"[, "text"]}]``,
    highest score first."""
    body = await gw.body(request)
    entry = _model(gw, request, gw.models.reranker, "reranker (text-pair regression)", (Head.REGRESSION,))
    return await _rerank(gw, entry, body)


async def _rerank(gw: "Gateway", entry: ModelEntry, body: dict[str, Any]) -> "Response":
    if not entry.contract.text_pair:
        raise GatewayError(f"model {entry.name!r} does not take text pairs: it cannot rerank", 422)
    query = body.get("query")
    if not isinstance(query, str):
        raise GatewayError("'query' must be a string", 422)
    texts = gw.check_rows(_texts(body.get("texts"), "texts")[0])
    gw.check_rows([query])
    top_n = body.get("top_n")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
        raise GatewayError("top_n must be an integer >= 1", 422)
    queries = [query] * len(texts)
    _check_length(gw, entry, queries, _flag(body, "truncate", True), texts)
    scores = await _rerank_scores(gw, entry.contract, queries, texts, _flag(body, "raw_scores", False))
    with_text = _flag(body, "return_text", False)
    ranked = []
    for i in np.argsort(-scores, kind="stable")[:top_n]:
        item = {"index": int(i), "score": float(scores[i])}
        if with_text:
            item["text"] = texts[i]
        ranked.append(item)
    return _json(ranked)


async def _rerank_scores(gw: "Gateway", model: ServedModel, queries: list[str], texts: list[str],
                         raw_scores: bool) -> np.ndarray:
    """A reranker built from a CrossEncoder serves SCORE = its saved activation of LOGITS (CrossEncoder.predict):
    that SCORE, or LOGITS for raw_scores. Another text-pair regression model: its SCORE, sigmoid unless raw."""
    if model.activation is not Activation.NONE:
        name = LOGITS if raw_scores else SCORE
        return (await gw.triton.infer(model, queries, texts, (name,)))[name].reshape(-1).astype(np.float64)
    raw = (await gw.triton.infer(model, queries, texts, (SCORE,)))[SCORE].reshape(-1).astype(np.float64)
    return raw if raw_scores else 1.0 / (1.0 + np.exp(-raw))


async def tokenize(gw: "Gateway", request: "Request") -> "Response":
    """``{"inputs", "add_special_tokens": true}`` -> per input, its tokens with ids and character offsets."""
    body = await gw.body(request)
    entry = _model(gw, request, gw.models.embedder or gw.models.classifier or gw.models.reranker, "", ANY_HEAD)
    texts = gw.check_rows(_texts(body.get("inputs"))[0])
    special = _flag(body, "add_special_tokens", True)
    out = []
    for text, enc in zip(texts, entry.tokenizer().encode_batch(texts, add_special_tokens=special)):
        out.append([{"id": i, "text": tok if m else text[a:b], "special": bool(m), "start": None if m else a,
                     "stop": None if m else b}
                    for i, tok, m, (a, b) in zip(enc.ids, enc.tokens, enc.special_tokens_mask, enc.offsets)])
    return _json(out)


def _model_type(entry: ModelEntry) -> dict[str, Any]:
    c = entry.contract
    if c.head is Head.EMBEDDING:
        return {"embedding": {"dimension": c.embedding_dim}}
    if c.head is Head.REGRESSION:
        return {"reranker": {"text_pair": c.text_pair}} if c.text_pair else {"regression": {}}
    return {"classifier": {"id2label": {str(i): k for i, k in enumerate(c.labels)},
                           "label2id": {k: i for i, k in enumerate(c.labels)},
                           "multi_label": c.head is Head.MULTI_LABEL}}


async def info(gw: "Gateway", request: "Request") -> "Response":
    """The model (default: the embedder, else the classifier, else the reranker) and the gateway's caps."""
    m = gw.models
    entry = _model(gw, request, m.embedder or m.classifier or m.reranker, "", ANY_HEAD)
    return _json({"model_id": entry.name, "model_sha": None, "model_type": _model_type(entry),
                  "max_input_length": entry.max_length, "max_client_batch_size": gw.config.max_rows,
                  "max_batch_size": entry.contract.max_batch_size, "max_body_bytes": gw.config.max_body_bytes,
                  "max_text_chars": gw.config.max_text_chars, "models": list(m.entries),
                  "defaults": {"embed": m.embedder, "predict": m.classifier, "rerank": m.reranker},
                  "version": package_version(), "router": "triton-textclf gateway"})


async def health(gw: "Gateway", request: "Request") -> "Response":
    """200 when tritonserver answers ready, else 503 (no key needed: probes call it)."""
    if await gw.triton.ready():
        return _json({"status": "ok"})
    raise GatewayError("tritonserver is not ready", 503, "unhealthy")


async def root(gw: "Gateway", request: "Request") -> "Response":
    """``POST /``: /embed, /predict or /rerank by the kind of the model (``?model=``, else the embedder, else
    the classifier, else the reranker), as text-embeddings-inference's root route."""
    body = await gw.body(request)
    m = gw.models
    entry = _model(gw, request, m.embedder or m.classifier or m.reranker, "", ANY_HEAD)
    if entry.contract.head is Head.EMBEDDING:
        return await _embed(gw, entry, body)
    if entry.contract.head is Head.REGRESSION and "query" in body:
        return await _rerank(gw, entry, body)
    return await _predict(gw, entry, body)
