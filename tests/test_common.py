"""common/: atomic output directories, provenance and the CLI error boundary."""
from __future__ import annotations

import hashlib
import os
import stat

import pytest

from common.atomic import atomic_directory, atomic_write_text
from common.cli import EXIT_USER_ERROR, run_cli
from common.provenance import hash_tree, sha256_file, versions


def test_atomic_directory_swaps_in_a_complete_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (target / "new.txt").exists(), "the target must not change before the block ends"
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~_umask()
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary sibling may be left behind"


def test_atomic_directory_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("late failure")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_directory_refuses_to_overwrite_when_asked(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        with atomic_directory(tmp_path / "out", overwrite=False):
            pass


def test_atomic_write_text(tmp_path):
    path = tmp_path / "a" / "b.json"
    atomic_write_text(path, "{}")
    assert path.read_text() == "{}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]


def test_hashes_and_versions(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.bin").write_bytes(b"abc")
    assert sha256_file(tmp_path / "d" / "x.bin") == hashlib.sha256(b"abc").hexdigest()
    assert hash_tree(tmp_path) == {os.path.join("d", "x.bin"): hashlib.sha256(b"abc").hexdigest()}
    found = versions(("numpy", "surely-not-installed-package"))
    assert "numpy" in found and "surely-not-installed-package" not in found and "python" in found


def test_run_cli_turns_user_errors_into_one_line(capsys):
    class UserError(Exception):
        pass

    def fails() -> int:
        raise UserError("the file x.csv has no column 'text'")

    assert run_cli(fails, (UserError,), prog="python -m tool") == EXIT_USER_ERROR
    assert capsys.readouterr().err.strip() == "python -m tool: error: the file x.csv has no column 'text'"
    with pytest.raises(ZeroDivisionError):  # bugs keep their traceback
        run_cli(lambda: 1 // 0, (UserError,), prog="python -m tool")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
