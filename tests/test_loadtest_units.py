"""Fast unit tests of the load-test stage: request bodies, response validation, text loading, configs,
Locust CSV parsing, plots, thresholds. No server, no model."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest

from loadtest import payload
from loadtest.errors import LoadtestError
from serving.contract import DEFAULT_CLASSIFIER, ContractError, Protocol, ServedModel, http_outputs

LABELS = ("negative", "neutral", "positive")


def _probs(rows):
    return np.array(rows, dtype=np.float32)


# ------------------------------------------------------------------ payload (what loadtest adds to the contract)


def test_request_name_says_protocol_and_batch():
    assert payload.request_name("http", 4) == "http infer x4"
    assert payload.request_name(Protocol.GRPC, 1) == "grpc infer x1"


def test_pick_texts_draws_from_pool_with_mixed_lengths():
    pool = ["short", "a somewhat longer text here", "x " * 40]
    got = payload.pick_texts(pool, 50, random.Random(0))
    assert len(got) == 50 and set(got) <= set(pool) and len({len(t) for t in got}) > 1
    with pytest.raises(ValueError):
        payload.pick_texts([], 1, random.Random(0))


def test_check_response_uses_the_contract():
    model = ServedModel(labels=LABELS)
    good = {"LABEL": np.array([[b"negative"], [b"positive"]], dtype=object),
            "PROBABILITIES": _probs([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])}
    assert payload.check_response(model, good, 2) == ["negative", "positive"]
    with pytest.raises(ContractError, match="does not match"):  # LABEL is not the argmax
        payload.check_response(model, {**good, "LABEL": np.array([[b"neutral"], [b"positive"]], dtype=object)}, 2)
    with pytest.raises(ContractError, match="rows"):
        payload.check_response(model, good, 3)
    with pytest.raises(ContractError, match="sum to 1"):
        payload.check_response(model, {**good, "PROBABILITIES": _probs([[0.7, 0.7, 0.1], [0.1, 0.1, 0.8]])}, 2)
    # label checks off: one non-empty LABEL per text is still required
    assert payload.check_response(None, {"LABEL": ["a", "b"]}, 2) == ["a", "b"]
    for bad in ({}, {"LABEL": ["a", ""]}, {"LABEL": ["a"]}):
        with pytest.raises(ContractError):
            payload.check_response(None, bad, 2)


def test_http_response_checked_through_the_contract():
    good = {"model_name": DEFAULT_CLASSIFIER, "outputs": [
        {"name": "LABEL", "datatype": "BYTES", "shape": [2, 1], "data": ["positive", "negative"]},
        {"name": "PROBABILITIES", "datatype": "FP32", "shape": [2, 3], "data": [0.1, 0.1, 0.8, 0.6, 0.3, 0.1]},
    ]}
    model = ServedModel(labels=LABELS)
    assert payload.check_response(model, http_outputs(good), 2) == ["positive", "negative"]
    with pytest.raises(ContractError, match="missing output LABEL"):
        payload.check_response(model, http_outputs({"outputs": [good["outputs"][1]]}), 2)
    with pytest.raises(ContractError, match="no 'outputs'"):
        http_outputs({"error": "boom"})


def test_no_protocol_enum_or_model_literal_outside_the_contract():
    """One Protocol enum, one URL parser, and the default model name only in serving.contract."""
    import re

    root = Path(__file__).resolve().parent.parent
    for path in [root / "serving" / "client.py", *sorted((root / "loadtest").glob("*.py"))]:
        text = path.read_text()
        assert not re.search(r"class Protocol\b", text), path
        assert f'"{DEFAULT_CLASSIFIER}"' not in text and f"'{DEFAULT_CLASSIFIER}'" not in text, path
        assert '"grpc://"' not in text and '"https://"' not in text, path


# ------------------------------------------------------------------ texts


def test_read_csv_texts_with_and_without_labels(tmp_path):
    from loadtest.texts import load_texts

    p = tmp_path / "t.csv"
    p.write_text("text,label\nhello there,positive\n,negative\nbad day,negative\n", encoding="utf-8")
    ts = load_texts(p)
    assert ts.texts == ("hello there", "bad day") and ts.labels == ("positive", "negative")
    q = tmp_path / "u.csv"
    q.write_text("text\nonly text\n", encoding="utf-8")
    assert load_texts(q).labels is None
    r = tmp_path / "v.csv"
    r.write_text("sentence\nx\n", encoding="utf-8")
    with pytest.raises(LoadtestError, match="no 'text' column"):
        load_texts(r)
    with pytest.raises(LoadtestError, match="cannot read"):
        load_texts(tmp_path / "missing.csv")


def test_default_texts_fall_back_to_the_packaged_corpus(tmp_path, monkeypatch):
    from loadtest.texts import load_texts

    monkeypatch.chdir(tmp_path)  # no data/test.csv here
    ts = load_texts(None)
    assert len(ts.texts) > 30_000 and ts.labels is not None
    assert set(ts.labels) == {"negative", "neutral", "positive"}
    sub = ts.sample(10, seed=1)
    assert len(sub.texts) == 10 and sub.texts == ts.sample(10, seed=1).texts
    assert all(t in set(ts.texts) for t in sub.texts)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.csv").write_text("text,label\nfrom the split,neutral\n", encoding="utf-8")
    assert load_texts(None).texts == ("from the split",)


# ------------------------------------------------------------------ run config and Locust command


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("2m", 120), ("1h30m", 5400), (15, 15)])
def test_parse_duration(text, seconds):
    from loadtest.run import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "-3", "0s", "1m2"])
def test_parse_duration_rejects(text):
    from loadtest.run import parse_duration

    with pytest.raises(LoadtestError):
        parse_duration(text)


def test_run_config_validation(tmp_path):
    from loadtest.run import RunConfig

    with pytest.raises(LoadtestError, match="--host"):
        RunConfig()
    with pytest.raises(LoadtestError, match="not both"):
        RunConfig(host="http://x:1", start_server=True, repository=tmp_path)
    with pytest.raises(LoadtestError, match="repository"):
        RunConfig(start_server=True, repository=tmp_path / "nope")
    with pytest.raises(LoadtestError, match="protocol"):
        RunConfig(host="h:1", protocol="ftp")
    with pytest.raises(LoadtestError, match="texts-per-request"):
        RunConfig(host="h:1", texts_per_request=0)
    cfg = RunConfig(host="h:1", protocol="grpc")
    assert cfg.out.parent == Path("results") and cfg.out.name.startswith("loadtest-")


def test_locust_command_carries_every_option(tmp_path):
    from loadtest.run import LOCUSTFILE, RunConfig, locust_command

    texts = tmp_path / "t.csv"
    texts.write_text("text\nx\n")
    cfg = RunConfig(host="127.0.0.1:9", protocol="grpc", users=5, spawn_rate=2.5, duration="1m",
                    texts_per_request=4, texts=texts, processes=2, request_rate=3)
    cmd = locust_command(cfg, "127.0.0.1:9", tmp_path)
    joined = " ".join(cmd)
    assert str(LOCUSTFILE) in cmd and "--headless" in cmd and cmd[-1] == "TritonGrpcUser"
    for piece in ("-u 5", "-r 2.5", "-t 60s", "--host 127.0.0.1:9", f"--csv {tmp_path / 'locust'}",
                  "--csv-full-history", f"--html {tmp_path / 'report.html'}", "--texts-per-request 4",
                  f"--texts {texts.absolute()}", "--processes 2", "--request-rate 3"):
        assert piece in joined


def test_locust_command_with_client_retries_runs_the_client_user(tmp_path):
    from loadtest.run import RunConfig, locust_command

    cmd = locust_command(RunConfig(host="h:1", client_retries=7, request_timeout=45), "http://h:1", tmp_path)
    joined = " ".join(cmd)
    assert cmd[-1] == "TritonClientUser" and "--client-retries 7" in joined and "--request-timeout 45" in joined
    with pytest.raises(LoadtestError, match="client-retries"):
        RunConfig(host="h:1", client_retries=-1)


def test_chaos_plan_kills_stubs_every_interval_and_the_server_once_between_them():
    from loadtest.soak import chaos_plan

    plan = chaos_plan(120, 600)
    assert plan == [(120, "stub"), (240, "stub"), (300, "server"), (360, "stub"), (480, "stub")]
    assert chaos_plan(20, 60) == [(20, "stub"), (30, "server"), (40, "stub")]
    gaps = [b - a for (a, _), (b, _) in zip(plan, plan[1:])]
    assert min(gaps) >= 60  # two recoveries never overlap


def test_chaos_verdict_counts_lost_requests_and_unrecovered_kills():
    from loadtest.soak import chaos_verdict

    kills = [{"kind": "stub", "target": "classifier_0_1", "outage_s": 2.5},
             {"kind": "server", "target": "tritonserver", "outage_s": 6.0}]
    ok = chaos_verdict(1000, 0, kills)
    assert ok["passed"] and ok["longest_outage_s"] == 6.0 and ok["longest_stub_outage_s"] == 2.5
    lost = chaos_verdict(1000, 3, kills)
    assert not lost["passed"] and "3 of 1000 requests lost" in lost["reasons"][0]
    stuck = chaos_verdict(1000, 0, [kills[0], {**kills[1], "outage_s": None}])
    assert not stuck["passed"] and "not recovered: ['tritonserver']" in stuck["reasons"][0]
    skipped = chaos_verdict(1000, 0, [kills[0], {"kind": "server", "skipped": True}])
    assert not skipped["passed"] and "plan was not carried out" in skipped["reasons"][0]


def test_locustfile_loads_in_locust_and_parses_its_options():
    """Locust itself loads the locustfile: both users are listed, and our options reach the init check."""
    import subprocess
    import sys

    from loadtest.run import LOCUSTFILE, _child_env

    base = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE)]
    out = subprocess.run(base + ["--list"], capture_output=True, text=True, env=_child_env(), timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    assert "TritonHttpUser" in out.stdout and "TritonGrpcUser" in out.stdout
    bad = subprocess.run(base + ["--headless", "-t", "1s", "--host", "http://127.0.0.1:9", "--texts-per-request",
                                 "0", "TritonHttpUser"], capture_output=True, text=True, env=_child_env(), timeout=120)
    assert bad.returncode != 0 and "--texts-per-request must be >= 1" in bad.stderr + bad.stdout


_USERS_PER_TASK = """
import json
from serving.contract import Head, Protocol, ServedModel
from loadtest import locustfile as lf
models = {"embedding": ServedModel(name="e", head=Head.EMBEDDING, embedding_dim=8),
          "tagger": ServedModel(name="t", head=Head.TOKEN_CLASSIFICATION, labels=("O", "B-PER")),
          "reranker": ServedModel(name="r", head=Head.REGRESSION, labels=("score",), text_pair=True),
          "multi": ServedModel(name="m", head=Head.MULTI_LABEL, labels=("a", "b")), "none": None}
users = {k: [lf.task_users(m).users[p] for p in Protocol] for k, m in models.items()}
checks = {k: getattr(lf.task_users(m).check, "__name__", None) for k, m in models.items()}
print(json.dumps({"users": users, "checks": checks}))
"""


def test_locust_users_are_looked_up_per_served_task():
    """loadtest.locustfile.TASK_USERS: the users and answer check of each served head (a text-pair classifier:
    the reranker's), the classifier's for any other head; run in a child (locust patches the process)."""
    import subprocess
    import sys

    from loadtest.run import _child_env

    out = subprocess.run([sys.executable, "-c", _USERS_PER_TASK], capture_output=True, text=True, env=_child_env(),
                         timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["users"] == {"embedding": ["TritonEmbedHttpUser", "TritonEmbedGrpcUser"],
                            "tagger": ["TritonTagHttpUser", "TritonTagGrpcUser"],
                            "reranker": ["TritonRerankHttpUser", "TritonRerankGrpcUser"],
                            "multi": ["TritonHttpUser", "TritonGrpcUser"], "none": ["TritonHttpUser", "TritonGrpcUser"]}
    assert got["checks"] == {"embedding": "decode_embedding", "tagger": "check_entities", "reranker": None,
                             "multi": None, "none": None}


# ------------------------------------------------------------------ reports


def _write_locust_csvs(prefix: Path, requests: int, failures: int):
    cols = ["Type", "Name", "Request Count", "Failure Count", "Median Response Time", "Average Response Time",
            "Min Response Time", "Max Response Time", "Average Content Size", "Requests/s", "Failures/s",
            "50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "99.99%", "100%"]
    with open(f"{prefix}_stats.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for name, typ in (("http infer x4", "POST"), ("Aggregated", "")):
            w.writerow([typ, name, requests, failures, 14, 15.5, 7, 80, 300, 26.3, 0.5, 14, 15, 16, 17, 19, 21,
                        25, 30, 60, 80, 80])
    hist_cols = ["Timestamp", "User Count", "Type", "Name", "Requests/s", "Failures/s", "50%", "95%", "99%",
                 "Total Request Count"]
    with open(f"{prefix}_stats_history.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(hist_cols)
        w.writerow([1000, 1, "", "Aggregated", 0, 0, 0, 0, 0, 0])
        for t in range(1001, 1006):
            w.writerow([t, 4, "", "Aggregated", 20 + t - 1000, 0, 13, 20, 30, (t - 1000) * 20])
            w.writerow([t, 4, "POST", "http infer x4", 20, 0, 13, 20, 30, (t - 1000) * 20])


_LOCUST_FINAL_STATS = """
import json, sys
from locust.stats import RequestStats, save_stats_json
stats = RequestStats(use_response_times_cache=False)
for i in range(263):
    stats.log_request("POST", "http infer x4", 10 + i % 50, 300)
for i in range(37):
    stats.log_request("POST", "grpc infer x4", 200 + i, 100)
stats.log_error("POST", "http infer x4", "refused")
stats.log_error("POST", "http infer x4", "refused")
t = stats.total
span = t.last_request_timestamp - min(e.start_time for e in stats.entries.values())
want = {"p50": t.get_response_time_percentile(0.5), "p95": t.get_response_time_percentile(0.95),
        "p99": t.get_response_time_percentile(0.99), "avg": t.avg_response_time, "min": t.min_response_time,
        "max": t.max_response_time, "rps": t.num_requests / span, "bytes": t.avg_content_length}
save_stats_json(stats, sys.argv[1])  # Locust's own writer, as --json-file runs it at shutdown
print(json.dumps(want))
"""


def test_read_locust_stats_and_history(tmp_path):
    """The summary's totals are Locust's over every request, from the final stats file Locust writes at
    shutdown (made here by Locust's own writer, in a subprocess: importing locust monkey-patches the process):
    two names merged into the total, the percentiles by Locust's rule."""
    import subprocess
    import sys

    from loadtest.report import read_history, read_locust_stats

    out = subprocess.run([sys.executable, "-c", _LOCUST_FINAL_STATS, str(tmp_path / "locust")], check=True,
                         capture_output=True, text=True).stdout
    want = json.loads(out.strip().splitlines()[-1])
    got = read_locust_stats(tmp_path / "locust.json")
    total = got["total"]
    assert total["requests"] == 300 and total["failures"] == 2 and total["failure_ratio"] == pytest.approx(2 / 300)
    assert {k: total["latency_ms"][k] for k in ("p50", "p95", "p99", "min", "max")} == {
        k: want[k] for k in ("p50", "p95", "p99", "min", "max")} and want["p99"] >= 200 and want["max"] == 236
    assert total["latency_ms"]["avg"] == pytest.approx(want["avg"])
    assert total["requests_per_s"] == pytest.approx(want["rps"], rel=1e-2)  # the span: a few µs apart
    assert total["avg_response_bytes"] == pytest.approx(want["bytes"]) == (263 * 300 + 37 * 100) / 300
    assert sorted(e["name"] for e in got["per_name"]) == ["grpc infer x4", "http infer x4"]
    _write_locust_csvs(tmp_path / "locust", 263, 2)
    hist = read_history(tmp_path / "locust_stats_history.csv")
    assert len(hist) == 6 and hist[0]["p50"] is None and hist[-1]["t"] == 5 and hist[-1]["rps"] == 25
    with pytest.raises(LoadtestError):
        read_locust_stats(tmp_path / "missing.json")


def test_plot_history_writes_png(tmp_path):
    from loadtest.report import plot_history, read_history

    _write_locust_csvs(tmp_path / "locust", 10, 0)
    png = tmp_path / "p.png"
    assert plot_history(read_history(tmp_path / "locust_stats_history.csv"), png, "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_history([], tmp_path / "none.png", "t") and not (tmp_path / "none.png").exists()


def test_markdown_table():
    from loadtest.report import markdown_table

    md = markdown_table(("a", "b"), [("x", 1.234), ("y", None)])
    assert md.splitlines() == ["| a | b |", "|---|---|", "| x | 1.2 |", "| y | - |"]


# ------------------------------------------------------------------ bench thresholds, tune parsing, CLI


def _res(name, kind, seq, p50=10.0, p99=15.0, variant=None, load=None, **detail):
    from loadtest.bench_common import BackendResult

    d = dict(detail)
    if variant:
        d["variant"] = variant
    if load:
        d["load"] = load
    return BackendResult(name, kind, 8, seq, p50, p99, None, 100, d)


def _bench_results():
    return [
        _res("pytorch pipeline fp32 b32", "in-process", 40.0),
        _res("onnxruntime int8 b32", "in-process", 300.0, variant="int8"),
        _res("served grpc c16 x8", "served", 280.0, load={"protocol": "grpc", "requests_per_s": 35.0}),
        _res("served http c16 x8", "served", 200.0, load={"protocol": "http", "requests_per_s": 25.0}),
        _res("served grpc open-loop 70% x8", "open-loop", 196.0, p50=20.0, p99=50.0,
             load={"target_rps": 24.5, "requests_per_s": 24.4, "failures": 0}, saturating_requests_per_s=35.0),
    ]


def test_no_goal_constants_in_the_bench():
    """Product code carries no goals (issue 22 item 4): users pass --min-ratio / --slo-p99-ms."""
    import loadtest.bench as bench
    import loadtest.bench_common as common
    import loadtest.embedding_bench as embedding_bench
    import loadtest.gateway_bench as gateway_bench

    for mod in (bench, common, embedding_bench, gateway_bench):
        assert not [n for n in vars(mod) if n.startswith("GOAL")], mod.__name__


def test_thresholds_unset_check_nothing():
    from loadtest.bench import check_thresholds

    assert check_thresholds(_bench_results(), "int8") == ([], [])


def test_min_ratio_against_in_process_ort_without_a_ceiling():
    from loadtest.bench import check_thresholds

    lines, failed = check_thresholds(_bench_results(), "int8", min_ratio=0.9)
    assert lines == ["PASS: served grpc c16 x8 280.0 seq/s = 0.93 of onnxruntime int8 b32 300.0 (--min-ratio 0.9)"]
    assert failed == []
    lines, failed = check_thresholds(_bench_results(), "int8", min_ratio=0.95)
    assert lines[0].startswith("FAIL:") and len(failed) == 1
    # no ceiling and no in-process run of the served variant: the threshold cannot hold, so it fails
    lines, failed = check_thresholds(_bench_results(), "fp32", min_ratio=0.5)
    assert len(failed) == 1 and "no ceiling" in failed[0]


def test_min_ratio_per_shape_and_slo_against_the_ceiling():
    from loadtest.bench import check_thresholds, table_rows
    from loadtest.bench_common import set_ratios

    results = _bench_results() + [
        _res("served grpc c16 x1", "served", 200.0, load={"protocol": "grpc", "requests_per_s": 200.0}),
        _res("ceiling onnxruntime int8 1 row x 2 proc", "ceiling", 400.0, variant="int8"),
        _res("peer tei c16 x8", "peer", 100.0),
    ]
    results[-3].rows_per_call = 1
    lines, failed = check_thresholds(results, "int8", min_ratio=0.6, slo_p99_ms=40.0)
    assert [line.split(":")[0] for line in lines] == ["PASS", "FAIL", "FAIL"]  # x8 0.70, x1 0.50, p99 50 ms
    assert "served grpc c16 x1" in failed[0] and "0.50 of ceiling" in failed[0]
    assert "p99 50.0 ms (--slo-p99-ms 40)" in failed[1]
    assert check_thresholds(results, "int8", min_ratio=0.5, slo_p99_ms=50.0)[1] == []
    assert check_thresholds(results[:-4], "int8", slo_p99_ms=50.0)[1] == [
        "--slo-p99-ms 50: no open-loop row was measured"]
    set_ratios(results, "pytorch pipeline fp32 b32")
    by = {r.name: r for r in results}
    assert by["served grpc c16 x8"].ratio_to_ceiling == pytest.approx(0.7)
    assert by["peer tei c16 x8"].ratio_to_ceiling == pytest.approx(0.25)
    assert by["ceiling onnxruntime int8 1 row x 2 proc"].ratio_to_pipeline == pytest.approx(10.0)
    assert by["onnxruntime int8 b32"].ratio_to_ceiling is None
    assert table_rows(results)[2][6] == "0.70"


def test_tune_layout_parsing():
    from loadtest.tune import parse_ints, parse_layouts

    assert parse_layouts("1x2, 2x1") == ((1, 2), (2, 1))
    for bad in ("2", "0x1", "ax1", ""):
        with pytest.raises(LoadtestError):
            parse_layouts(bad)
    assert parse_ints("500,8000", "d") == (500, 8000)
    with pytest.raises(LoadtestError):
        parse_ints("1,x", "d")


def test_tune_default_layouts_and_batching_variations():
    """Stage 1 by default: the repository's layout, one per core x 1, half x 2, twice x 1; stage 2 never tries
    a max batch size that would refuse the requests it sends."""
    from types import SimpleNamespace

    from loadtest.tune import _variations, default_layouts
    from serving.repository import RepositoryConfig, usable_cores

    n = usable_cores()
    layouts = default_layouts(RepositoryConfig())
    assert layouts[0] == (n, 1) and (max(n // 2, 1), 2) in layouts and (2 * n, 1) in layouts
    assert len(set(layouts)) == len(layouts)
    assert default_layouts(RepositoryConfig(encoder_instances=3, intra_op_threads=4))[0] == (3, 4)
    base = RepositoryConfig(max_batch_size=64, max_queue_delay_us=2000, preferred_batch_sizes=(8, 32))
    tune = SimpleNamespace(queue_delays_us=(0, 2000), max_batch_sizes=(4, 16, 64), texts_per_request=8)
    out = _variations(base, tune)
    assert [(v.max_queue_delay_us, v.max_batch_size) for v in out] == [(0, 64), (2000, 16)]
    assert out[1].preferred_batch_sizes == (8,)


def test_tune_tries_each_layout_that_fits_pinned_and_unpinned(monkeypatch):
    """Pinned or not is a property of the model on the machine (docs/LOADTEST.md "Third pass": the demo
    classifier ran 1.08-1.16x unpinned, the MiniLM embedder 0.91-1.12x): stage 1 runs both for a layout the
    model would pin (fixed threads, fits the cores), once (recorded unpinned, as it runs) for one it never pins."""
    from types import SimpleNamespace

    from loadtest import tune
    from serving.repository import RepositoryConfig

    from serving.models import runtime

    monkeypatch.setattr(tune, "usable_cores", lambda: 2)
    monkeypatch.setattr(runtime, "_cpu_quota_limited", lambda: False)
    cfg = SimpleNamespace(layouts=((2, 1), (1, 2), (4, 1), (1, 0)), try_unpinned=True)
    got = [(c.encoder_instances, c.intra_op_threads, c.pin_instances) for c in tune.stage1_layouts(cfg, RepositoryConfig())]
    assert got == [(2, 1, True), (2, 1, False), (1, 2, True), (1, 2, False), (4, 1, False), (1, 0, False)]
    monkeypatch.setattr(runtime, "_cpu_quota_limited", lambda: True)  # under a CPU quota the model never pins
    assert [c.pin_instances for c in tune.stage1_layouts(cfg, RepositoryConfig())] == [False] * 4
    monkeypatch.setattr(runtime, "_cpu_quota_limited", lambda: False)
    cfg.try_unpinned = False
    assert [c.pin_instances for c in tune.stage1_layouts(cfg, RepositoryConfig(pin_instances=False))] == [False] * 4
    assert tune._table_rows([{"trial": 1, "stage": "layout", **tune._knobs(RepositoryConfig(pin_instances=False)),
                              "seq_per_s": 1.0, "p50_ms": 1.0, "p99_ms": 2.0, "failures": 0}])[0][4] == "no"


def test_tune_refuses_an_embedder_with_one_clear_error(monkeypatch, tmp_path):
    """tune's trials measure a classifier's answers: an embedder is refused up front with what to use instead
    (it failed deep inside with "id2label must map 0..n-1")."""
    from types import SimpleNamespace

    from loadtest import tune
    from loadtest.errors import LoadtestError
    from serving.contract import Head, ServedModel

    embedder = ServedModel(name="embedder", head=Head.EMBEDDING, embedding_dim=8)
    monkeypatch.setattr(tune, "read_served_repository", lambda repo, model=None: SimpleNamespace(target="cpu", model=embedder))
    with pytest.raises(LoadtestError, match="'embedder' is an embedder.*--no-pin-instances"):
        tune._sources(tmp_path, tmp_path)


def test_build_report_variants(tmp_path):
    """loadtest reads the exporter's typed report (exporter.artifacts), not guessed keys."""
    from exporter.artifacts import (BuildReport, GateMode, ParityResult, ReferenceResult, Variant,
                                    write_report_json)
    from loadtest.artifacts import build_parity, read_build_variants, selected_variant

    def variant(name, passed):
        return Variant(name=name, precision=name[:4], file=f"{name}/model.onnx", size_bytes=1,
                       parity=ParityResult(n_examples=1, passed=passed, reason="", label_agreement=1.0))

    def write(variants, selected):
        write_report_json(BuildReport(checkpoint="ck", target="cpu", gate_mode=GateMode.PER_ROW, selected=selected,
                                      reference=ReferenceResult(accuracy=1.0, macro_f1=1.0, n_examples=1),
                                      eval_data="test.csv", settings={}, labels=["a", "b"],
                                      variants={v.name: v for v in variants}), tmp_path)

    for name in ("fp32", "int8_dynamic"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"x")
    write([variant("fp32", True), variant("int8_dynamic", False), variant("fp16", False)], "fp32")
    assert read_build_variants(tmp_path) == [("fp32", tmp_path / "fp32" / "model.onnx"),
                                             ("int8_dynamic", tmp_path / "int8_dynamic" / "model.onnx")]
    assert build_parity(tmp_path) == {"fp32": True, "int8_dynamic": False, "fp16": False}
    assert selected_variant(tmp_path) == "fp32"
    write([variant("fp16", False)], None)
    with pytest.raises(LoadtestError):
        read_build_variants(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"variants": {"fp32": {"path": "fp32/model.onnx"}}}))
    with pytest.raises(LoadtestError, match="schema_version"):
        read_build_variants(tmp_path)


def test_cli_user_errors_are_one_line(capsys, tmp_path):
    from loadtest.cli import main

    assert main(["run", "--duration", "10s"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m loadtest: error:") and "--host" in err[0]
    assert main(["bench", "--checkpoint", str(tmp_path)]) == 2
    assert "not a Hugging Face checkpoint" in capsys.readouterr().err
    assert main(["tune", "--repository", str(tmp_path)]) == 2
    assert "provenance.json" in capsys.readouterr().err


def test_cores_used_from_snapshots():
    from loadtest.cpu import cores_used

    before = {"_wall": 100.0, "client": 1.0, "encoder": 10.0}
    after = {"_wall": 110.0, "client": 2.0, "encoder": 25.0, "tokenizer": 3.0}
    used = cores_used(before, after)
    assert used["client"] == 0.1 and used["encoder"] == 1.5 and used["tokenizer"] == 0.3
    assert used["total"] == pytest.approx(1.9) and used["machine_cores"] >= 1
    assert cores_used(after, after) == {}


def test_stub_roles_from_command_lines():
    from loadtest.cpu import _role

    stub = ["/x/triton_python_backend_stub", "/repo/encoder/1/model.py", "shm", "1048576"]
    assert _role(stub, 10, 11) == "encoder"
    assert _role(["/bin/tritonserver"], 10, 10) == "tritonserver"
    assert _role(["python"], 10, 12) == "other"


def test_parse_protocol_is_a_user_error_not_a_traceback():
    from loadtest.run import parse_protocol

    assert parse_protocol("grpc") is Protocol.GRPC and parse_protocol(Protocol.HTTP) is Protocol.HTTP
    with pytest.raises(LoadtestError, match="protocol must be http or grpc, got 'udp'"):
        parse_protocol("udp")


def test_long_documents_are_2k_to_50k_characters_joined_from_the_texts():
    from loadtest.long_docs import long_documents

    texts = [f"text number {i} with some words" for i in range(50)]
    docs = long_documents(texts, 40, seed=3)
    assert len(docs) == 40 and docs == long_documents(texts, 40, seed=3)
    assert all(2_000 <= len(d) <= 50_000 for d in docs)
    assert max(map(len, docs)) > 20_000 and min(map(len, docs)) < 5_000  # log-uniform over the range
    assert all(d.split(" with some words ")[0].startswith("text number") for d in docs)


def _calls(path: Path, owner: str, attribute: str) -> bool:
    """Whether ``owner`` (a function or class) in ``path`` calls ``runtime.<attribute>``."""
    import ast

    tree = ast.parse(path.read_text())
    scope = next(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == owner)
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == attribute
               and ast.unparse(n.func.value) == "runtime" for n in ast.walk(scope))


def test_the_ceiling_opens_the_served_models_session():
    """The ceiling's per-row runner and the served CPU model (serving/models/textmodel.py, which cannot be
    imported outside Triton, hence read from its source) open their session through the one function,
    serving/models/runtime.py's open_session."""
    root = Path(__file__).resolve().parents[1]
    assert _calls(root / "serving" / "models" / "textmodel.py", "row_session", "open_session")
    assert _calls(root / "loadtest" / "ceiling.py", "RowRunner", "open_session")


def test_the_served_session_options_are_real(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from serving.models import runtime

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "model.onnx")
    options = runtime.open_session(tmp_path / "model.onnx", 2).get_session_options()
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    default = runtime.open_session(tmp_path / "model.onnx", 0).get_session_options()
    assert default.intra_op_num_threads == 0  # 0: the runtime's default, as the served model
