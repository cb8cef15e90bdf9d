"""The suite's own machinery for pytest-xdist (tests/conftest.py): the turn an ``alone`` test takes, and the export
cache the workers share."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

from conftest import _reusing, _turn


def _worker_config(tmp_path: Path, monkeypatch, worker: str = "gw0") -> SimpleNamespace:
    """What a worker's config holds: xdist gives each worker ``<the run's base temp>/popen-gwN`` as --basetemp."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    return SimpleNamespace(option=SimpleNamespace(basetemp=str(tmp_path / f"popen-{worker}")))


def test_an_alone_test_waits_for_the_running_test_and_the_next_one_waits_for_it(tmp_path, monkeypatch):
    config = _worker_config(tmp_path, monkeypatch)
    events: list[str] = []

    def take(name: str, alone: bool, hold_s: float) -> threading.Thread:
        def run():
            with _turn(config, alone):
                events.append(f"{name} in")
                time.sleep(hold_s)
                events.append(f"{name} out")
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    first = take("shared", False, 0.4)  # the other worker's test, running
    time.sleep(0.1)
    alone = take("alone", True, 0.3)  # waits for it, holding the gate
    time.sleep(0.1)
    after = take("next", False, 0.0)  # queued behind the alone test, not beside it
    for thread in (first, alone, after):
        thread.join(10)
    assert events == ["shared in", "shared out", "alone in", "alone out", "next in", "next out"]


def test_shared_turns_overlap_and_nothing_locks_without_xdist(tmp_path, monkeypatch):
    config = _worker_config(tmp_path, monkeypatch)
    with _turn(config, False), _turn(config, False):  # two workers' ordinary tests run side by side
        pass
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    with _turn(config, True), _turn(config, True):  # a serial run takes no lock
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["turn.gate.lock", "turn.run.lock"]


def test_two_workers_exporting_the_same_checkpoint_publish_one_whole_export(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    cache = tmp_path / "exports"
    cache.mkdir()
    started = threading.Barrier(2)

    def real(ckpt, scratch, target, data, seconds):
        started.wait(5)  # both workers find no export and export at once
        out = Path(scratch) / "optimized"
        out.mkdir(parents=True)
        (out / "model.onnx").write_bytes(b"graph of " + Path(scratch).name.encode())
        return out / "model.onnx", {"by": Path(scratch).name}

    export = _reusing(cache, real)
    got = {}
    threads = [threading.Thread(target=lambda n=n: got.__setitem__(n, export(checkpoint, tmp_path / n, "cpu")))
               for n in ("gw0", "gw1")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert {n: r[1]["by"] for n, r in got.items()} == {"gw0": "gw0", "gw1": "gw1"}  # each used its own export
    (done,) = cache.iterdir()  # one published export, no staged leftovers
    winner = done.joinpath("optimized", "model.onnx").read_bytes()
    assert winner in (b"graph of gw0", b"graph of gw1")
    path, record = _reusing(cache, real)(checkpoint, tmp_path / "later", "cpu")  # a later build copies it whole
    assert path.read_bytes() == winner and record["by"] == winner.split()[-1].decode()
