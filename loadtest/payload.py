"""Request bodies and response checks shared by the Locust users and the benchmark clients.

Pure functions on JSON dicts and numpy arrays (no locust, no tritonclient import), so they are unit-tested
alone. A response is valid when it has one LABEL and one PROBABILITIES row per text, every probability
row is finite, in [0, 1] and sums to 1, and (when the label set is known) each label is the argmax's.
"""
from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

import numpy as np

MODEL = "classifier"
INPUT = "TEXT"
LABEL = "LABEL"
PROBABILITIES = "PROBABILITIES"
PROB_SUM_TOLERANCE = 1e-3


class InvalidResponse(Exception):
    """The server answered, but the answer breaks the client contract."""


def infer_path(model: str = MODEL) -> str:
    return f"/v2/models/{model}/infer"


def http_infer_body(texts: Sequence[str]) -> dict[str, Any]:
    """KServe v2 JSON request: a BYTES tensor TEXT of shape [n, 1]; ask for LABEL and PROBABILITIES."""
    if not texts:
        raise ValueError("a request needs at least one text")
    return {
        "inputs": [{"name": INPUT, "shape": [len(texts), 1], "datatype": "BYTES", "data": list(texts)}],
        "outputs": [{"name": LABEL}, {"name": PROBABILITIES}],
    }


def request_name(protocol: str, n_texts: int) -> str:
    """The name a request is reported under, e.g. ``http infer x4``."""
    return f"{protocol} infer x{n_texts}"


def pick_texts(pool: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """``n`` texts drawn at random from ``pool`` (so a request mixes short and long texts)."""
    if not pool:
        raise ValueError("empty text pool")
    return [pool[rng.randrange(len(pool))] for _ in range(n)]


def validate_outputs(
    labels: Any, probabilities: Any, n_rows: int, label_set: Sequence[str] | None = None
) -> list[str]:
    """Check decoded outputs; return the labels as strings or raise InvalidResponse."""
    if labels is None:
        raise InvalidResponse(f"missing output {LABEL}")
    if probabilities is None:
        raise InvalidResponse(f"missing output {PROBABILITIES}")
    labels_arr = np.asarray(labels, dtype=object).reshape(-1)
    if labels_arr.shape[0] != n_rows:
        raise InvalidResponse(f"{LABEL} has {labels_arr.shape[0]} rows, expected {n_rows}")
    try:
        probs = np.asarray(probabilities, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidResponse(f"{PROBABILITIES} is not numeric: {exc}") from exc
    if probs.ndim == 1 and n_rows == 1:
        probs = probs.reshape(1, -1)
    if probs.ndim != 2 or probs.shape[0] != n_rows or probs.shape[1] < 2:
        raise InvalidResponse(f"{PROBABILITIES} has shape {list(probs.shape)}, expected [{n_rows}, num_labels]")
    if not np.all(np.isfinite(probs)):
        raise InvalidResponse(f"{PROBABILITIES} has NaN or Inf")
    if np.any(probs < -PROB_SUM_TOLERANCE) or np.any(probs > 1 + PROB_SUM_TOLERANCE):
        raise InvalidResponse(f"{PROBABILITIES} outside [0, 1]")
    sums = probs.sum(axis=1)
    worst = float(np.max(np.abs(sums - 1.0)))
    if worst > PROB_SUM_TOLERANCE:
        raise InvalidResponse(f"{PROBABILITIES} rows sum to {sums[np.argmax(np.abs(sums - 1.0))]:.4f}, not 1")
    out = [x.decode("utf-8") if isinstance(x, (bytes, bytearray)) else str(x) for x in labels_arr]
    if any(not s for s in out):
        raise InvalidResponse(f"empty {LABEL}")
    if label_set:
        if probs.shape[1] != len(label_set):
            raise InvalidResponse(f"{PROBABILITIES} has {probs.shape[1]} columns for {len(label_set)} labels")
        expected = [label_set[i] for i in probs.argmax(axis=1)]
        bad = [(got, exp) for got, exp in zip(out, expected) if got != exp]
        if bad:
            raise InvalidResponse(f"{LABEL} {bad[0][0]!r} is not the argmax label {bad[0][1]!r}")
    return out


def http_outputs(body: Mapping[str, Any]) -> tuple[Any, Any]:
    """(LABEL data, PROBABILITIES data reshaped) from a KServe v2 JSON response, None where missing."""
    if not isinstance(body, Mapping) or not isinstance(body.get("outputs"), list):
        raise InvalidResponse("response has no 'outputs' list")
    found: dict[str, Any] = {}
    for out in body["outputs"]:
        if not isinstance(out, Mapping) or "name" not in out or "data" not in out:
            raise InvalidResponse("malformed output entry")
        data = out["data"]
        shape = out.get("shape")
        if out["name"] == PROBABILITIES and isinstance(shape, list) and len(shape) == 2:
            try:
                data = np.asarray(data, dtype=np.float64).reshape(shape)
            except (TypeError, ValueError) as exc:
                raise InvalidResponse(f"{PROBABILITIES} data does not match shape {shape}: {exc}") from exc
        found[out["name"]] = data
    return found.get(LABEL), found.get(PROBABILITIES)


def validate_http_response(
    body: Mapping[str, Any], n_rows: int, label_set: Sequence[str] | None = None
) -> list[str]:
    """Validate a decoded KServe v2 JSON response for ``n_rows`` texts; return the labels."""
    labels, probs = http_outputs(body)
    return validate_outputs(labels, probs, n_rows, label_set)


def labels_from_model_config(config: Mapping[str, Any]) -> list[str] | None:
    """The label order from a model config's ``labels`` parameter (JSON list), if it has one."""
    import json

    params = config.get("parameters") or {}
    raw = params.get("labels")
    if isinstance(raw, Mapping):
        raw = raw.get("string_value")
    if not raw:
        return None
    try:
        labels = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return [str(x) for x in labels] if isinstance(labels, list) and labels else None
