"""The GPU target (one python-backend model, ONNX Runtime on token-budget sub-batches), served by the real
tritonserver here with ONNX Runtime's CPU provider standing in for CUDA, and its batching planner alone."""
from __future__ import annotations

import csv
import itertools
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from serving_helpers import corpus_texts, torch_reference

from serving.client import TextClassifier
from serving.models import token_batch
from serving.repository import (
    DEFAULT_MAX_REQUEST_BYTES, RepositoryConfig, Target, read_repository, write_repository,
)
from serving.server import LocalTritonServer, ServerConfig

LABELS = ["negative", "neutral", "positive"]
CLIENTS, PER_REQUEST = 16, 8  # the load: 16 clients x 8 texts


# ------------------------------------------------------------------------------------ the planner


def _cost(groups, lengths, overhead):
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


def _best_cost(lengths, budget, overhead):
    """Brute force over every cut of the sorted rows (small n only)."""
    s = sorted(lengths)
    best = None
    for cuts in itertools.product([0, 1], repeat=len(s) - 1):
        groups, cur = [], [0]
        for i, cut in enumerate(cuts, start=1):
            if cut:
                groups.append(cur)
                cur = []
            cur.append(i)
        groups.append(cur)
        if any(len(g) * s[g[-1]] > budget and len(g) > 1 for g in groups):
            continue
        cost = sum(len(g) * s[g[-1]] + overhead for g in groups)
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_plan_is_the_cheapest_cut_within_the_budget(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 60, size=9).tolist()
    budget, overhead = int(rng.integers(60, 300)), int(rng.integers(0, 80))
    groups = token_batch.plan(lengths, budget, overhead)
    assert sorted(int(i) for g in groups for i in g) == list(range(len(lengths)))  # every row exactly once
    assert all(len(g) == 1 or len(g) * max(lengths[i] for i in g) <= budget for g in groups)
    assert _cost(groups, lengths, overhead) == _best_cost(lengths, budget, overhead)


def test_plan_extremes():
    assert token_batch.plan([], 100, 10) == []
    assert [len(g) for g in token_batch.plan([5] * 10, 100, 0)] == [10]  # no padding to save: one call
    assert sorted(len(g) for g in token_batch.plan([5] * 10, 20, 0)) == [2, 4, 4]  # the budget cuts: 4 x 5 <= 20
    assert len(token_batch.plan([2, 3, 50, 60], 10_000, 0)) == 4  # no overhead: no padding at all
    assert [len(g) for g in token_batch.plan([300, 2], 100, 0)] == [1, 1]  # a row over the budget runs alone


def test_run_rows_puts_every_answer_back_and_counts_tokens(tiny_onnx, tiny_checkpoint):
    """In process: sub-batched rows give each row its own answer (fp32 <= 1e-5 of the row run alone)."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    sess = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    tok.enable_truncation(128)
    tok.no_padding()
    rows = [{"input_ids": e.ids, "attention_mask": e.attention_mask, "token_type_ids": e.type_ids}
            for e in tok.encode_batch(corpus_texts(40, seed=3))]

    def run(feeds):
        return sess.run(["logits", "probabilities"], feeds)

    (logits, probs), record = token_batch.run_rows(run, rows, 0, max_batch_tokens=512, overhead_tokens=16)
    alone = np.concatenate([run(token_batch.pad([r], 0))[0] for r in rows])
    assert np.abs(logits - alone).max() <= 1e-5 and probs.shape == (40, 3)
    lengths = [len(r["input_ids"]) for r in rows]
    assert record.rows == 40 and record.real_tokens == sum(lengths)
    assert record.real_tokens < record.computed_tokens <= 1.3 * record.real_tokens and record.sub_batches > 1  # padded
    assert token_batch.parse_records(f"x\nI1205 model.py:9] \"c: {record.line()}\"\n{record.line()}\n").rows == 80


def test_providers_put_tensorrt_and_cuda_first_and_fall_back_to_the_cpu():
    cpu_only = token_batch.providers({"tensorrt": "true"}, ["CPUExecutionProvider"])
    assert cpu_only == [("CPUExecutionProvider", {})]  # this machine: the repository still serves
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert [p for p, _ in token_batch.providers({"tensorrt": "false"}, gpu, 1)] == gpu[1:]
    chosen = token_batch.providers({"tensorrt": "true"}, gpu, 1)
    assert [p for p, _ in chosen] == gpu and chosen[1][1] == {"device_id": 1}
    assert chosen[0][1]["trt_fp16_enable"] and chosen[0][1]["trt_engine_cache_path"] == "/tmp/trt_cache"


# ------------------------------------------------------------------------------- the served model


@pytest.fixture(scope="module")
def gpu_repository(tiny_onnx, tiny_checkpoint, tmp_path_factory) -> Path:
    return write_repository(tmp_path_factory.mktemp("gpu") / "model_repository", onnx_model=tiny_onnx,
                            tokenizer_dir=tiny_checkpoint, id2label=dict(enumerate(LABELS)),
                            config=RepositoryConfig(target=Target.GPU, max_batch_size=64))


@pytest.fixture(scope="module")
def server(gpu_repository):
    with LocalTritonServer(ServerConfig(gpu_repository, startup_timeout_s=120)) as srv:
        yield srv


def _served_token_records(srv, at_least: int = 0, timeout_s: float = 15.0) -> token_batch.BatchRecord:
    """The model's sub-batch records in the server log once they stopped moving and count at least ``at_least``
    rows: a record reaches the log a moment after its response (read at once, a test saw 257 rows of 256)."""
    deadline, last = time.monotonic() + timeout_s, None
    while True:
        record = token_batch.parse_records(srv.log_text())
        if (last is not None and record.rows == last.rows and record.rows >= at_least) or time.monotonic() > deadline:
            return record
        last = record
        time.sleep(0.3)


def _probs(preds):
    return np.array([[p.probabilities[label] for label in LABELS] for p in preds])


@pytest.mark.server
def test_gpu_repository_as_built_is_served_here(server, gpu_repository, tiny_checkpoint):
    """The repository written for --target gpu loads unchanged; answers match PyTorch; a text's answer is the
    same alone or among 127 others under 16 concurrent clients (fp32 <= 1e-5); padding stays <= 1.3x."""
    assert read_repository(gpu_repository).target is Target.GPU
    texts = corpus_texts(CLIENTS * PER_REQUEST * 2, seed=11)
    ref_probs, ref_labels = torch_reference(tiny_checkpoint, texts)
    client = TextClassifier(server.http_url)
    start = _served_token_records(server)
    alone = _probs([client.classify([t])[0] for t in texts[:24]])
    before = _served_token_records(server, at_least=start.rows + 24)
    requests = [texts[i:i + PER_REQUEST] for i in range(0, len(texts), PER_REQUEST)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(lambda rows: TextClassifier(server.http_url).classify(rows), requests))
    after = _served_token_records(server, at_least=before.rows + len(texts))
    preds = [p for a in answers for p in a]
    probs = _probs(preds)
    assert [p.label for p in preds] == ref_labels and np.abs(probs - ref_probs).max() < 1e-4
    assert np.abs(probs[:24] - alone).max() <= 1e-5
    rows, real = after.rows - before.rows, after.real_tokens - before.real_tokens
    computed, calls = after.computed_tokens - before.computed_tokens, after.sub_batches - before.sub_batches
    assert rows == len(texts) and real > 0 and calls >= 1
    assert real <= computed <= 1.3 * real, (real, computed)


@pytest.mark.server
def test_a_bad_request_fails_alone_in_a_batch(server):
    texts = corpus_texts(8, seed=5)
    good = json.dumps({"inputs": [{"name": "TEXT", "shape": [2, 1], "datatype": "BYTES",
                                   "data": texts[:2]}]}).encode()
    bad = json.dumps({"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES",
                                  "data": ["x" * (DEFAULT_MAX_REQUEST_BYTES + 1)]}]}).encode()  # over the cap

    def post(body):
        req = urllib.request.Request(f"http://{server.http_url}/v2/models/classifier/infer", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(post, [good, bad] * 4))
    assert all(code == 200 and len(body["outputs"][0]["data"]) == 2 for code, body in results[0::2])
    assert all(code == 400 and "max_request_bytes" in body["error"] for code, body in results[1::2])
    assert "Traceback" not in json.dumps(results)


@pytest.mark.server
def test_metrics_count_the_gpu_targets_tokens_per_row(server):
    """The GPU model feeds the token counters per row (token_batch.run_rows' row_computed): after concurrent
    requests, /metrics moved by textclf_rows_total = the rows sent and textclf_computed_tokens_total >=
    textclf_input_tokens_total > 0, the same real and computed tokens as the model's own sub-batch records."""
    from test_metrics import delta, rows_counted, settled

    texts = corpus_texts(CLIENTS * PER_REQUEST // 2, seed=21)
    requests = [texts[i:i + PER_REQUEST] for i in range(0, len(texts), PER_REQUEST)]
    before, records_before = settled(server), _served_token_records(server)
    with ThreadPoolExecutor(CLIENTS) as pool:  # concurrent: sub-batches mix requests, so padding can occur
        answers = list(pool.map(lambda rows: TextClassifier(server.http_url).classify(rows), requests))
    after = settled(server, rows_counted(before, classifier=len(texts)))
    records_after = _served_token_records(server, at_least=records_before.rows + len(texts))
    assert sum(len(a) for a in answers) == len(texts)
    moved = {name: delta(after, before, f"textclf_{name}_total", model="classifier")
             for name in ("rows", "input_tokens", "computed_tokens")}
    assert moved["rows"] == len(texts) and moved["computed_tokens"] >= moved["input_tokens"] > 0, moved
    assert moved["input_tokens"] == records_after.real_tokens - records_before.real_tokens, moved
    assert moved["computed_tokens"] == records_after.computed_tokens - records_before.computed_tokens, moved


# ------------------------------------------------------------------------------------------- slow


def _test_split_texts(tmp_path: Path) -> list[str]:
    from finetune.data import DataConfig, make_splits

    make_splits(DataConfig(out=tmp_path / "data"))
    with open(tmp_path / "data" / "test.csv", encoding="utf-8", newline="") as fh:
        return [row["text"] for row in csv.DictReader(fh)]


@pytest.mark.slow
@pytest.mark.server
def test_example_corpus_at_16_clients_x_8_texts_computes_at_most_1_3x_the_real_tokens(server, tmp_path,
                                                                                       record_property):
    """The whole test split of the example corpus (3,000 texts) through the served GPU-target model."""
    texts = _test_split_texts(tmp_path)
    requests = [texts[i:i + PER_REQUEST] for i in range(0, len(texts), PER_REQUEST)]
    before = _served_token_records(server)
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(lambda rows: TextClassifier(server.http_url).classify(rows), requests))
    after = _served_token_records(server)
    assert sum(len(a) for a in answers) == len(texts)
    real, computed = after.real_tokens - before.real_tokens, after.computed_tokens - before.computed_tokens
    figures = {"texts": len(texts), "clients": CLIENTS, "texts_per_request": PER_REQUEST, "real_tokens": real,
               "computed_tokens": computed, "ratio": round(computed / real, 4),
               "rows_per_sub_batch": round((after.rows - before.rows) / max(1, after.sub_batches - before.sub_batches),
                                         1)}
    record_property("gpu_target_tokens", figures)
    print("gpu-target tokens:", json.dumps(figures))
    assert after.rows - before.rows == len(texts) and computed <= 1.3 * real, figures


# ------------------------------------------------------------------------------------------ the gate


def test_gpu_gate_runs_the_served_sub_batches_in_the_rows_order(tiny_onnx, tiny_checkpoint):
    """GateMode.BATCHED feeds the sub-batches the server forms (sorted, each padded to its own longest row,
    within the token budget) and puts every output back in its row's place: equal to each row run alone."""
    from transformers import AutoTokenizer

    from exporter import parity
    from exporter.artifacts import GateMode

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    batches = parity.tokenize(tok, corpus_texts(70, seed=9), batch_size=32, max_length=128)
    feeds = parity.gate_feeds(batches, GateMode.BATCHED, max_batch_tokens=256)
    assert sorted(np.concatenate([f[parity.ROWS] for f in feeds]).tolist()) == list(range(70))
    assert all(f["input_ids"].size <= 256 or len(f["input_ids"]) == 1 for f in feeds)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert real <= sum(f["input_ids"].size for f in feeds) <= 1.3 * real < sum(b["input_ids"].size for b in batches)
    sess = parity.session(tiny_onnx, parity.Precision.FP32)
    served, _ = parity.ort_outputs(sess, feeds)
    alone, _ = parity.ort_outputs(sess, parity.unbatch(batches))
    assert np.abs(served - alone).max() <= 1e-5


@pytest.mark.slow
@pytest.mark.server
def test_exporter_builds_the_gpu_target_gated_as_served_and_it_serves(tmp_path):
    """`exporter build --target gpu --max-batch-tokens`: the gate runs the served sub-batches, the budget reaches
    the repository, and the repository serves as built (CPU provider here) with the gated answers."""
    from test_exporter import FAST, make_checkpoint, run_main

    ckpt = make_checkpoint(tmp_path)
    rc = run_main(["build", ckpt, "--out", tmp_path / "build", "--repository", tmp_path / "repo", "--target", "gpu",
                   "--precisions", "fp32", "--max-batch-tokens", "2048", "--tensorrt", *FAST])
    report = json.loads((tmp_path / "build" / "report.json").read_text())
    assert rc == 0 and report["gate_mode"] == "batched" and report["selected"] == "fp32"
    assert report["variants"]["fp32"]["parity"]["max_abs_diff"] <= 1e-4
    info = read_repository(tmp_path / "repo")
    params = {k: v.string_value for k, v in info.model().config.parameters.items()}
    assert info.target is Target.GPU and (params["max_batch_tokens"], params["tensorrt"]) == ("2048", "true")
    texts = corpus_texts(64, seed=21)
    ref_probs, ref_labels = torch_reference(ckpt, texts)
    with LocalTritonServer(ServerConfig(tmp_path / "repo", startup_timeout_s=180)) as srv:
        preds = TextClassifier(srv.http_url).classify(texts)
    assert [p.label for p in preds] == ref_labels and np.abs(_probs(preds) - ref_probs).max() < 1e-4


@pytest.mark.slow
@pytest.mark.server
def test_bench_records_the_gpu_targets_token_ratio(gpu_repository, tiny_checkpoint, tiny_onnx, tmp_path):
    """`loadtest bench` on a GPU-target repository writes the served tokens (real, computed, ratio) into
    bench.json's served configuration and a note."""
    import shutil

    from test_loadtest_server import _build_dir

    from loadtest.bench import BenchConfig, run_bench

    texts_csv = tmp_path / "texts.csv"
    with open(texts_csv, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows([t, LABELS[i % 3]] for i, t in enumerate(corpus_texts(64, seed=2)))
    repo = shutil.copytree(gpu_repository, tmp_path / "repo")
    res = run_bench(BenchConfig(checkpoint=tiny_checkpoint, build=_build_dir(tmp_path, tiny_onnx), repository=repo,
                                texts=texts_csv, n_texts=64, batch_size=8, threads=1, bf16="off",
                                pipeline_batch1=False, concurrency=(16,), protocols=("grpc",),
                                texts_per_request=PER_REQUEST, single_text_concurrency=2, served_seconds=2.0,
                                open_loop_seconds=2.0, warmup_seconds=0.5, out=tmp_path / "bench", ceiling_seconds=0.5))
    saved = json.loads((tmp_path / "bench" / "bench.json").read_text())
    tokens = saved["machine"]["served"]["tokens"]
    assert tokens["real_tokens"] <= tokens["computed_tokens"] and tokens["rows"] > 64
    assert tokens["ratio"] == pytest.approx(tokens["computed_tokens"] / tokens["real_tokens"], abs=1e-4)
    assert any(n.startswith("gpu target: the encoder computed") for n in res["notes"])
