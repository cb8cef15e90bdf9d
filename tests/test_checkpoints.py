"""Issue #10, the input half: any Hugging Face checkpoint, exactly as its owner saved it, is read by
exporter.inputs the way transformers reads it, or refused before any slow work with one clear line.

Every checkpoint here is a tiny random-init model with a tokenizer trained locally (tests/checkpoint_factory.py).
"""
from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from checkpoint_factory import ARCHITECTURES, corpus
from exporter.errors import CheckpointError, EvalDataError, TokenizerError
from exporter.inputs import (Columns, check_max_length, load_checkpoint, read_checkpoint_examples, read_examples,
                             resolve_columns)
from serving.contract import Head

TEXTS = ["The movie was good.", "not very fine, really boring and long!", "café naïve über 4567 stars",
         "the " * 40 + "ending", ""]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------ 1. the tutorial checkpoint


def test_trainer_save_model_checkpoint_without_id2label_or_tokenizer(arch_checkpoint, tmp_path):
    """What the tutorial writes: Trainer.save_model of a 2-label model, no id2label, no tokenizer."""
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    source = arch_checkpoint("bert")
    model = AutoModelForSequenceClassification.from_pretrained(source)  # num_labels=2, default labels
    out = tmp_path / "finetuned_model"
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none",
                                                          use_cpu=True))
    trainer.save_model(str(out))
    config = json.loads((out / "config.json").read_text())
    assert "id2label" not in config  # transformers leaves the default labels out
    assert (out / "training_args.bin").is_file() and not (out / "tokenizer.json").exists()

    with pytest.raises(TokenizerError, match=r"has no tokenizer .*--tokenizer DIR .*--tokenizer BASE"):
        load_checkpoint(out)
    ck = load_checkpoint(out, tokenizer=source)
    assert ck.id2label == {0: "LABEL_0", 1: "LABEL_1"} and ck.head is Head.SINGLE_LABEL
    assert ck.tokenizer_dir == source and ck.load_tokenizer().is_fast

    csv = write(tmp_path / "eval.csv", "text,label\ngood,1\nbad,0\nfine,LABEL_1\n")
    ex = read_checkpoint_examples(ck, csv, Columns())
    assert ex.labels == [1, 0, 1] and ex.targets().dtype == np.int64
    with pytest.raises(EvalDataError, match="does not know: 2"):
        read_checkpoint_examples(ck, write(tmp_path / "bad.csv", "text,label\nx,2\n"), Columns())


def test_named_labels_take_names_and_ids(arch_checkpoint, tmp_path):
    ck = load_checkpoint(arch_checkpoint("bert", num_labels=3, labels=("neg", "mixed", "pos")))
    assert ck.labels == ("neg", "mixed", "pos")
    ex = read_checkpoint_examples(ck, write(tmp_path / "e.csv", "text,label\na,pos\nb,0\nc, mixed \n"), Columns())
    assert ex.labels == [2, 0, 1]
    with pytest.raises(EvalDataError, match="does not know: positive"):
        read_checkpoint_examples(ck, write(tmp_path / "f.csv", "text,label\na,positive\n"), Columns())


# --------------------------------------------------------------------------------------- 2. --tokenizer


def test_tokenizer_option(arch_checkpoint, tmp_path):
    bare = arch_checkpoint("roberta", tokenizer="none")
    with_tok = arch_checkpoint("roberta")
    ck = load_checkpoint(bare, tokenizer=str(with_tok))
    assert ck.tokenizer_dir == with_tok
    # a tokenizer.json alone (no tokenizer_config.json) is loaded for the checkpoint's model type and saved whole
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy2(with_tok / "tokenizer.json", lone / "tokenizer.json")
    ck = load_checkpoint(bare, tokenizer=lone)
    assert ck.tokenizer_dir != lone and (ck.tokenizer_dir / "tokenizer_config.json").is_file()
    assert type(ck.load_tokenizer()).__name__ == "RobertaTokenizerFast"
    assert ck.load_tokenizer()(TEXTS)["input_ids"] == load_checkpoint(with_tok).load_tokenizer()(TEXTS)["input_ids"]

    with pytest.raises(TokenizerError, match=r"--tokenizer no-such-base-model-x is neither a directory nor a model in "
                                             r"the local Hugging Face cache"):
        load_checkpoint(bare, tokenizer="no-such-base-model-x")
    with pytest.raises(TokenizerError, match="is a file"):
        load_checkpoint(bare, tokenizer=with_tok / "tokenizer.json")
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        load_checkpoint(bare, tokenizer=tmp_path)


# ------------------------------------------------------------------------------- 3. a slow tokenizer only


def test_slow_wordpiece_tokenizer_is_converted_before_any_export(arch_checkpoint, tmp_path):
    fast = arch_checkpoint("bert")
    slow = arch_checkpoint("bert", tokenizer="slow")
    assert {p.name for p in slow.iterdir()} == {"config.json", "model.safetensors", "vocab.txt"}
    ck = load_checkpoint(slow)
    scratch = ck.tokenizer_dir
    assert scratch != slow and (scratch / "tokenizer.json").is_file()  # what serving copies
    expected = load_checkpoint(fast).load_tokenizer()
    texts = corpus(50, seed=7) + TEXTS
    assert ck.load_tokenizer()(texts, texts[::-1])["input_ids"] == expected(texts, texts[::-1])["input_ids"]
    # the served tokenizer (tokenizers.Tokenizer from tokenizer.json) encodes the same ids
    from tokenizers import Tokenizer

    served = Tokenizer.from_file(str(scratch / "tokenizer.json"))
    assert [e.ids for e in served.encode_batch(texts)] == expected(texts)["input_ids"]
    del ck
    gc.collect()
    assert not scratch.exists()  # the scratch directory lives as long as the Checkpoint


def test_unconvertible_slow_tokenizer_is_refused(arch_checkpoint, tmp_path):
    ck_dir = copy(arch_checkpoint("albert", tokenizer="none"), tmp_path / "albert")
    (ck_dir / "spiece.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="cannot be loaded as a fast tokenizer"):
        load_checkpoint(ck_dir)


# ------------------------------------------------------------------------------------------- 4. columns


def test_columns_from_the_training_record_and_options(arch_checkpoint, tmp_path):
    ck_dir = copy(arch_checkpoint("bert", labels=("no", "yes")), tmp_path / "ck")
    assert resolve_columns(load_checkpoint(ck_dir)) == Columns("text", "label")
    write(ck_dir / "metrics.json", json.dumps({"columns": {"text": "review", "label": "sentiment", "text_pair": None}}))
    ck = load_checkpoint(ck_dir)
    assert resolve_columns(ck) == Columns("review", "sentiment")
    assert resolve_columns(ck, label="stars") == Columns("review", "stars")
    write(ck_dir / "metrics.json", json.dumps({"args": {"text_column": "tweet", "label_column": "y"}}))  # older record
    assert resolve_columns(load_checkpoint(ck_dir)) == Columns("tweet", "y")

    csv = write(tmp_path / "e.csv", "review,sentiment\ngreat,yes\nawful,no\n")
    assert read_checkpoint_examples(ck, csv, resolve_columns(ck)).labels == [1, 0]
    with pytest.raises(EvalDataError, match=r"lacks column\(s\) text, label \(has: review, sentiment\); name the "
                                            r"columns with --text-column/--label-column"):
        read_checkpoint_examples(ck, csv, Columns())
    with pytest.raises(Exception, match="must differ"):
        Columns("a", "a")


def test_exporter_cli_takes_the_new_options(arch_checkpoint, tmp_path, capsys):
    """The flags reach BuildConfig and exporter.inputs: bad values fail as one line, exit 2, before export."""
    from exporter.cli import main

    bare = arch_checkpoint("roberta", tokenizer="none")
    csv = write(tmp_path / "e.csv", "review,sentiment\ngreat,1\nawful,0\n")
    out = tmp_path / "build"
    base = ["build", str(bare), "--eval-data", str(csv), "--out", str(out), "--no-repository", "--max-length", "64"]

    def run(*extra: str) -> str:
        assert main([*base, *extra]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("python -m exporter")]
        assert len(err) == 1 and "error" in err[0] and not out.exists(), err
        return err[0]

    assert "--tokenizer DIR" in run()
    tok = str(arch_checkpoint("roberta"))
    assert "lacks column(s) text, label" in run("--tokenizer", tok)
    assert "--max-length 100 is longer than the position table" in run(
        "--tokenizer", tok, "--text-column", "review", "--label-column", "sentiment", "--max-length", "100")
    assert "lacks column(s) x" in run(  # text pairs are built; the pair column must exist
        "--tokenizer", tok, "--text-column", "review", "--label-column", "sentiment", "--text-pair-column", "x")


# ------------------------------------------------------------------------------------- 5. --max-length


@pytest.mark.parametrize("arch, limit", [("bert", 64), ("roberta", 64), ("xlm-roberta", 64), ("distilbert", 64)])
def test_position_limit_is_the_real_one(arch_checkpoint, arch, limit):
    """The limit is exact: the PyTorch model runs `limit` tokens and fails on one more."""
    import torch
    from transformers import AutoModelForSequenceClassification

    path = arch_checkpoint(arch)
    ck = load_checkpoint(path, max_length=limit)
    assert ck.max_positions == limit
    with pytest.raises(CheckpointError, match=rf"--max-length {limit + 1} is longer .* at most {limit} tokens; pass "
                                              rf"--max-length {limit} or less"):
        load_checkpoint(path, max_length=limit + 1)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = torch.full((1, limit), 5)
    with torch.inference_mode():
        assert model(input_ids=ids).logits.shape == (1, 2)
        with pytest.raises((IndexError, RuntimeError)):
            model(input_ids=torch.full((1, limit + 1), 5))


def test_relative_position_deberta_has_no_absolute_limit(arch_checkpoint, tmp_path):
    ck_dir = copy(arch_checkpoint("deberta-v2"), tmp_path / "deb")
    config = json.loads((ck_dir / "config.json").read_text())
    assert load_checkpoint(ck_dir).max_positions == 64  # position_biased_input: absolute positions too
    write(ck_dir / "config.json", json.dumps({**config, "position_biased_input": False}))
    ck = load_checkpoint(ck_dir, max_length=512)
    assert ck.max_positions is None
    check_max_length(ck, 4096)


# --------------------------------------------------------------------------------------------- 6. weights


def test_sharded_safetensors_are_accepted(arch_checkpoint, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    sharded = arch_checkpoint("bert", max_shard_size="20KB")
    shards = sorted(p.name for p in sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()
    ck = load_checkpoint(sharded)
    assert ck.architecture == "BertForSequenceClassification"
    single = AutoModelForSequenceClassification.from_pretrained(arch_checkpoint("bert")).eval()
    loaded = AutoModelForSequenceClassification.from_pretrained(sharded).eval()
    batch = ck.load_tokenizer()(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = single(**batch).logits
        assert torch.equal(expected, loaded(**batch).logits)  # same seed, same weights
    import onnxruntime as ort

    from exporter.export import export_onnx

    sess = ort.InferenceSession(str(export_onnx(sharded, tmp_path / "onnx")), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {k: v.numpy() for k, v in batch.items()})
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4)

    broken = copy(sharded, tmp_path / "missing")
    (broken / shards[-1]).unlink()
    with pytest.raises(CheckpointError, match=rf"shard {shards[-1]} named by model.safetensors.index.json is missing"):
        load_checkpoint(broken)
    truncated = copy(sharded, tmp_path / "truncated")
    data = (truncated / shards[0]).read_bytes()
    (truncated / shards[0]).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(truncated)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"]["extra.weight"] = shards[0]
    lying = copy(sharded, tmp_path / "lying")
    write(lying / "model.safetensors.index.json", json.dumps(index))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\) the index maps to it \(e.g. extra.weight\)"):
        load_checkpoint(lying)


def test_pickle_weights_are_refused_with_why_and_how(arch_checkpoint, tmp_path):
    ck_dir = copy(arch_checkpoint("bert"), tmp_path / "pickled")
    (ck_dir / "model.safetensors").rename(ck_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model.bin\).*can run any code.*"
                                              r"save_pretrained\(.*safe_serialization=True\)"):
        load_checkpoint(ck_dir)


# ----------------------------------------------------------------------------------------------- 7. heads


def test_multi_label_head_is_read(arch_checkpoint, tmp_path):
    path = arch_checkpoint("bert", num_labels=3, labels=("sports", "politics", "tech"),
                           problem_type="multi_label_classification")
    with pytest.raises(CheckpointError, match="multi_label_classification head .* would be silently wrong"):
        load_checkpoint(path, heads=(Head.SINGLE_LABEL,))
    ck = load_checkpoint(path)
    assert ck.head is Head.MULTI_LABEL and ck.labels == ("sports", "politics", "tech")
    csv = write(tmp_path / "ml.csv", 'text,label\na,sports|tech\nb,"[""politics""]"\nc,[]\nd,2|0|2\ne,"[1, ""tech""]"\n')
    ex = read_checkpoint_examples(ck, csv, Columns())
    assert ex.labels == [[0, 2], [1], [], [0, 2], [1, 2]]
    assert ex.targets().tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 0, 1], [0, 1, 1]]
    assert ex.targets().dtype == np.float32
    served = ck.served_model()
    assert served.head is Head.MULTI_LABEL and served.labels == ck.labels and served.num_outputs == 3
    with pytest.raises(EvalDataError, match="does not know: weather"):
        read_checkpoint_examples(ck, write(tmp_path / "bad.csv", "text,label\na,sports|weather\n"), Columns())


@pytest.mark.parametrize("problem_type", [None, "regression"])
def test_regression_head_is_read(arch_checkpoint, tmp_path, problem_type):
    path = arch_checkpoint("bert", num_labels=1, problem_type=problem_type)
    with pytest.raises(CheckpointError, match="regression head .* not export regression heads yet"):
        load_checkpoint(path, heads=(Head.SINGLE_LABEL,))
    ck = load_checkpoint(path)
    assert ck.head is Head.REGRESSION
    ex = read_checkpoint_examples(ck, write(tmp_path / "r.csv", "text,label\na,0.25\nb,-3\nc,1e2\n"), Columns())
    assert ex.targets().tolist() == [0.25, -3.0, 100.0] and ex.targets().dtype == np.float32
    assert ck.served_model(text_pair=True).outputs[0].name == "SCORE"
    with pytest.raises(EvalDataError, match="not finite numbers: high, nan"):
        read_checkpoint_examples(ck, write(tmp_path / "b.csv", "text,label\na,high\nb,nan\n"), Columns())


def test_unknown_problem_type_is_refused(arch_checkpoint, tmp_path):
    ck_dir = copy(arch_checkpoint("bert"), tmp_path / "ck")
    config = json.loads((ck_dir / "config.json").read_text())
    write(ck_dir / "config.json", json.dumps({**config, "problem_type": "ranking"}))
    with pytest.raises(CheckpointError, match="unknown problem_type 'ranking'"):
        load_checkpoint(ck_dir)


def test_truncation_side_fixture_reaches_the_reference_tokenizer(arch_checkpoint):
    """The fixture for the served-tokenizer half of #10: a checkpoint whose tokenizer truncates on the left."""
    ck = load_checkpoint(arch_checkpoint("bert", truncation_side="left"))
    config = json.loads((ck.tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["truncation_side"] == "left"
    tok = ck.load_tokenizer()
    long_text = " ".join(["good"] * 80 + ["awful"])
    ids = tok(long_text, truncation=True, max_length=16)["input_ids"]
    assert len(ids) == 16 and tok.convert_ids_to_tokens(ids)[-2] == "awful"  # the end survives


# ------------------------------------------------------------------------------------------ 8. text pairs


def test_text_pair_column_reads_a_second_text(tmp_path):
    csv = write(tmp_path / "nli.csv", 'premise,hypothesis,label\n"A man, eating",A person eats,yes\nB,,no\nC,D,\n')
    ex = read_examples(csv, {"no": 0, "yes": 1}, columns=Columns("premise", "label", "hypothesis"))
    assert ex.texts == ["A man, eating", "B"] and ex.pairs == ["A person eats", ""] and ex.labels == [1, 0]
    assert ex.head(1).pairs == ["A person eats"]
    assert read_examples(csv, {"no": 0, "yes": 1}, columns=Columns("premise", "label")).pairs is None
    with pytest.raises(EvalDataError, match=r"lacks column\(s\) second"):
        read_examples(csv, {"no": 0, "yes": 1}, columns=Columns("premise", "label", "second"))


# ----------------------------------------------------------------------------------- 9. architecture matrix


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architecture_loads_and_onnx_matches_pytorch(arch_checkpoint, arch, tmp_path):
    """Each architecture with its own kind of tokenizer loads through exporter.inputs, and Optimum's ONNX
    export (exporter/export.py) gives PyTorch's logits on single texts and on text pairs."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForSequenceClassification

    from exporter.export import export_onnx

    path = arch_checkpoint(arch)
    ck = load_checkpoint(path, max_length=64)
    assert ck.tokenizer_dir == path and ck.model_type == arch and ck.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    tok = ck.load_tokenizer()
    assert tok.is_fast and (path / "tokenizer.json").is_file()
    onnx_path = export_onnx(path, tmp_path / "onnx")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    for pairs in (None, TEXTS[::-1]):
        batch = tok(TEXTS, pairs, padding=True, truncation=True, max_length=64, return_tensors="np")
        feed = {i.name: batch[i.name].astype(np.int64) if i.name in batch else np.zeros_like(batch["input_ids"])
                for i in sess.get_inputs()}
        logits, probabilities = sess.run(["logits", "probabilities"], feed)
        with torch.inference_mode():
            expected = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
        assert np.abs(expected).max() > 1e-3  # a random head gives logits worth comparing


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize("arch, saved", [("bert", "none"), ("roberta", "none"), ("bert", "slow")])
def test_build_takes_a_tutorial_checkpoint(arch_checkpoint, arch, saved, tmp_path):
    """exporter build on what a tutorial leaves: no tokenizer (--tokenizer), no id2label, 0/1 labels in the
    user's own columns; slow-tokenizer checkpoints build from the converted tokenizer (fp32 only, to be quick)."""
    from exporter.build import build
    from exporter.config import BuildConfig
    from serving.repository import validate_repository

    rows = "".join(f'"{t}",{i % 2}\n' for i, t in enumerate(corpus(60, seed=3)))
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        write(data / f"{split}.csv", "review,sentiment\n" + rows)
    config = BuildConfig(checkpoint=arch_checkpoint(arch, tokenizer=saved), out=tmp_path / "build",
                         repository=tmp_path / "repo", precisions=("fp32",), eval_data=data / "test.csv",
                         max_length=64, speed_seconds=0.2,
                         tokenizer=str(arch_checkpoint(arch)) if saved == "none" else None,
                         text_column="review", label_column="sentiment")
    result = build(config)
    assert result.exit_code == 0 and result.report["labels"] == ["LABEL_0", "LABEL_1"]
    assert result.report["reference"]["n_examples"] == 60
    assert validate_repository(tmp_path / "repo") is not None  # the tokenizer it copied was found
