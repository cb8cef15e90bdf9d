"""Tiny random-init sequence classifiers of each architecture, with tokenizers trained here, saved the ways
users save them. Nothing is downloaded: the tokenizer corpus is generated text.

``make_checkpoint(out, "roberta")`` trains a byte-level BPE tokenizer, builds a 2-layer RoBERTa classifier
over its vocabulary and saves both with ``save_pretrained`` (what ``Trainer.save_model`` with a tokenizer
writes). Options reproduce the other ways a checkpoint arrives: no tokenizer, a slow tokenizer only
(``vocab.txt``), no ``id2label`` (a 2-label tutorial model), sharded weights, other heads.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

ARCHITECTURES = ("bert", "distilbert", "roberta", "electra", "xlm-roberta", "albert", "deberta-v2")
WORDS = ("the movie was good bad great awful fine boring long short plot actor scene music story ending film "
         "really not very quite loved hated liked enjoyed watched again never always some many people think "
         "café naïve über déjà vu 123 4567 review star stars rating worth time money").split()
HIDDEN = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Generated sentences over a small vocabulary (with accents and digits), reproducible."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))).capitalize() + rng.choice(".!?")
            for _ in range(n)]


@dataclass(frozen=True)
class _Spec:
    kind: str  # tokenizer model: wordpiece, bpe, unigram
    specials: tuple[str, ...]  # in id order
    cls: str
    sep: str
    pair_sep: tuple[str, ...]  # tokens between the two texts of a pair, after the first text's sep
    pair_type: int  # token type of the second text
    fast_class: str
    config_class: str
    model_class: str


_WORDPIECE = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_SPECS = {
    "bert": _Spec("wordpiece", _WORDPIECE, "[CLS]", "[SEP]", (), 1, "BertTokenizerFast", "BertConfig",
                  "BertForSequenceClassification"),
    "distilbert": _Spec("wordpiece", _WORDPIECE, "[CLS]", "[SEP]", (), 0, "DistilBertTokenizerFast",
                        "DistilBertConfig", "DistilBertForSequenceClassification"),
    "electra": _Spec("wordpiece", _WORDPIECE, "[CLS]", "[SEP]", (), 1, "ElectraTokenizerFast", "ElectraConfig",
                     "ElectraForSequenceClassification"),
    "roberta": _Spec("bpe", ("<s>", "<pad>", "</s>", "<unk>", "<mask>"), "<s>", "</s>", ("</s>",), 0,
                     "RobertaTokenizerFast", "RobertaConfig", "RobertaForSequenceClassification"),
    "xlm-roberta": _Spec("unigram", ("<s>", "<pad>", "</s>", "<unk>", "<mask>"), "<s>", "</s>", ("</s>",), 0,
                         "XLMRobertaTokenizerFast", "XLMRobertaConfig", "XLMRobertaForSequenceClassification"),
    "albert": _Spec("unigram", ("<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"), "[CLS]", "[SEP]", (), 1,
                    "AlbertTokenizerFast", "AlbertConfig", "AlbertForSequenceClassification"),
    "deberta-v2": _Spec("unigram", ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"), "[CLS]", "[SEP]", (), 1,
                        "DebertaV2TokenizerFast", "DebertaV2Config", "DebertaV2ForSequenceClassification"),
}


def train_tokenizer(arch: str, texts: list[str] | None = None, vocab_size: int = 300):
    """A ``tokenizers.Tokenizer`` of the architecture's kind, trained on ``texts`` (default: :func:`corpus`)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    spec = _SPECS[arch]
    texts = texts if texts is not None else corpus()
    unk = next(t for t in spec.specials if "unk" in t.lower())
    if spec.kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=unk))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(spec.specials))
    elif spec.kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(spec.specials),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]) if arch == "albert" \
            else normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(spec.specials), unk_token=unk)
    tok.train_from_iterator(texts, trainer)
    if spec.kind == "bpe":
        tok.post_processor = processors.RobertaProcessing((spec.sep, tok.token_to_id(spec.sep)),
                                                          (spec.cls, tok.token_to_id(spec.cls)))
    else:
        ids = {t: tok.token_to_id(t) for t in (spec.cls, spec.sep)}
        mid = " ".join(f"{t}:{spec.pair_type}" for t in spec.pair_sep)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.cls} $A {spec.sep}",
            pair=f"{spec.cls} $A {spec.sep} {mid} $B:{spec.pair_type} {spec.sep}:{spec.pair_type}".replace("  ", " "),
            special_tokens=list(ids.items()))
    return tok


@functools.lru_cache(maxsize=None)
def _trained(arch: str) -> str:
    """One trained tokenizer per architecture and process (training breaks frequency ties differently from
    run to run, so two checkpoints of one architecture share it to be comparable)."""
    return train_tokenizer(arch).to_str()


def fast_tokenizer(arch: str, texts: list[str] | None = None):
    """The trained tokenizer wrapped in the architecture's transformers fast-tokenizer class."""
    import transformers
    from tokenizers import Tokenizer

    spec = _SPECS[arch]
    tok = train_tokenizer(arch, texts) if texts is not None else Tokenizer.from_str(_trained(arch))
    named = {f"{k}_token": next(t for t in spec.specials if k in t.lower()) for k in ("pad", "unk", "mask")}
    named.update(cls_token=spec.cls, sep_token=spec.sep)
    if spec.kind != "wordpiece":
        named.update(bos_token=spec.cls, eos_token=spec.sep)
    return getattr(transformers, spec.fast_class)(tokenizer_object=tok, **named)


def model_config(arch: str, tokenizer, *, num_labels: int = 2, labels: tuple[str, ...] | None = None,
                 problem_type: str | None = None, max_positions: int = 64):
    """A tiny config of the architecture over ``tokenizer``'s vocabulary."""
    import transformers

    spec = _SPECS[arch]
    kw = dict(vocab_size=len(tokenizer), num_labels=num_labels, pad_token_id=tokenizer.pad_token_id,
              max_position_embeddings=max_positions, initializer_range=0.2)
    if labels is not None:
        kw.update(id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    if problem_type is not None:
        kw["problem_type"] = problem_type
    if arch == "distilbert":
        kw.update(dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    else:
        kw.update(HIDDEN)
    if arch in ("roberta", "xlm-roberta"):
        kw.update(max_position_embeddings=max_positions + tokenizer.pad_token_id + 1, bos_token_id=0, eos_token_id=2)
    if arch in ("albert", "electra"):
        kw["embedding_size"] = 16
    if arch == "deberta-v2":
        kw.update(relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"])
    return getattr(transformers, spec.config_class)(**kw)


def make_checkpoint(out: Path, arch: str = "bert", *, seed: int = 0, num_labels: int = 2,
                    labels: tuple[str, ...] | None = None, problem_type: str | None = None,
                    tokenizer: str = "fast", max_shard_size: str | None = None, max_positions: int = 64,
                    truncation_side: str | None = None) -> Path:
    """Save a random-init classifier: ``tokenizer`` is ``fast`` (tokenizer.json etc.), ``none`` (what
    ``Trainer.save_model`` writes without one) or ``slow`` (``vocab.txt`` only, WordPiece architectures).
    ``truncation_side="left"`` lands in tokenizer_config.json (the served tokenizer must honour it)."""
    import torch
    import transformers

    spec = _SPECS[arch]
    torch.manual_seed(seed)
    tok = fast_tokenizer(arch)
    config = model_config(arch, tok, num_labels=num_labels, labels=labels, problem_type=problem_type,
                          max_positions=max_positions)
    model = getattr(transformers, spec.model_class)(config).eval()
    out = Path(out)
    if max_shard_size is not None:
        model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(out, safe_serialization=True)
    if truncation_side is not None:
        tok.truncation_side = tok.init_kwargs["truncation_side"] = truncation_side  # init_kwargs: what is saved
    if tokenizer == "fast":
        tok.save_pretrained(out)
    elif tokenizer == "slow":
        if spec.kind != "wordpiece":
            raise ValueError(f"a vocab.txt-only tokenizer is a WordPiece one, not {arch}'s")
        vocab = tok.backend_tokenizer.get_vocab()
        (out / "vocab.txt").write_text("".join(f"{t}\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])),
                                       encoding="utf-8")
    elif tokenizer != "none":
        raise ValueError(f"tokenizer must be fast, slow or none, got {tokenizer!r}")
    return out
