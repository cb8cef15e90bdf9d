"""Token logits -> entities, as ``transformers.pipeline("token-classification")`` postprocesses them (copied beside
the tagger's ``model.py`` as ``entities.py``; it imports only numpy and the standard library, so the exporter's
gate and the tests import it as ``serving.models.entities``).

It follows transformers 4.57's ``TokenClassificationPipeline`` (``gather_pre_entities``, ``aggregate``,
``aggregate_words``, ``group_entities``, ``aggregate_overlapping_entities``) with a fast tokenizer: softmax per
token in float32, special tokens left out, ``is_subword`` from the word-aware model's continuing-subword prefix
(else the pipeline's whitespace heuristic), the unknown token's word read from the text, and entities labelled
"O" dropped. The served answer is tested equal to the pipeline's (tests/test_tagger.py) for every strategy.
Offsets are character offsets into the text as sent: ``shift`` is added when the tokenizer saw a suffix of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NONE, SIMPLE, FIRST, AVERAGE, MAX = "none", "simple", "first", "average", "max"
STRATEGIES = (NONE, SIMPLE, FIRST, AVERAGE, MAX)
IGNORE_LABELS = ("O",)


@dataclass(frozen=True)
class Vocabulary:
    """What the postprocess needs of the tokenizer (a ``tokenizers.Tokenizer``): token strings, how tokens
    join into a word, whether its model marks continuing subwords, and the unknown token's id."""

    tokenizer: object
    unk_id: int | None

    @classmethod
    def of(cls, tokenizer, unk_token: str | None = None) -> "Vocabulary":
        unk = unk_token if unk_token is not None else getattr(tokenizer.model, "unk_token", None)
        return cls(tokenizer, tokenizer.token_to_id(unk) if unk else None)

    @property
    def word_aware(self) -> bool:
        return bool(getattr(self.tokenizer.model, "continuing_subword_prefix", None))

    def token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(int(token_id))

    def join(self, tokens: list[str]) -> str:
        """``convert_tokens_to_string`` of a fast tokenizer: its decoder, else the tokens joined by spaces."""
        decoder = self.tokenizer.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float32)
    shifted = np.exp(logits - np.max(logits, axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def pre_entities(text: str, encoding, scores: np.ndarray, vocab: Vocabulary, shift: int = 0) -> list[dict]:
    """One dict per non-special token of one window: word, scores, start, end (into ``text``), index, is_subword."""
    out = []
    for idx, (token_id, special, (start, end)) in enumerate(zip(encoding.ids, encoding.special_tokens_mask,
                                                                encoding.offsets)):
        if special:
            continue
        start, end = start + shift, end + shift
        word, ref = vocab.token(token_id), text[start:end]
        if vocab.word_aware:
            is_subword = len(word) != len(ref)
        else:
            is_subword = start > 0 and " " not in text[start - 1:start + 1]
        if token_id == vocab.unk_id:
            word, is_subword = ref, False
        out.append({"word": word, "scores": scores[idx], "start": start, "end": end, "index": idx,
                    "is_subword": is_subword})
    return out


def _token_entities(pre: list[dict], id2label: list[str]) -> list[dict]:
    entities = []
    for p in pre:
        j = int(p["scores"].argmax())
        entities.append({"entity": id2label[j], "score": p["scores"][j], "index": p["index"], "word": p["word"],
                         "start": p["start"], "end": p["end"]})
    return entities


def _aggregate_word(group: list[dict], strategy: str, id2label: list[str], vocab: Vocabulary) -> dict:
    if strategy == FIRST:
        scores = group[0]["scores"]
    elif strategy == MAX:
        scores = max(group, key=lambda e: e["scores"].max())["scores"]
    else:  # average
        scores = np.nanmean(np.stack([e["scores"] for e in group]), axis=0)
    j = int(scores.argmax())
    return {"entity": id2label[j], "score": scores[j], "word": vocab.join([e["word"] for e in group]),
            "start": group[0]["start"], "end": group[-1]["end"]}


def _aggregate_words(pre: list[dict], strategy: str, id2label: list[str], vocab: Vocabulary) -> list[dict]:
    words, group = [], None
    for p in pre:
        if group is None:
            group = [p]
        elif p["is_subword"]:
            group.append(p)
        else:
            words.append(_aggregate_word(group, strategy, id2label, vocab))
            group = [p]
    if group is not None:
        words.append(_aggregate_word(group, strategy, id2label, vocab))
    return words


def _tag(name: str) -> tuple[str, str]:
    if name.startswith("B-") or name.startswith("I-"):
        return name[0], name[2:]
    return "I", name


def _group(group: list[dict], vocab: Vocabulary) -> dict:
    return {"entity_group": group[0]["entity"].split("-", 1)[-1],
            "score": np.mean(np.nanmean([e["score"] for e in group])),
            "word": vocab.join([e["word"] for e in group]), "start": group[0]["start"], "end": group[-1]["end"]}


def group_entities(entities: list[dict], vocab: Vocabulary) -> list[dict]:
    """Adjacent entities of one tag grouped (a B- starts a new group), as the pipeline's ``group_entities``."""
    groups, current = [], []
    for e in entities:
        if current:
            bi, tag = _tag(e["entity"])
            if not (tag == _tag(current[-1]["entity"])[1] and bi != "B"):
                groups.append(_group(current, vocab))
                current = []
        current.append(e)
    if current:
        groups.append(_group(current, vocab))
    return groups


def window_entities(text: str, encoding, logits: np.ndarray, id2label: list[str], vocab: Vocabulary,
                    strategy: str = SIMPLE, shift: int = 0) -> list[dict]:
    """The entities of one window (its encoding and its logits [tokens, labels]), "O" left out."""
    pre = pre_entities(text, encoding, softmax(logits), vocab, shift)
    if strategy in (NONE, SIMPLE):
        entities = _token_entities(pre, id2label)
    else:
        entities = _aggregate_words(pre, strategy, id2label, vocab)
    if strategy != NONE:
        entities = group_entities(entities, vocab)
    return [e for e in entities if e.get("entity") not in IGNORE_LABELS and e.get("entity_group") not in IGNORE_LABELS]


def merge_overlapping(entities: list[dict]) -> list[dict]:
    """Entities of overlapping windows merged by offset: of two that overlap, the longer (then the higher
    score) stays, as the pipeline's ``aggregate_overlapping_entities``."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda e: e["start"])
    merged, previous = [], entities[0]
    for e in entities:
        if previous["start"] <= e["start"] < previous["end"]:
            n, m = e["end"] - e["start"], previous["end"] - previous["start"]
            if n > m or (n == m and e["score"] > previous["score"]):
                previous = e
        else:
            merged.append(previous)
            previous = e
    merged.append(previous)
    return merged


def text_entities(text: str, windows: list, logits: list, id2label: list[str], vocab: Vocabulary,
                  strategy: str = SIMPLE, shift: int = 0) -> list[dict]:
    """Entities of one text from its windows (encodings) and their logits; several windows merged by offset.
    JSON-ready: plain floats and ints."""
    found = []
    for encoding, window_logits in zip(windows, logits):
        found.extend(window_entities(text, encoding, window_logits, id2label, vocab, strategy, shift))
    if len(windows) > 1:
        found = merge_overlapping(found)
    return [{k: (float(v) if k == "score" else int(v) if k in ("start", "end", "index") else v)
             for k, v in e.items()} for e in found]
