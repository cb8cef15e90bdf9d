"""The served contract: the one module that owns model names, tensor names and dtypes, the request
encoders (KServe v2 JSON and tritonclient ``InferInput``, HTTP and gRPC), the response decoders and the
protocol enum. Every producer (exporter, repository writer, python-backend models) and every consumer
(client, supervisor canary, locustfile, bench, tune, soak) goes through it.

It imports only the standard library and numpy at module level, so ``serving.repository`` can copy it
beside the python-backend models (``<model>/1/contract.py``) and they read the same names and parameters.

A served model is described by a :class:`ServedModel`: its name, its head (single-label, multi-label,
regression, embedding), its labels, whether it takes a text pair, and its limits. The model's
``config.pbtxt`` carries that description as string parameters (:meth:`ServedModel.to_parameters`), which
both the server side and the clients read back (:meth:`ServedModel.from_config`).
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

SCHEMA_VERSION = 1

# ---------------------------------------------------------------------------------------- protocol


class ContractError(ValueError):
    """A value that breaks the served contract (bad model description, bad request, bad response)."""


class Protocol(str, enum.Enum):
    HTTP = "http"
    GRPC = "grpc"

    @property
    def default_port(self) -> int:
        return 8000 if self is Protocol.HTTP else 8001


_SCHEMES = {"http://": (Protocol.HTTP, False), "https://": (Protocol.HTTP, True),
            "grpc://": (Protocol.GRPC, False), "grpcs://": (Protocol.GRPC, True)}


@dataclass(frozen=True)
class Endpoint:
    """Where a server answers: ``host:port`` without a scheme, the protocol, and whether TLS is used."""

    address: str
    protocol: Protocol
    tls: bool = False

    @property
    def url(self) -> str:
        scheme = {Protocol.HTTP: "https" if self.tls else "http", Protocol.GRPC: "grpcs" if self.tls else "grpc"}
        return f"{scheme[self.protocol]}://{self.address}"


def parse_endpoint(url: str, protocol: Protocol | str | None = None) -> Endpoint:
    """``https://h:8000/`` -> Endpoint('h:8000', HTTP, tls=True). A scheme that contradicts ``protocol``
    is an error; without a scheme the protocol defaults to HTTP and TLS is off."""
    url = url.strip().rstrip("/")
    given = Protocol(protocol) if protocol is not None else None
    for scheme, (proto, tls) in _SCHEMES.items():
        if url.lower().startswith(scheme):
            if given is not None and given is not proto:
                raise ContractError(f"URL {url!r} is {proto.value}, but protocol {given.value} was asked for")
            url, given, found_tls = url[len(scheme):], proto, tls
            break
    else:
        found_tls = False
    if not url or "/" in url:
        raise ContractError(f"expected host:port (optionally with a scheme), got {url!r}")
    return Endpoint(url, given or Protocol.HTTP, found_tls)


# ----------------------------------------------------------------------------------------- tensors


class Head(str, enum.Enum):
    """What a served model returns (named after transformers' ``problem_type`` where one exists)."""

    SINGLE_LABEL = "single_label_classification"
    MULTI_LABEL = "multi_label_classification"
    REGRESSION = "regression"
    EMBEDDING = "embedding"
    TOKEN_CLASSIFICATION = "token_classification"  # a label per token, served as entities (a tagger)


class Aggregation(str, enum.Enum):
    """How a tagger groups its tokens into entities: ``transformers.pipeline("token-classification")``'s
    ``aggregation_strategy`` (none: one entity per token)."""

    NONE = "none"
    SIMPLE = "simple"
    FIRST = "first"
    AVERAGE = "average"
    MAX = "max"


class Activation(str, enum.Enum):
    """What a regression head's SCORE is: the logit itself (none), or an activation of it, as a
    sentence-transformers CrossEncoder's ``predict`` applies its saved ``activation_fn``."""

    NONE = "none"
    IDENTITY = "identity"
    SIGMOID = "sigmoid"
    TANH = "tanh"

    def apply(self, logits: np.ndarray) -> np.ndarray:
        x = np.asarray(logits, dtype=np.float32)
        if self is Activation.SIGMOID:
            return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)
        if self is Activation.TANH:
            return np.tanh(x)
        return x


# Wire tensors (the client contract).
TEXT, TEXT_PAIR = "TEXT", "TEXT_PAIR"
LABEL, PROBABILITIES, LOGITS, SCORE, EMBEDDING = "LABEL", "PROBABILITIES", "LOGITS", "SCORE", "EMBEDDING"
ENTITIES = "ENTITIES"  # taggers: BYTES [rows, 1], one JSON list of {entity_group|entity, score, word, start, end}
WINDOWS = "WINDOWS"  # chunked models (--long-text chunk): INT32 [rows, 1], the windows each text used
# Encoder tensors (the ONNX graph's names, fixed by the exporter).
INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS = "input_ids", "attention_mask", "token_type_ids"
ENCODER_INPUTS = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS)
ENCODER_LOGITS, ENCODER_PROBABILITIES, ENCODER_EMBEDDING = "logits", "probabilities", "embedding"

DEFAULT_CLASSIFIER = "classifier"
DEFAULT_EMBEDDER = "embedder"
DEFAULT_RERANKER = "reranker"  # the gateway's /rerank: a text-pair model with a regression head
DEFAULT_TAGGER = "tagger"  # token classification (NER)
DEFAULT_AGGREGATION = Aggregation.SIMPLE
DEFAULT_MULTI_LABEL_THRESHOLD = 0.5

_WIRE_TO_TRITON = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32", "FP16": "TYPE_FP16", "INT64": "TYPE_INT64",
                   "INT32": "TYPE_INT32", "BF16": "TYPE_BF16"}


@dataclass(frozen=True)
class Tensor:
    """One tensor of a model's signature; ``dims`` are per row (the batch dimension is implicit)."""

    name: str
    datatype: str  # KServe v2 wire type: BYTES, FP32, INT64, ...
    dims: tuple[int, ...]

    @property
    def triton_type(self) -> str:
        return _WIRE_TO_TRITON[self.datatype]


# Config parameters through which a model config carries its ServedModel (read by models and clients).
PARAM_CONTRACT = "contract"  # the whole ServedModel as JSON
PARAM_LABELS = "labels"  # JSON list in id order (kept separately: older clients and curl users read it)


@dataclass(frozen=True)
class ServedModel:
    """The contract of one served model: what goes in, what comes out, and what the outputs mean."""

    name: str = DEFAULT_CLASSIFIER
    head: Head = Head.SINGLE_LABEL
    labels: tuple[str, ...] = ()
    text_pair: bool = False
    embedding_dim: int = 0
    threshold: float = DEFAULT_MULTI_LABEL_THRESHOLD  # multi-label: a label is on when its probability >= it
    max_batch_size: int = 0  # filled from the model config when read back; 0 = unknown
    # regression: SCORE = activation(logit) (a CrossEncoder reranker); LOGITS is served beside it then
    activation: Activation = Activation.NONE
    chunked: bool = False  # --long-text chunk: long texts answered in averaged windows; WINDOWS output
    aggregation: Aggregation = DEFAULT_AGGREGATION  # taggers: how tokens become entities (only taggers carry it)

    def __post_init__(self) -> None:
        object.__setattr__(self, "head", Head(self.head))
        object.__setattr__(self, "aggregation", Aggregation(self.aggregation))
        object.__setattr__(self, "activation", Activation(self.activation))
        if self.activation is not Activation.NONE and self.head is not Head.REGRESSION:
            raise ContractError(f"an activation applies to a regression head's SCORE, not to {self.head.value}")
        object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))
        check_model_name(self.name)
        classifier = self.head in (Head.SINGLE_LABEL, Head.MULTI_LABEL, Head.TOKEN_CLASSIFICATION)
        if classifier and len(self.labels) < (2 if self.head is Head.SINGLE_LABEL else 1):
            raise ContractError(f"a {self.head.value} model needs labels, got {list(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise ContractError(f"labels must be distinct: {list(self.labels)}")
        if not classifier and self.labels and self.head is not Head.REGRESSION:
            raise ContractError(f"a {self.head.value} model has no labels")
        if self.head is Head.EMBEDDING and self.embedding_dim < 1:
            raise ContractError("an embedding model needs embedding_dim >= 1")
        if not 0.0 < self.threshold < 1.0:
            raise ContractError(f"threshold must be within (0, 1), got {self.threshold}")

    # -- signature -------------------------------------------------------------------------------
    @property
    def task(self) -> str:
        """The task the model serves: embedding, reranking (a CrossEncoder's activated SCORE) or
        classification (single-label, multi-label, regression, text pairs)."""
        if self.head is Head.EMBEDDING:
            return "embedding"
        if self.head is Head.TOKEN_CLASSIFICATION:
            return "token-classification"
        return "reranking" if self.activation is not Activation.NONE else "classification"

    @property
    def num_outputs(self) -> int:
        """Width of the head: labels for classifiers, 1 for regression, the dimension for embeddings."""
        if self.head is Head.EMBEDDING:
            return self.embedding_dim
        return 1 if self.head is Head.REGRESSION else len(self.labels)

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        text = Tensor(TEXT, "BYTES", (1,))
        return (text, Tensor(TEXT_PAIR, "BYTES", (1,))) if self.text_pair else (text,)

    @property
    def outputs(self) -> tuple[Tensor, ...]:
        n = self.num_outputs
        windows = (Tensor(WINDOWS, "INT32", (1,)),) if self.chunked else ()
        if self.head is Head.TOKEN_CLASSIFICATION:
            return (Tensor(ENTITIES, "BYTES", (1,)),)
        if self.head is Head.EMBEDDING:
            return (Tensor(EMBEDDING, "FP32", (n,)), *windows)
        if self.head is Head.REGRESSION:
            score = Tensor(SCORE, "FP32", (1,))
            return ((score,) if self.activation is Activation.NONE else (score, Tensor(LOGITS, "FP32", (1,)))) + windows
        return (Tensor(LABEL, "BYTES", (1,)), Tensor(PROBABILITIES, "FP32", (n,)), Tensor(LOGITS, "FP32", (n,)),
                *windows)

    @property
    def encoder_outputs(self) -> tuple[str, ...]:
        """The ONNX graph outputs the exporter writes for this head."""
        if self.head is Head.EMBEDDING:
            return (ENCODER_EMBEDDING,)
        if self.head in (Head.REGRESSION, Head.TOKEN_CLASSIFICATION):
            return (ENCODER_LOGITS,)
        return (ENCODER_LOGITS, ENCODER_PROBABILITIES)

    @property
    def default_outputs(self) -> tuple[str, ...]:
        """What a client asks for unless told otherwise (LOGITS only on request)."""
        return tuple(t.name for t in self.outputs if t.name not in (LOGITS, WINDOWS))

    # -- config parameters -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        doc = {"schema_version": SCHEMA_VERSION, "name": self.name, "head": self.head.value,
               "labels": list(self.labels), "text_pair": self.text_pair, "embedding_dim": self.embedding_dim,
               "threshold": self.threshold}
        if self.activation is not Activation.NONE:  # only rerankers carry it: other contracts stay as they were
            doc["activation"] = self.activation.value
        if self.chunked:
            doc["chunked"] = True
        if self.head is Head.TOKEN_CLASSIFICATION:  # only taggers carry it: other contracts stay as they were
            doc["aggregation"] = self.aggregation.value
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], max_batch_size: int = 0) -> "ServedModel":
        version = doc.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ContractError(f"contract schema_version {version} is not {SCHEMA_VERSION}")
        keys = ("name", "head", "labels", "text_pair", "embedding_dim", "threshold", "activation", "chunked",
                "aggregation")
        return cls(**{k: doc[k] for k in keys if k in doc}, max_batch_size=max_batch_size)

    def to_parameters(self) -> dict[str, str]:
        """String parameters for a model config that carry this contract."""
        params = {PARAM_CONTRACT: json.dumps(self.to_json(), sort_keys=True)}
        if self.labels:
            params[PARAM_LABELS] = json.dumps(list(self.labels))
        return params

    @classmethod
    def from_parameters(cls, params: Mapping[str, Any], name: str | None = None,
                        max_batch_size: int = 0) -> "ServedModel":
        """Read the contract back from a config's parameters ({key: str} or {key: {"string_value": str}})."""
        flat = {k: (v.get("string_value") if isinstance(v, Mapping) else getattr(v, "string_value", v))
                for k, v in params.items()}
        if flat.get(PARAM_CONTRACT):
            doc = json.loads(flat[PARAM_CONTRACT])
        elif flat.get(PARAM_LABELS):  # a repository written before the contract parameter existed
            doc = {"labels": json.loads(flat[PARAM_LABELS])}
        else:
            raise ContractError("the model config has no 'contract' parameter; is it a model this toolkit wrote?")
        if name is not None:
            doc = {**doc, "name": name}
        return cls.from_json(doc, max_batch_size=max_batch_size)

    @classmethod
    def from_config(cls, config: Any) -> "ServedModel":
        """From a model config as tritonclient returns it: HTTP dict, gRPC JSON dict or gRPC protobuf."""
        if hasattr(config, "config") and not isinstance(config, Mapping):  # gRPC protobuf response
            cfg = config.config
            return cls.from_parameters(dict(cfg.parameters), cfg.name or None, int(cfg.max_batch_size))
        cfg = config.get("config", config)
        return cls.from_parameters(cfg.get("parameters") or {}, cfg.get("name") or None,
                                   int(cfg.get("max_batch_size", 0) or 0))


def check_model_name(name: str) -> str:
    """A model name is a directory name in the repository and a URL path segment."""
    if not name or not all(c.isalnum() or c in "-_" for c in name) or name[0] in "-_":
        raise ContractError(f"model name must be letters, digits, '-' and '_' (not first), got {name!r}")
    return name


# ----------------------------------------------------------------------------------------- requests


def text_rows(texts: str | Iterable[str], what: str = "texts") -> list[str]:
    """A list of row strings; a single string is one row; anything that is not a string is an error."""
    if isinstance(texts, str):
        return [texts]
    rows = list(texts)
    bad = [i for i, t in enumerate(rows) if not isinstance(t, str)]
    if bad:
        raise ContractError(f"{what} must be strings; items {bad[:5]} are not")
    return rows


def _request_columns(texts: Sequence[str], pairs: Sequence[str] | None) -> dict[str, list[str]]:
    if not texts:
        raise ContractError("a request needs at least one text")
    columns = {TEXT: list(texts)}
    if pairs is not None:
        if len(pairs) != len(texts):
            raise ContractError(f"{len(texts)} texts but {len(pairs)} text pairs")
        columns[TEXT_PAIR] = list(pairs)
    return columns


def http_infer_body(texts: Sequence[str], pairs: Sequence[str] | None = None,
                    outputs: Sequence[str] = (LABEL, PROBABILITIES)) -> dict[str, Any]:
    """KServe v2 JSON request: BYTES tensors of shape [rows, 1]; ask for ``outputs`` (all when empty)."""
    body: dict[str, Any] = {"inputs": [
        {"name": name, "shape": [len(rows), 1], "datatype": "BYTES", "data": rows}
        for name, rows in _request_columns(texts, pairs).items()
    ]}
    if outputs:
        body["outputs"] = [{"name": name} for name in outputs]
    return body


def infer_path(model: str = DEFAULT_CLASSIFIER) -> str:
    return f"/v2/models/{model}/infer"


def infer_inputs(module: Any, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[Any]:
    """tritonclient ``InferInput`` objects (``module`` is tritonclient.http/grpc or their aio twins)."""
    out = []
    for name, rows in _request_columns(texts, pairs).items():
        data = np.array([t.encode("utf-8") for t in rows], dtype=np.object_).reshape(-1, 1)
        tensor = module.InferInput(name, list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        out.append(tensor)
    return out


def requested_outputs(module: Any, names: Sequence[str]) -> list[Any]:
    return [module.InferRequestedOutput(name) for name in names]


# ---------------------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class Prediction:
    """One row's classification: the label (multi-label: the labels that are on), the top score, and the
    probability of every label."""

    label: str
    score: float
    probabilities: dict[str, float]
    logits: list[float] | None = None
    labels: tuple[str, ...] = field(default=())  # multi-label: every label at or above the threshold

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "score": self.score, "probabilities": self.probabilities}
        if self.labels:
            out["labels"] = list(self.labels)
        if self.logits is not None:
            out["logits"] = self.logits
        return out


def decode_strings(values: Any) -> list[str]:
    """A BYTES tensor (numpy object array or JSON list) as one string per row."""
    arr = np.asarray(values, dtype=object).reshape(-1)
    return [v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v) for v in arr]


def encode_label_set(labels: Sequence[str]) -> str:
    """How a multi-label LABEL row carries its set of labels: a JSON list."""
    return json.dumps(list(labels))


def decode_label_set(value: str) -> tuple[str, ...]:
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise ContractError(f"multi-label LABEL {value!r} is not a JSON list") from exc
    if not isinstance(parsed, list):
        raise ContractError(f"multi-label LABEL {value!r} is not a JSON list")
    return tuple(str(x) for x in parsed)


def http_outputs(body: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Output name -> array shaped as the KServe v2 JSON response says."""
    if not isinstance(body, Mapping) or not isinstance(body.get("outputs"), list):
        raise ContractError("response has no 'outputs' list")
    found: dict[str, np.ndarray] = {}
    for out in body["outputs"]:
        if not isinstance(out, Mapping) or "name" not in out or "data" not in out:
            raise ContractError("malformed output entry")
        dtype = object if out.get("datatype") == "BYTES" else np.float64
        try:
            arr = np.asarray(out["data"], dtype=dtype)
            shape = out.get("shape")
            found[out["name"]] = arr.reshape(shape) if isinstance(shape, list) else arr
        except (TypeError, ValueError) as exc:
            raise ContractError(f"output {out['name']} does not match its shape: {exc}") from exc
    return found


def decode_classification(model: ServedModel, outputs: Mapping[str, Any]) -> list[Prediction]:
    """Predictions from decoded outputs (LABEL, PROBABILITIES, optional LOGITS)."""
    if model.head is Head.REGRESSION:
        raise ContractError(f"model {model.name!r} is a regression model: ask for its scores")
    labels_out, probs = outputs.get(LABEL), outputs.get(PROBABILITIES)
    if labels_out is None or probs is None:
        raise ContractError(f"response lacks {LABEL} or {PROBABILITIES}")
    probs = np.asarray(probs, dtype=np.float64).reshape(len(decode_strings(labels_out)), -1)
    logits = outputs.get(LOGITS)
    logits = None if logits is None else np.asarray(logits, dtype=np.float64).reshape(probs.shape)
    preds = []
    for i, raw in enumerate(decode_strings(labels_out)):
        probabilities = {name: float(p) for name, p in zip(model.labels, probs[i])}
        on = decode_label_set(raw) if model.head is Head.MULTI_LABEL else ()
        top = model.labels[int(np.argmax(probs[i]))] if model.labels else raw
        label = raw if model.head is Head.SINGLE_LABEL else top
        preds.append(Prediction(label=label, score=probabilities.get(label, float(np.max(probs[i]))),
                                probabilities=probabilities, labels=on,
                                logits=None if logits is None else [float(x) for x in logits[i]]))
    return preds


def decode_scores(model: ServedModel, outputs: Mapping[str, Any], n_rows: int | None = None) -> list[float]:
    """A regression model's SCORE rows as floats (one per text); ContractError when it is not one."""
    if model.head is not Head.REGRESSION:
        raise ContractError(f"model {model.name!r} has a {model.head.value} head, not regression: classify it")
    if outputs.get(SCORE) is None:
        raise ContractError(f"response lacks {SCORE}")
    scores = np.asarray(outputs[SCORE], dtype=np.float64).reshape(-1)
    if n_rows is not None and len(scores) != n_rows:
        raise ContractError(f"{SCORE} has {len(scores)} rows, expected {n_rows}")
    return [float(x) for x in scores]


@dataclass(frozen=True)
class Ranked:
    """One document of a rerank answer: its index in the request and its score (text-embeddings-inference's
    ``/rerank`` item)."""

    index: int
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "score": self.score}


def rank(scores: Sequence[float], top_k: int | None = None) -> list[Ranked]:
    """Scores as text-embeddings-inference's ``/rerank`` orders them: highest first, equal scores in request
    order, the first ``top_k`` (all when None)."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ContractError(f"top_k must be an integer >= 1, got {top_k!r}")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:top_k]
    return [Ranked(int(i), float(scores[i])) for i in order]


PROB_TOLERANCE = 1e-3


def check_classification(model: ServedModel, outputs: Mapping[str, Any], n_rows: int) -> list[str]:
    """Check a classification response against the contract; return the LABEL rows or raise ContractError.

    Every row has a LABEL and a finite PROBABILITIES row in [0, 1] with one column per label; single-label
    rows sum to 1 and their LABEL is the argmax; multi-label rows name exactly the labels >= threshold.
    """
    if outputs.get(LABEL) is None or outputs.get(PROBABILITIES) is None:
        raise ContractError(f"missing output {LABEL if outputs.get(LABEL) is None else PROBABILITIES}")
    labels = decode_strings(outputs[LABEL])
    if len(labels) != n_rows:
        raise ContractError(f"{LABEL} has {len(labels)} rows, expected {n_rows}")
    try:
        probs = np.asarray(outputs[PROBABILITIES], dtype=np.float64).reshape(n_rows, -1)
    except (TypeError, ValueError) as exc:
        raise ContractError(f"{PROBABILITIES} is not [{n_rows}, num_labels] numbers: {exc}") from exc
    if model.labels and probs.shape[1] != len(model.labels):
        raise ContractError(f"{PROBABILITIES} has {probs.shape[1]} columns for {len(model.labels)} labels")
    # min/max propagate NaN and a comparison with NaN is False, so this one test also refuses NaN and +-Inf
    if probs.size and not (probs.min() >= -PROB_TOLERANCE and probs.max() <= 1 + PROB_TOLERANCE):
        raise ContractError(f"{PROBABILITIES} has values outside [0, 1] (or NaN/Inf)")
    if model.head is Head.MULTI_LABEL:
        expected = [encode_label_set([model.labels[j] for j in np.flatnonzero(row >= model.threshold)])
                    for row in probs]
    else:
        worst = float(np.abs(probs.sum(axis=1) - 1.0).max()) if n_rows else 0.0
        if worst > PROB_TOLERANCE:
            raise ContractError(f"{PROBABILITIES} rows do not sum to 1 (off by {worst:.4f})")
        expected = [model.labels[j] for j in probs.argmax(axis=1).tolist()] if model.labels else labels
    bad = [(got, exp) for got, exp in zip(labels, expected) if got != exp]
    if bad:
        raise ContractError(f"{LABEL} {bad[0][0]!r} does not match the probabilities ({bad[0][1]!r})")
    return labels


def decode_embedding(model: ServedModel, outputs: Mapping[str, Any], n_rows: int) -> np.ndarray:
    """The EMBEDDING output as float32 [n_rows, embedding_dim]; ContractError on a wrong shape or NaN/Inf."""
    if model.head is not Head.EMBEDDING:
        raise ContractError(f"model {model.name!r} is a {model.head.value} model, not an embedding model")
    values = outputs.get(EMBEDDING)
    if values is None:
        raise ContractError(f"response lacks {EMBEDDING}")
    arr = np.asarray(values, dtype=np.float32)
    if arr.size != n_rows * model.embedding_dim:
        raise ContractError(f"{EMBEDDING} has {arr.size} values, expected {n_rows} x {model.embedding_dim}")
    arr = arr.reshape(n_rows, model.embedding_dim)
    if not np.all(np.isfinite(arr)):
        raise ContractError(f"{EMBEDDING} has NaN/Inf")
    return arr


def entity_key(aggregation: Aggregation | str) -> str:
    """The label key of an entity: ``entity`` per token (aggregation none), else ``entity_group`` (as the
    transformers pipeline names them)."""
    return "entity" if Aggregation(aggregation) is Aggregation.NONE else "entity_group"


def decode_entities(model: ServedModel, outputs: Mapping[str, Any], n_rows: int) -> list[list[dict[str, Any]]]:
    """A tagger's ENTITIES rows: per text, a list of {entity_group (entity when not aggregated), score, word,
    start, end}; ContractError on a wrong shape or a malformed row."""
    if model.head is not Head.TOKEN_CLASSIFICATION:
        raise ContractError(f"model {model.name!r} is a {model.head.value} model, not a token classifier")
    if outputs.get(ENTITIES) is None:
        raise ContractError(f"response lacks {ENTITIES}")
    rows = decode_strings(outputs[ENTITIES])
    if len(rows) != n_rows:
        raise ContractError(f"{ENTITIES} has {len(rows)} rows, expected {n_rows}")
    key, out = entity_key(model.aggregation), []
    for raw in rows:
        try:
            row = json.loads(raw)
        except ValueError as exc:
            raise ContractError(f"{ENTITIES} row is not JSON: {exc}") from exc
        if not isinstance(row, list) or not all(isinstance(e, dict) and {key, "score", "word", "start", "end"} <= set(e)
                                                for e in row):
            raise ContractError(f"{ENTITIES} row is not a list of {{{key}, score, word, start, end}}")
        out.append(row)
    return out
