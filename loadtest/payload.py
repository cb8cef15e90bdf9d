"""What the load generators add to the served contract (``serving.contract`` owns requests, responses and
their checks): which texts a request carries, what it is reported as, and how strictly it is checked.

Pure functions (no locust, no tritonclient import), unit-tested alone.
"""
from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

from serving.contract import (
    LABEL,
    ContractError,
    Head,
    ServedModel,
    check_classification,
    decode_entities,
    decode_strings,
)


def request_name(protocol: str, n_texts: int) -> str:
    """The name a request is reported under, e.g. ``http infer x4``."""
    return f"{getattr(protocol, 'value', protocol)} infer x{n_texts}"


def pick_texts(pool: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """``n`` texts drawn at random from ``pool`` (so a request mixes short and long texts)."""
    if not pool:
        raise ValueError("empty text pool")
    return [pool[rng.randrange(len(pool))] for _ in range(n)]


def check_response(model: ServedModel | None, outputs: Mapping[str, Any], n_rows: int) -> list[Any]:
    """The LABEL rows of a response, checked against the model's contract (``check_classification``); a
    tagger's: its ENTITIES rows (``decode_entities``: one list of entities per text); without a model (label
    checks off) only one non-empty LABEL per text is required."""
    if model is not None and model.head is Head.TOKEN_CLASSIFICATION:
        return decode_entities(model, outputs, n_rows)
    if model is not None:
        return check_classification(model, outputs, n_rows)
    if outputs.get(LABEL) is None:
        raise ContractError(f"missing output {LABEL}")
    labels = decode_strings(outputs[LABEL])
    if len(labels) != n_rows or not all(labels):
        raise ContractError(f"{LABEL} has {len(labels)} rows (or an empty one), expected {n_rows}")
    return labels
