"""Length-aware tokenization of the python-backend models (copied beside each ``model.py`` as
``tokenization.py``; it imports no Triton module, so the tests and the bench import it as
``serving.models.tokenization``).

Any text is answered as the checkpoint saves it (``truncation=True`` at ``max_length`` on its truncation
side; text pairs ``longest_first``), and its cost is bounded by cutting the text BEFORE tokenizing:

**The cut.** A text longer than a first guess is tokenized in growing prefixes (a suffix for left truncation;
each doubling the last) without special tokens and without truncation. A prefix is accepted once the tokens
that cannot touch the cut number at least ``need`` (``max_length`` when truncating; every token the ``K``
windows read when chunking). A token cannot touch the cut when it belongs to a pre-tokenized word that is
not the last one of the prefix and ends at least ``margin`` characters (the longest added token) before it.

**Why it keeps every surviving token.** The fast tokenizer runs, per text: added-token split, normalizer,
pre-tokenizer, model (per pre-tokenized word), post-processor. The normalizers and pre-tokenizers of the
checkpoints served here (BERT/WordPiece, ByteLevel BPE, Metaspace/Unigram) decide each character's fate from
that character and its neighbours (clean/lowercase/strip accents/NFx, split on whitespace/punctuation/a
regex), and the model tokenizes each word on its own. So the words of a prefix before its last word are words
of the whole text, split and tokenized exactly as in the whole text: the prefix's last word may be a piece of
a longer word (or of an NFx composition, or of a whitespace run) and an added token may straddle the cut,
which is why both are left out. The stable tokens are therefore the first tokens of the whole text, and when
they number >= ``need`` every token that truncation (or the first ``K`` windows) keeps is among them. Text
pairs: ``longest_first`` never keeps more than ``max_length`` tokens of either text, so each text is cut on
its own; when both texts are cut and the budget is odd, which text gets the odd token depends on which is
longer, so then both are tokenized whole (bounded by the request-size cap). A checkpoint whose pre-tokenizer
makes one word of everything (Metaspace without split) never accepts a prefix: its texts are tokenized whole.
Tested against truncating the whole text: ``tests/test_long_text.py``.

**Windows** (``long_text`` "chunk"): the content tokens (no special tokens) cut into windows of ``width`` =
max_length - the special tokens' count, consecutive windows overlapping by ``overlap`` tokens, at most
``max_windows`` of them, the first ones on the truncation side; each window wrapped with the special tokens
(the tokenizer's own post-processor). Text pairs: the first text (truncated to at most half the pair's
content budget) is repeated in every window and the second text is windowed in the rest.
"""
from __future__ import annotations

from dataclasses import dataclass

TRUNCATE, CHUNK = "truncate", "chunk"
CHARS_PER_TOKEN_GUESS = 6  # the first prefix: 6 characters per needed token (English WordPiece averages 4-5)


@dataclass(frozen=True)
class RowTokens:
    """What one row cost: real tokens fed to the encoder (all windows), tokens computed (padding included;
    equal on the CPU target, which runs each window alone at its own length), whether tokens of the text
    were left out (truncation, or more windows than ``max_windows``), and the windows it used."""

    input_tokens: int
    computed_tokens: int
    truncated: bool
    windows: int


@dataclass
class Windows:
    """One row as the encoder runs it: one encoding (ids, type_ids, attention_mask) per window."""

    encodings: list
    tokens: RowTokens
    shift: int = 0  # characters of the text before the piece the encodings' offsets refer to (left cut)


def _stable_prefix(enc, size: int, margin: int) -> int:
    """How many leading tokens of a prefix's encoding cannot touch its end (see the module docstring)."""
    words = enc.word_ids
    known = [w for w in words if w is not None]
    if not known:
        return 0
    last = max(known)
    for i, (word, (_, end)) in enumerate(zip(words, enc.offsets)):
        if word is None or word >= last or end > size - margin:
            return i
    return len(words)


def _stable_suffix(enc, margin: int) -> int:
    """How many trailing tokens of a suffix's encoding cannot touch its start."""
    words = enc.word_ids
    known = [w for w in words if w is not None]
    if not known:
        return 0
    first = min(known)
    for i, (word, (start, _)) in enumerate(zip(reversed(words), reversed(enc.offsets))):
        if word is None or word <= first or start < margin:
            return i
    return len(words)


class LengthTokenizer:
    """The checkpoint's tokenizer (a ``tokenizers.Tokenizer`` from tokenizer.json; copied, not changed) with
    the cut and the windows. ``encode(text, pair)`` -> :class:`Windows`."""

    def __init__(self, tokenizer, max_length: int, side: str = "right", *, long_text: str = TRUNCATE,
                 overlap: int = 0, max_windows: int = 1):
        from tokenizers import Tokenizer

        self.max_length, self.side, self.left = int(max_length), side, side == "left"
        self.long_text, self.overlap, self.max_windows = long_text, int(overlap), int(max_windows)
        self.probe = Tokenizer.from_str(tokenizer.to_str())  # no truncation, no padding: the cut's tool
        self.probe.no_truncation()
        self.probe.no_padding()
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())  # the saved truncation: the answer's tool
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_length, direction=side)
        self.specials = self.probe.num_special_tokens_to_add(False)
        self.pair_specials = self.probe.num_special_tokens_to_add(True)
        added = [t.content for t in self.probe.get_added_tokens_decoder().values()]
        self.margin = max([len(a) for a in added] + [0]) + 1
        self.width = self.max_length - self.specials
        if long_text not in (TRUNCATE, CHUNK):
            raise ValueError(f"long_text must be {TRUNCATE!r} or {CHUNK!r}, got {long_text!r}")
        if long_text == CHUNK and not (0 <= self.overlap <= self.width // 2 and self.max_windows >= 1):
            raise ValueError(f"overlap {overlap} must be within 0..{self.width // 2} (half a window) and "
                             f"max windows {max_windows} >= 1")

    def cut(self, text: str, need: int):
        """(the kept piece of ``text``, its encoding without special tokens, its stable token count, whether
        it was cut): a piece that was cut has >= ``need`` stable tokens, the first tokens of the whole text
        on the truncation side; an uncut piece is the whole text (every token stable)."""
        size = max(need * CHARS_PER_TOKEN_GUESS, 64)
        while size < len(text):
            piece = text[len(text) - size:] if self.left else text[:size]
            enc = self.probe.encode(piece, add_special_tokens=False)
            stable = _stable_suffix(enc, self.margin) if self.left else _stable_prefix(enc, size, self.margin)
            if stable >= need:
                return piece, enc, stable, True
            size *= 2
        enc = self.probe.encode(text, add_special_tokens=False)
        return text, enc, len(enc.ids), False

    def encode(self, text: str, pair: str | None = None) -> Windows:
        """The row as the encoder runs it (one encoding per window) and what it cost."""
        if self.long_text == CHUNK:
            return self._windows(text) if pair is None else self._pair_windows(text, pair)
        piece, enc, stable, cut = self.cut(text, self.max_length)
        if pair is None:  # the cut's encoding, truncated and with the special tokens: encode(piece), not redone
            out = self.tokenizer.post_process(enc)
            return _one(out, cut or len(enc.ids) > self.width, self._shift(text, piece))
        second, enc2, stable2, cut2 = self.cut(pair, self.max_length)
        budget = self.max_length - self.pair_specials
        if _odd_token_unknown(budget, stable, cut, stable2, cut2):
            out = self._whole_pair(enc, enc2, text, pair, budget)  # the longer text gets the odd token: count both whole
        else:  # both cuts' encodings, truncated longest-first and with the special tokens: encode(piece, second)
            out = self.tokenizer.post_process(enc, enc2)
        return _one(out, cut or cut2 or len(enc.ids) + len(enc2.ids) > self.max_length - self.pair_specials)

    def _shift(self, text: str, piece: str) -> int:
        """Characters of ``text`` before ``piece`` (a suffix when truncating on the left, else a prefix)."""
        return len(text) - len(piece) if self.left else 0

    def _whole_pair(self, enc, enc2, text: str, pair: str, budget: int):
        """The kept tokens of two cut texts when which one is longer decides: both texts are counted whole (no
        truncation: a pair's overflow grows as the product of the lengths), then each cut piece keeps what
        ``longest_first`` keeps of the whole (its first tokens on the truncation side are the whole's)."""
        n1 = len(self.probe.encode(text, add_special_tokens=False).ids)
        n2 = len(self.probe.encode(pair, add_special_tokens=False).ids)
        k1, k2 = longest_first(n1, n2, budget)
        return self.probe.post_process(_cut_to(enc, k1, self.side), _cut_to(enc2, k2, self.side), True)

    def _windows(self, text: str) -> Windows:
        need = self.width + (self.max_windows - 1) * (self.width - self.overlap)
        piece, enc, _, cut = self.cut(text, need + 1)  # one more: a cut text truly has tokens left over
        more = cut or _covers(len(enc.ids), self.width, self.overlap) > self.max_windows
        pieces = _slide(enc, self.width, self.overlap, self.max_windows, self.side)  # all within the stable
        encodings = [self.probe.post_process(p, None, True) for p in pieces]
        return _many(encodings, more, self._shift(text, piece))

    def _pair_windows(self, text: str, pair: str) -> Windows:
        budget = self.max_length - self.pair_specials
        _, enc, _, cut = self.cut(text, budget // 2 + 1)
        n_first = len(enc.ids)
        head = _cut_to(enc, budget // 2, self.side)
        width = budget - len(head.ids)
        overlap = min(self.overlap, width // 2)
        need = width + (self.max_windows - 1) * (width - overlap)
        _, enc2, _, cut2 = self.cut(pair, need + 1)
        more = cut or cut2 or n_first > budget // 2 or _covers(len(enc2.ids), width, overlap) > self.max_windows
        pieces = _slide(enc2, width, overlap, self.max_windows, self.side)
        encodings = [self.probe.post_process(head, p, True) for p in pieces]
        return _many(encodings, more)


def _one(enc, truncated: bool, shift: int = 0) -> Windows:
    n = len(enc.ids)
    return Windows([enc], RowTokens(n, n, bool(truncated), 1), shift)


def _many(encodings: list, truncated: bool, shift: int = 0) -> Windows:
    n = sum(len(e.ids) for e in encodings)
    return Windows(encodings, RowTokens(n, n, bool(truncated), len(encodings)), shift)


def _odd_token_unknown(budget: int, n1: int, cut1: bool, n2: int, cut2: bool) -> bool:
    """True when longest_first's odd token (it goes to the longer text; the second on a tie) could go to the
    other text than in the whole texts: an odd budget, and a cut text that is not surely the longer one.
    ``n1``/``n2``: a cut text's STABLE token count (its whole text has at least that many; the piece's own
    count can be higher than the whole's, e.g. a prefix of a 300-character word is many WordPieces where the
    whole word is one [UNK]), an uncut text's exact count."""
    if budget % 2 == 0 or not (cut1 or cut2):
        return False
    if cut1 and cut2:
        return True
    return (n2 >= n1) if cut1 else (n1 >= n2)


def longest_first(n1: int, n2: int, budget: int) -> tuple[int, int]:
    """Tokens of each text that ``longest_first`` truncation keeps (the tokenizers library's rule: the
    shorter keeps what it has up to half, the longer the rest; an odd half-split's extra token goes to the
    longer text, to the second on a tie)."""
    if n1 + n2 <= budget:
        return n1, n2
    swap = n1 > n2
    a, b = (n2, n1) if swap else (n1, n2)
    b = a if a > budget else max(a, budget - a)
    if a + b > budget:
        a = budget // 2
        b = a + budget % 2
    k1, k2 = (b, a) if swap else (a, b)
    return min(k1, n1), min(k2, n2)


def _cut_to(enc, count: int, side: str):
    """``enc`` (fresh from the tokenizer: no overflow) truncated in place to ``count`` tokens on ``side``."""
    if len(enc.ids) > count:
        enc.truncate(count, 0, side)
    return enc


def _covers(n: int, width: int, overlap: int) -> int:
    """Windows needed to cover ``n`` content tokens (1 for an empty text)."""
    if n <= width:
        return 1
    return 1 + -(-(n - width) // (width - overlap))


def _slide(enc, width: int, overlap: int, max_windows: int, side: str) -> list:
    """The first ``max_windows`` windows of ``enc`` on ``side``: tokenizers' own stride truncation (each
    window repeats the last ``overlap`` tokens of the one before); ``enc`` is truncated in place."""
    if len(enc.ids) <= width:
        return [enc]
    enc.truncate(width, overlap, side)
    return [enc] + list(enc.overflowing)[:max_windows - 1]
