"""The load-test stage against a real tritonserver on a tiny-model repository: real Locust runs (HTTP and
gRPC), failure detection, the side-by-side bench (in-process and served) and the tuner."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from serving_helpers import corpus_texts

from loadtest.ceiling import usable_cores
from serving.contract import DEFAULT_CLASSIFIER, Endpoint, Protocol
from serving.repository import RepositoryConfig, read_repository, write_repository

LABELS = ("negative", "neutral", "positive")


@pytest.fixture(scope="module")
def repository(tiny_onnx, tiny_checkpoint, tmp_path_factory) -> Path:
    return write_repository(
        tmp_path_factory.mktemp("lt-served") / "model_repository", onnx_model=tiny_onnx,
        tokenizer_dir=tiny_checkpoint, id2label=dict(enumerate(LABELS)),
        config=RepositoryConfig(max_batch_size=32, max_queue_delay_us=1000, intra_op_threads=1),
        provenance={"variant": "fp32", "checkpoint": str(tiny_checkpoint)},
    )


@pytest.fixture(scope="module")
def texts_csv(tmp_path_factory) -> Path:
    """Real held-out-like tweets with labels, as the finetune stage writes them."""
    path = tmp_path_factory.mktemp("lt-data") / "test.csv"
    rng = __import__("random").Random(0)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for t in corpus_texts(64):
            w.writerow([t, rng.choice(LABELS)])
    return path


@pytest.fixture(scope="module")
def server(repository):
    from loadtest.serve import served

    with served(repository) as endpoints:
        yield endpoints


def _check_reports(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust_failures.csv", "report.html",
                 "throughput_latency.png", "config.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "throughput_latency.png").read_bytes()[:4] == b"\x89PNG"
    assert "<html" in (out / "report.html").read_text(errors="replace").lower()
    return summary


@pytest.mark.server
def test_locust_http_smoke_with_its_own_server(repository, texts_csv, tmp_path, capsys):
    """CI smoke: `python -m loadtest run --start-server` for real; zero failures, every report written."""
    from loadtest.cli import main

    out = tmp_path / "http"
    rc = main(["run", "--start-server", "--repository", str(repository), "--users", "4", "--spawn-rate", "4",
               "--duration", "4s", "--texts-per-request", "4", "--texts", str(texts_csv), "--out", str(out),
               "--fail-on-error"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    s = _check_reports(out)
    assert s["requests"] > 0 and s["failures"] == 0 and s["failure_ratio"] == 0
    assert [n["name"] for n in s["per_name"]] == ["http infer x4"]
    assert s["requests_per_s"] > 0 and s["latency_ms"]["p50"] > 0 and s["latency_ms"]["p99"] >= s["latency_ms"]["p50"]
    assert s["texts_per_s"] == pytest.approx(4 * s["requests_per_s"])
    assert "http infer x4" in capsys.readouterr().out


# alone: its users import tritonclient.grpc at start and the 3 s run must count requests; with the other worker
# loading the cores it once counted none (Locust's stats CSV still held its first write: `loadtest run` reads it)
@pytest.mark.alone
@pytest.mark.server
def test_locust_grpc_smoke(server, texts_csv, tmp_path):
    from loadtest.run import RunConfig, run_loadtest

    s = run_loadtest(RunConfig(host=server.grpc_url, protocol="grpc", users=4, spawn_rate=4, duration="3s",
                               texts_per_request=2, texts=texts_csv, out=tmp_path / "grpc"))
    _check_reports(tmp_path / "grpc")
    assert s["requests"] > 0 and s["failures"] == 0
    assert [n["name"] for n in s["per_name"]] == ["grpc infer x2"]


@pytest.mark.server
def test_rejected_requests_count_as_failures(server, texts_csv, tmp_path, capsys):
    """48 texts per request exceed max_batch_size 32: the server answers 400, every request fails, exit 1.

    Run in Locust's distributed mode (--processes 2): the workers get the master's options and their
    failures reach the master's report."""
    from loadtest.cli import main

    out = tmp_path / "fail"
    rc = main(["run", "--host", server.http_url, "--users", "2", "--spawn-rate", "2", "--duration", "3s",
               "--texts-per-request", "48", "--texts", str(texts_csv), "--out", str(out), "--fail-on-error",
               "--processes", "2"])
    assert rc == 1
    s = json.loads((out / "summary.json").read_text())
    assert s["requests"] > 0 and s["failures"] == s["requests"]
    assert [n["name"] for n in s["per_name"]] == ["http infer x48"]
    assert any("HTTP 400" in f["error"] for f in s["top_failures"])
    assert "requests failed" in capsys.readouterr().err


@pytest.mark.server
def test_closed_and_open_loop_clients(server, texts_csv):
    from loadtest.clients import closed_loop, open_loop
    from loadtest.texts import load_texts

    ts = load_texts(texts_csv)
    for proto, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        r = closed_loop(proto, url, ts.texts, ts.labels, concurrency=3, texts_per_request=4, duration_s=1.5,
                        warmup_s=0.5)
        assert r.failures == 0 and r.requests > 0 and r.rows == 4 * r.requests
        assert r.labelled == r.rows and 0 <= r.accuracy <= 1 and r.percentile(99) >= r.percentile(50) > 0
    o = open_loop("grpc", server.grpc_url, ts.texts, ts.labels, rate_rps=20, texts_per_request=2, duration_s=2,
                  warmup_s=0.5)
    assert o.failures == 0 and 36 <= o.requests <= 41  # 20 req/s for 2 s, paced, not as fast as possible


@pytest.mark.server
def test_load_generator_builds_each_chunk_once_and_checks_every_answer(server, texts_csv, monkeypatch):
    """The load generator's sender re-uses a chunk's request tensors (built once, sent by concurrent
    requests); every answer is still checked and equals the thin client's, whichever chunk went before."""
    import asyncio

    from loadtest.clients import _Sender
    from loadtest.texts import load_texts
    from serving.client import TextClassifier

    texts = list(load_texts(texts_csv).texts[:6])
    with TextClassifier(server.http_url) as client:
        expected = [p.label for p in client.classify(texts)]
    chunks = [texts[:3], texts[3:], texts[:3], texts[:1]]

    async def drive(protocol, url, same=True):
        sender = _Sender(protocol, url, DEFAULT_CLASSIFIER, 4)
        try:
            await sender.fetch_contract()
            assert (sender.request_inputs(list(texts[:3])) is sender.request_inputs(texts[:3])) is same
            assert sender.request_inputs(texts[3:]) is not sender.request_inputs(texts[:3])
            answers = await asyncio.gather(*(sender.send(chunk, 30.0) for chunk in chunks * 3))
            return answers, len(sender._inputs)
        finally:
            await sender.close()

    for protocol, url in ((Protocol.GRPC, server.grpc_url), (Protocol.HTTP, server.http_url)):
        answers, built = asyncio.run(drive(protocol, url))
        assert built == 3  # three distinct chunks, twelve requests
        assert answers == [expected[:3], expected[3:], expected[:3], expected[:1]] * 3
    # past its budget the sender keeps no more chunks, and still answers them
    monkeypatch.setattr(_Sender, "CACHE_BYTES", len(texts[0]))
    answers, built = asyncio.run(drive(Protocol.GRPC, server.grpc_url, same=False))
    assert built == 1 and answers == [expected[:3], expected[3:], expected[:3], expected[:1]] * 3


@pytest.mark.server
def test_tls_urls_are_never_downgraded(server):
    """https:// and grpcs:// against the plaintext local server fail; http:// and grpc:// work."""
    import asyncio

    from serving.client import AsyncTextClassifier, TextClassifier
    from serving.errors import ClientError

    grpc = Endpoint(server.grpc_url, Protocol.GRPC)
    plain, tls = (server.http_url, grpc.url), (server.http_url.replace("http://", "https://", 1),
                                                Endpoint(grpc.address, Protocol.GRPC, tls=True).url)
    for url in plain:
        with TextClassifier(url) as client:
            assert client.classify(["a fine day"])[0].label in LABELS
    for url in tls:
        with pytest.raises(ClientError):
            with TextClassifier(url, retries=1, backoff_s=0.05, timeout_s=5) as client:
                client.classify(["a fine day"])

        async def run(u=url):
            async with AsyncTextClassifier(u, retries=1, backoff_s=0.05, timeout_s=5) as client:
                return await client.classify(["a fine day"])

        with pytest.raises(ClientError):
            asyncio.run(run())


@pytest.mark.server
@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_plain_locust_picks_the_user_class_from_the_host(server, texts_csv, tmp_path, scheme):
    """`locust -f loadtest/locustfile.py --host URL` with no user class named: one user class, chosen by
    the scheme, runs without failures and Locust exits 0."""
    import subprocess
    import sys

    from loadtest.report import read_locust_stats
    from loadtest.run import LOCUSTFILE, _child_env

    host = server.url(Protocol(scheme))
    out = subprocess.run([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "2", "-r",
                          "2", "-t", "4s", "--host", host, "--texts", str(texts_csv), "--csv",
                          str(tmp_path / "l"), "--json-file", str(tmp_path / "l"), "--only-summary"],
                         capture_output=True, text=True, env=_child_env(), timeout=120, cwd=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    stats = read_locust_stats(tmp_path / "l.json")  # Locust's final stats (its CSV lags the end)
    assert [e["name"] for e in stats["per_name"]] == [f"{scheme} infer x1"]
    assert stats["total"]["requests"] > 0 and stats["total"]["failures"] == 0


def _build_dir(tmp_path: Path, tiny_onnx: Path) -> Path:
    from exporter.artifacts import (BuildReport, GateMode, ParityResult, ReferenceResult, Variant,
                                    write_report_json)

    build = tmp_path / "build"
    (build / "fp32").mkdir(parents=True)
    (build / "fp32" / "model.onnx").write_bytes(tiny_onnx.read_bytes())
    fp32 = Variant(name="fp32", precision="fp32", file="fp32/model.onnx", size_bytes=tiny_onnx.stat().st_size,
                   parity=ParityResult(n_examples=1, passed=True, reason="within budget", label_agreement=1.0))
    write_report_json(BuildReport(checkpoint="ck", target="cpu", gate_mode=GateMode.PER_ROW, selected="fp32",
                                  reference=ReferenceResult(accuracy=1.0, macro_f1=1.0, n_examples=1),
                                  eval_data="test.csv", settings={}, labels=["a", "b"], variants={"fp32": fp32}), build)
    return build


def test_bench_in_process_backends(tiny_checkpoint, tiny_onnx, texts_csv, tmp_path):
    from loadtest.bench import BenchConfig, run_bench

    out = tmp_path / "bench"
    res = run_bench(BenchConfig(checkpoint=tiny_checkpoint, build=_build_dir(tmp_path, tiny_onnx), served=False,
                                texts=texts_csv, n_texts=12, batch_size=4, threads=1, bf16="off", out=out,
                                ceiling_seconds=0.3))
    names = [r["name"] for r in res["results"]]
    ceiling = f"ceiling onnxruntime fp32 1 row x {len(usable_cores())} proc"
    assert names == ["pytorch pipeline fp32 b4", "pytorch pipeline fp32 b1", "onnxruntime fp32 b4", ceiling]
    by = {r["name"]: r for r in res["results"]}
    for r in res["results"]:
        assert r["seq_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 and r["n_texts"] == 12
        assert 0 <= r["accuracy"] <= 1
    # the same model in PyTorch and ONNX Runtime labels the same texts the same way (batched or row by row)
    assert by["onnxruntime fp32 b4"]["accuracy"] == pytest.approx(by["pytorch pipeline fp32 b4"]["accuracy"])
    assert by[ceiling]["accuracy"] == pytest.approx(by["onnxruntime fp32 b4"]["accuracy"], abs=1 / 12)
    # one process per core, summed: the ceiling is the sum of what each process ran alone
    c = by[ceiling]
    assert c["kind"] == "ceiling" and c["rows_per_call"] == 1 and c["detail"]["intra_op_threads"] == 1
    assert c["seq_per_s"] == pytest.approx(sum(c["detail"]["per_process_seq_per_s"]))
    assert c["ratio_to_ceiling"] == pytest.approx(1.0) and c["ratio_to_pipeline"] > 0
    assert c["detail"]["max_length"] == 128 and sum(c["detail"]["per_process_seq_per_s"]) > 0
    saved = json.loads((out / "bench.json").read_text())
    assert saved["thresholds"] == {"lines": [], "failed": []} and len(saved["results"]) == 4
    assert "| onnxruntime fp32 b4 |" in (out / "bench.md").read_text()
    assert f"| {ceiling} |" in (out / "bench.md").read_text()
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def gateway(server, repository):
    """Our own gateway (TEI and OpenAI routes) in front of the module's server: the peer of the bench tests."""
    from serving.gateway.config import GatewayConfig
    from serving.gateway.process import GatewayProcess

    with GatewayProcess(GatewayConfig(repository=repository, triton_url=server.grpc_url, port=0,
                                      api_key=None)) as gw:
        yield gw


@pytest.mark.server
def test_bench_served_small(tiny_checkpoint, tiny_onnx, repository, texts_csv, gateway, tmp_path):
    """Every served row, the gateway's rows, long documents and a peer server (our gateway's TEI /predict,
    started apart: what --peer-url measures) in one run; thresholds the run meets pass."""
    from loadtest.bench import BenchConfig, run_bench

    res = run_bench(BenchConfig(checkpoint=tiny_checkpoint, build=_build_dir(tmp_path, tiny_onnx),
                                repository=repository, texts=texts_csv, n_texts=16, batch_size=8, threads=1,
                                bf16="off", pipeline_batch1=False, concurrency=(2,), protocols=("grpc", "http"),
                                texts_per_request=4, single_text_concurrency=2, served_seconds=0.6,
                                open_loop_seconds=1.0, warmup_seconds=0.2, out=tmp_path / "bench", long_docs=6,
                                ceiling_seconds=0.3, peer_url=gateway.url, peer_api="tei", min_ratio=0.001,
                                slo_p99_ms=60_000))
    kinds = [r["kind"] for r in res["results"]]
    assert kinds.count("served") == 4 and kinds.count("open-loop") == 1 and kinds.count("ceiling") == 1
    gateway = {r["name"]: r for r in res["results"] if r["kind"] == "gateway"}  # the same requests, alternating
    assert sorted(gateway) == ["gateway http c1 x4", "gateway http c2 x4", "grpc direct c1 x4", "grpc direct c2 x4"]
    assert all(r["seq_per_s"] > 0 and r["detail"]["rounds"] for r in gateway.values())
    assert len(gateway["grpc direct c2 x4"]["detail"]["rounds"]) == 2  # alternating rounds; c1: one paired run
    assert any(n.startswith("gateway throughput") for n in res["notes"])
    long_docs = {r["name"]: r for r in res["results"] if r["kind"] == "long-docs"}  # 2k-50k characters
    assert sorted(long_docs) == ["long docs: in-process definition 1 thread", "long docs: served grpc c1 x1",
                                 "long docs: served grpc c2 x1"]
    lo, hi = long_docs["long docs: in-process definition 1 thread"]["detail"]["chars"]
    assert 2_000 <= lo <= hi <= 50_000
    for r in long_docs.values():
        assert r["seq_per_s"] > 0
        if "served" in r["name"]:  # the served answers are the in-process run's (same definition, same file)
            assert r["detail"]["load"]["failures"] == 0 and r["detail"]["label_agreement_with_in_process"] == 1.0
    for r in res["results"]:
        assert r["seq_per_s"] > 0
        if r["kind"] in ("served", "open-loop"):
            assert r["detail"]["load"]["failures"] == 0
            cores = r["detail"]["cpu_cores"]  # measured from the server's process tree and this process
            assert cores["tritonserver"] + sum(v for k, v in cores.items() if k not in (
                "tritonserver", "client", "total", "machine_cores")) > 0 and cores["client"] > 0
            assert 0 < r["ratio_to_ceiling"]
    by = {r["name"]: r for r in res["results"]}
    # the served deployment and in-process ORT run the same ONNX file on the same texts: same labels
    assert by["served grpc c2 x4"]["accuracy"] == pytest.approx(by["onnxruntime fp32 b8"]["accuracy"], abs=1 / 16)
    # the peer: the same load shapes, the same texts, the same labels as the served model (same ONNX file)
    peer = {r["name"]: r for r in res["results"] if r["kind"] == "peer"}
    assert sorted(peer) == ["peer tei c2 x1", "peer tei c2 x4"]
    for r in peer.values():
        assert r["seq_per_s"] > 0 and r["detail"]["load"]["failures"] == 0 and r["ratio_to_ceiling"] > 0
        assert r["accuracy"] == pytest.approx(by["served grpc c2 x4"]["accuracy"])
    assert [line.split(":")[0] for line in res["check_lines"]] == ["PASS", "PASS", "PASS"] and not res["failed"]
    ol = by["served grpc open-loop 70% x4"] if "served grpc open-loop 70% x4" in by else \
        next(r for r in res["results"] if r["kind"] == "open-loop")
    assert ol["detail"]["load"]["target_rps"] == pytest.approx(0.7 * ol["detail"]["saturating_requests_per_s"])


def test_served_repository_is_read_through_serving_repository(repository, tiny_onnx, tiny_checkpoint, tmp_path):
    """loadtest knows a repository only through serving.repository.read_repository; tune refuses the GPU one."""
    from loadtest.artifacts import read_served_repository
    from loadtest.errors import LoadtestError
    from loadtest.tune import _sources

    info, m = read_served_repository(repository), read_repository(repository).model()
    assert (info.onnx, info.tokenizer_dir, info.model) == (m.onnx_path, m.tokenizer_dir, m.contract)
    assert info.labels == LABELS and info.variant == "fp32" and info.target == "cpu"
    assert (info.instances, info.intra_op_threads) == (len(usable_cores()), 1)
    assert (info.max_batch_size, info.max_queue_delay_us, info.preferred_batch_sizes) == (32, 1000, (1,))
    assert info.summary()["config"]["max_batch_size"] == 32
    gpu = write_repository(tmp_path / "gpu", onnx_model=tiny_onnx, tokenizer_dir=tiny_checkpoint,
                           id2label=dict(enumerate(LABELS)), config=RepositoryConfig(target="gpu"))
    with pytest.raises(LoadtestError, match="gpu repository"):
        _sources(gpu, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadtestError, match="no served model"):
        read_served_repository(tmp_path / "empty")


@pytest.mark.server
def test_tune_sweeps_and_writes_the_best(repository, texts_csv, tmp_path):
    import shutil

    from loadtest.tune import TuneConfig, run_tune, stage1_layouts
    from serving.models import runtime
    from serving.repository import RepositoryConfig, usable_cores

    repo = tmp_path / "model_repository"
    shutil.copytree(repository, repo)
    cfg = TuneConfig(repository=repo, texts=texts_csv, duration_per_trial="1s", warmup="0.2s",
                     concurrency=4, texts_per_request=4, layouts=((1, 1), (2, 1)), queue_delays_us=(500,),
                     max_batch_sizes=(), n_texts=32, out=tmp_path / "tune")
    s = run_tune(cfg)
    stage1 = [(c.encoder_instances, c.pin_instances) for c in stage1_layouts(cfg, RepositoryConfig())]
    pinnable = runtime.pinnable(1, 1, usable_cores())  # one 1-thread instance fits; not under a CPU quota
    assert (1, False) in stage1 and ((1, True) in stage1) == pinnable  # tried both ways when the model pins it
    assert [(t["encoder_instances"], t["pin_instances"]) for t in s["trials"][:-1]] == stage1
    assert len(s["trials"]) == len(stage1) + 1 and all(t["failures"] == 0 and t["seq_per_s"] > 0 for t in s["trials"])
    best = s["best"]
    enc = read_repository(repo).model().encoder_config
    assert sum(g.count for g in enc.instance_group) == best["encoder_instances"]
    assert enc.parameters["pin_instances"].string_value == ("true" if best["pin_instances"] else "false")
    assert enc.dynamic_batching.max_queue_delay_microseconds == best["max_queue_delay_us"]
    own = json.loads((repo / "provenance.json").read_text())["served"][DEFAULT_CLASSIFIER]
    assert own["exporter"]["tuned"]["best"]["encoder_instances"] == best["encoder_instances"]
    assert own["exporter"]["variant"] == "fp32" and own["version"] == 2  # the tuned model's next version
    saved = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert len(saved["trials"]) == len(stage1) + 1 and "| pinned |" in (tmp_path / "tune" / "tune.md").read_text()


def test_tune_keeps_the_repositorys_other_models(repository, texts_csv, tmp_path):
    """Tuning one model of a repository that serves two adds the tuned model's next version and leaves the
    other model as it was (tune used to rewrite the whole repository with the tuned model alone)."""
    import shutil

    from loadtest.tune import TuneConfig, run_tune
    from serving.contract import ServedModel
    from serving.repository import add_model

    repo = tmp_path / "model_repository"
    shutil.copytree(repository, repo)
    first = read_repository(repo).model()
    add_model(repo, onnx_model=first.onnx_path, tokenizer_dir=first.tokenizer_dir,
              model=ServedModel(name="sentiment", labels=tuple(LABELS)),
              config=RepositoryConfig(max_batch_size=16, intra_op_threads=1, encoder_instances=1),
              provenance={"variant": "other build"})
    before = json.loads((repo / "provenance.json").read_text())
    cfg = TuneConfig(repository=repo, model_name="sentiment", texts=texts_csv, duration_per_trial="1s",
                     warmup="0.2s", concurrency=2, texts_per_request=2, layouts=((2, 1),), try_unpinned=False,
                     queue_delays_us=(), max_batch_sizes=(), n_texts=16, out=tmp_path / "tune")
    s = run_tune(cfg)
    assert s["trials"][0]["failures"] == 0 and s["trials"][0]["seq_per_s"] > 0  # trials reach the named model
    after = read_repository(repo)
    assert set(after.models) == {DEFAULT_CLASSIFIER, "sentiment"}
    tuned = after.models["sentiment"]
    assert tuned.instances == 2 and tuned.version == 2
    prov = json.loads((repo / "provenance.json").read_text())
    assert prov["served"][DEFAULT_CLASSIFIER] == before["served"][DEFAULT_CLASSIFIER]
    kept = {k: v for k, v in prov["files"].items() if k.startswith(f"{DEFAULT_CLASSIFIER}/")}
    assert kept and kept == {k: v for k, v in before["files"].items() if k.startswith(f"{DEFAULT_CLASSIFIER}/")}
    assert prov["served"]["sentiment"]["exporter"]["variant"] == "other build"
    assert prov["served"]["sentiment"]["exporter"]["tuned"]["best"]["encoder_instances"] == 2


@pytest.mark.slow
@pytest.mark.server
def test_full_bench_defaults_on_tiny_model(tiny_checkpoint, tiny_onnx, repository, tmp_path):
    """The default bench (all concurrencies, both protocols, 512 corpus texts) end to end: minutes."""
    from loadtest.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--checkpoint", str(tiny_checkpoint), "--build", str(_build_dir(tmp_path, tiny_onnx)),
                 "--repository", str(repository), "--out", str(out)]) == 0
    saved = json.loads((out / "bench.json").read_text())
    assert sum(r["kind"] == "served" for r in saved["results"]) == 10


def test_parse_metrics_and_the_breakdown_arithmetic():
    from loadtest.errors import LoadtestError
    from loadtest.profile import breakdown, model_counters, parse_metrics

    text = ('# HELP x\nnv_inference_request_success{model="classifier",version="1"} 10\n'
            'nv_inference_queue_duration_us{model="classifier",version="1"} 2000\n'
            'nv_inference_request_duration_us{model="classifier",version="1"} 30000\n'
            'nv_inference_compute_infer_duration_us{model="classifier",version="1"} 25000\n'
            'textclf_stage_seconds_total{model="classifier",stage="execute"} 0.02\n'
            'textclf_stage_seconds_total{model="classifier",stage="encoder"} 0.015\n'
            'nv_inference_request_success{model="other",version="1"} 99\n')
    after = model_counters(parse_metrics(text), "classifier")
    assert after["requests"] == 10 and after["stage:execute"] == pytest.approx(20_000)
    rows = dict(breakdown({}, after, client_mean_ms=4.0))
    assert rows["  Triton request total"] == pytest.approx(3.0) and rows["    queue"] == pytest.approx(0.2)
    assert rows["  front: HTTP/gRPC, client library, loopback"] == pytest.approx(1.0)
    assert rows["      python-backend IPC (compute_infer - execute)"] == pytest.approx(0.5)
    assert rows["        ONNX Runtime"] == pytest.approx(1.5)
    with pytest.raises(LoadtestError, match="no request"):
        breakdown(after, after, 1.0)


@pytest.mark.server
def test_profile_splits_a_served_requests_time(server, repository, texts_csv, tmp_path):
    """The model's own timers and Triton's counters, read from the metrics port around a real closed loop:
    every part measured, the parts inside the model within its execute, the execute within compute_infer,
    compute_infer within Triton's request total."""
    from loadtest.profile import ProfileConfig, measure_profile

    cfg = ProfileConfig(repository=repository, texts=texts_csv, concurrency=2, texts_per_request=2, seconds=2.0,
                        warmup_seconds=0.5, out=tmp_path / "p")
    rows, load = measure_profile(cfg, server, corpus_texts(32))
    by = dict(rows)
    assert load["requests"] > 0 and load["server_requests"] >= load["requests"] and load["executions"] > 0
    for part in ("        tokenizer", "        ONNX Runtime", "      model execute", "    compute_infer",
                 "  Triton request total", "client latency (mean)"):
        assert by[part] > 0, part
    assert by["        tokenizer"] + by["        ONNX Runtime"] <= by["      model execute"] <= by["    compute_infer"]
    # (not <= the client's latency: Triton ends a request when it releases it, which can come after the
    # client has its answer, and the two windows differ by the requests in flight at their edges)
    assert by["    compute_infer"] <= by["  Triton request total"]


def test_bench_cli_exits_1_with_one_line_when_a_threshold_is_missed(tiny_checkpoint, texts_csv, tmp_path, capsys):
    """--min-ratio with nothing to compare against (no build, no repository: no ceiling) cannot hold."""
    from loadtest.cli import main

    code = main(["bench", "--checkpoint", str(tiny_checkpoint), "--no-build", "--no-served", "--no-batch1",
                 "--texts", str(texts_csv), "--n-texts", "8", "--batch-size", "4", "--threads", "1", "--bf16", "off",
                 "--min-ratio", "0.8", "--out", str(tmp_path / "b")])
    out, err = capsys.readouterr()
    assert code == 1 and "FAIL: --min-ratio 0.8: no ceiling to compare" in out
    assert err.strip().splitlines()[-1] == ("python -m loadtest: error: threshold not met: --min-ratio 0.8: no "
                                            "ceiling to compare")


def test_the_ceiling_runs_what_the_repository_serves(tiny_onnx, tiny_checkpoint, tmp_path):
    """ceiling_source reads the served model's ONNX file, tokenizer, max_length and intra-op threads from the
    repository's config (not the bench's own --max-length or a fixed thread count)."""
    from loadtest.bench import ceiling_source
    from loadtest.bench_common import BenchConfig

    repo = write_repository(tmp_path / "repo", onnx_model=tiny_onnx, tokenizer_dir=tiny_checkpoint,
                            id2label=dict(enumerate(LABELS)),
                            config=RepositoryConfig(max_length=64, intra_op_threads=2, encoder_instances=1),
                            provenance={"variant": "fp32"})
    cfg = BenchConfig(checkpoint=tiny_checkpoint, build=None, repository=repo, max_length=128, out=tmp_path / "b")
    variant, model = ceiling_source(cfg)
    served = read_repository(repo).model("classifier")
    assert (model.onnx, model.tokenizer_dir) == (served.onnx_path, served.tokenizer_dir)
    assert (model.max_length, model.intra_op_threads) == (64, 2)


def test_each_ceiling_process_runs_in_its_own_session(tiny_onnx, tiny_checkpoint):
    """As tritonserver does: on a shared machine the kernel's autogroup scheduler gives each session a fair
    share, so ceiling processes left in the caller's session measured ~13 % below the same processes in their
    own sessions (docs/LOADTEST.md)."""
    import os

    from loadtest.ceiling import CeilingModel, measure_ceiling

    model = CeilingModel(tiny_onnx, tiny_checkpoint)
    run = measure_ceiling(model, corpus_texts(6), processes=2, min_seconds=0.2)
    assert len(set(run.sessions)) == 2 and os.getsid(0) not in run.sessions
    shared = measure_ceiling(model, corpus_texts(6), processes=2, min_seconds=0.2, own_session=False)
    assert set(shared.sessions) == {os.getsid(0)}
