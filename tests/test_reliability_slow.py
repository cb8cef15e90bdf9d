"""Slow reliability checks (not in `make test`): a real SIGINT to the exporter at a late stage, and a
short real soak through `python -m loadtest soak`."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serving_helpers import corpus_texts, export_tiny_onnx

from common.provenance import hash_tree
from serving.repository import RepositoryConfig, write_repository

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def previous_repository(tiny_checkpoint, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prev")
    onnx_path = export_tiny_onnx(tiny_checkpoint, root / "onnx" / "model.onnx")
    return write_repository(root / "model_repository", onnx_model=onnx_path, tokenizer_dir=tiny_checkpoint,
                            id2label=dict(enumerate(LABELS)), config=RepositoryConfig(max_batch_size=8))


def test_sigint_at_a_late_exporter_stage_keeps_the_previous_repository(tiny_checkpoint, previous_repository,
                                                                       tmp_path):
    """Ctrl-C (a real SIGINT to the process) while the exporter measures speed, after export and
    optimisation (variants are timed before they are gated): exit 130, the previous repository and build directory are byte-identical, and no
    temporary directory is left beside them. (Injected failures: tests/test_exporter.py.)"""
    repo, out = tmp_path / "model_repository", tmp_path / "build"
    shutil.copytree(previous_repository, repo)
    out.mkdir()
    (out / "old.txt").write_text("previous build")
    eval_csv = tmp_path / "eval.csv"
    with open(eval_csv, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i, text in enumerate(corpus_texts(120, seed=3)):
            writer.writerow([text, LABELS[i % 3]])
    before_repo, before_build = hash_tree(repo), hash_tree(out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "build", str(tiny_checkpoint), "--out", str(out), "--repository",
         str(repo), "--precisions", "fp32", "--eval-data", str(eval_csv), "--eval-size", "120",
         "--speed-seconds", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    seen = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line.rstrip())
            if "stage fp32-speed ..." in line:
                time.sleep(1.0)
                proc.send_signal(signal.SIGINT)
                break
        assert any("stage export done" in s for s in seen), "\n".join(seen[-20:])
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err.strip().splitlines()[-1]
    assert hash_tree(repo) == before_repo
    assert hash_tree(out) == before_build
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".model_repository", ".build"))]
    assert leftovers == []


def test_short_soak_runs_end_to_end(previous_repository, tmp_path, capsys):
    """`python -m loadtest soak` for 45 s: saturation, constant-throughput users, RSS samples, verdict.
    The p99 limit is loosened here (a shared CI machine); errors and memory growth keep theirs."""
    from loadtest.cli import main

    out = tmp_path / "soak"
    code = main(["soak", "--repository", str(previous_repository), "--duration", "45", "--saturation-duration",
                 "8s", "--saturation-users", "4", "--users", "4", "--warmup", "5s", "--window", "10s",
                 "--max-p99-drift", "5", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    with capsys.disabled():
        print(f"\nFIGURES short_soak: {json.dumps({k: summary[k] for k in ('p99_ms', 'rss_mb', 'passed', 'reasons')})}")
    assert summary["soak"]["failures"] == 0 and summary["soak"]["requests"] > 100
    assert 0.5 * summary["soak"]["target_requests_per_s"] < summary["soak"]["requests_per_s"] \
        < 1.2 * summary["soak"]["target_requests_per_s"]
    assert summary["rss_samples"] >= 15 and summary["rss_mb"]["growth"] < 0.10
    assert code == (0 if summary["passed"] else 1)
    assert summary["passed"], summary["reasons"]
    assert (out / "rss.csv").is_file() and (out / "soak" / "locust_stats_history.csv").is_file()
    assert "RSS growth %" in capsys.readouterr().out


def test_chaos_soak_loses_no_request(previous_repository, tmp_path, capsys):
    """`python -m loadtest soak --chaos` for 60 s: stubs killed at 20 s and 40 s, tritonserver at 30 s, under
    70 % load from users retrying through serving.client: 0 requests lost, every kill recovered (a stub by a
    reload of its model, the server by a restart), the longest outage recorded."""
    from loadtest.cli import main

    out = tmp_path / "chaos"
    code = main(["soak", "--repository", str(previous_repository), "--chaos", "--chaos-interval", "20s",
                 "--duration", "60", "--saturation-duration", "8s", "--saturation-users", "4", "--users", "4",
                 "--warmup", "5s", "--window", "10s", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    chaos = summary["chaos"]
    with capsys.disabled():
        print(f"\nFIGURES chaos_soak: {json.dumps({k: chaos[k] for k in chaos if k != 'kills'})} "
              f"{[(k['kind'], k['action'], round(k['outage_s'] or -1, 2)) for k in chaos['kills']]} "
              f"requests={summary['soak']['requests']} failures={summary['soak']['failures']}")
    assert code == (0 if summary["passed"] else 1)
    assert summary["passed"], summary["reasons"]
    assert summary["soak"]["failures"] == 0 and summary["soak"]["requests"] > 100
    kinds = [(k["kind"], k["action"]) for k in chaos["kills"]]
    assert kinds == [("stub", "reload classifier"), ("server", "restart"), ("stub", "reload classifier")], kinds
    assert 0 < chaos["longest_outage_s"] < 30
    assert "longest outage" in capsys.readouterr().out
