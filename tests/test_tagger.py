"""Token classification (issue 19 item 3): a tiny random-init BertForTokenClassification (packaged vocabulary)
built by `exporter build` (detected from its architecture), gated per token and per entity, served as `tagger`
by the real tritonserver: ENTITIES equal `transformers.pipeline("token-classification")` for every aggregation
strategy, unicode text and texts past max_length included. One server start serves all five strategies."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import packaged_encoder_dir
from serving.contract import DEFAULT_TAGGER, ENTITIES, Aggregation, Head, entity_key
from serving.repository import RepositoryConfig, add_model, read_repository
from serving_helpers import corpus_texts

TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
MAX_LENGTH = 48
OVERLAP = 8  # --long-text chunk: tokens consecutive windows share (the pipeline's stride)
WINDOWED = "tagger_windows"
OPENVINO = "tagger_openvino"  # the ov_fp32 variant (OpenVINO IR), served whatever the build selected
N_EVAL = 16
UNICODE = ["Zoë Müller flew from Zürich to Kraków 🙂 with naïve café owners — “quoted” text",
           "東京 and 北京: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﬁne ligatures, e\u0301 combining marks, and an [UNK]-free ✓ line"]


def build_tiny_tagger(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, initializer_range=0.2,
                        num_labels=len(TAGS), id2label=dict(enumerate(TAGS)),
                        label2id={t: i for i, t in enumerate(TAGS)})
    BertForTokenClassification(config).eval().save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(packaged_encoder_dir()).save_pretrained(out)
    return out


def _texts() -> list[str]:
    texts = corpus_texts(N_EVAL - 3, seed=7)
    return texts + UNICODE + [" ".join(corpus_texts(12, seed=8))]  # the last one past max_length


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    from exporter.cli import main

    root = tmp_path_factory.mktemp("tagger")
    checkpoint = build_tiny_tagger(root / "ner")
    eval_csv = root / "eval.csv"
    with open(eval_csv, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([["text"]] + [[t] for t in _texts()])
    code = main(["build", str(checkpoint), "--eval-data", str(eval_csv), "--precisions", "fp32,int8",
                 "--eval-size", str(N_EVAL), "--max-length", str(MAX_LENGTH), "--out", str(root / "build"),
                 "--repository", str(root / "repo"), "--instances", "1"])
    report = json.loads((root / "build" / "report.json").read_text())
    repo = root / "repo"
    served = read_repository(repo).models[DEFAULT_TAGGER]
    # The fp32 graph under every strategy (the build may have selected int8, whose scores move): one server
    # start answers them all; `tagger` itself gets it as its next version.
    for agg in Aggregation:
        add_model(repo, onnx_model=root / "build" / "fp32.onnx", tokenizer_dir=checkpoint,
                  model=replace(served.contract, name=_name(agg), aggregation=agg),
                  config=RepositoryConfig(max_length=MAX_LENGTH, encoder_instances=1), keep_versions=1)
    add_model(repo, onnx_model=root / "build" / "fp32.onnx", tokenizer_dir=checkpoint,
              model=replace(served.contract, name=WINDOWED, aggregation=Aggregation.SIMPLE),
              config=RepositoryConfig(max_length=MAX_LENGTH, encoder_instances=1, long_text="chunk",
                                      chunk_overlap=OVERLAP, max_chunks=16))
    if (root / "build" / "ov_fp32" / "model.xml").is_file():
        add_model(repo, onnx_model=root / "build" / "ov_fp32" / "model.onnx", tokenizer_dir=checkpoint,
                  model=replace(served.contract, name=OPENVINO, aggregation=Aggregation.SIMPLE),
                  config=RepositoryConfig(max_length=MAX_LENGTH, encoder_instances=1))
    return {"code": code, "checkpoint": checkpoint, "repo": repo, "report": report}


@pytest.fixture(scope="module")
def server(built):
    from serving.server import LocalTritonServer, ServerConfig

    assert built["code"] == 0
    with LocalTritonServer(ServerConfig(built["repo"], startup_timeout_s=180)) as srv:
        yield srv


def _pipeline(checkpoint: Path, aggregation: Aggregation, texts: list[str], **kwargs) -> list[list[dict]]:
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(checkpoint, model_max_length=MAX_LENGTH)
    model = AutoModelForTokenClassification.from_pretrained(checkpoint).eval()
    pipe = pipeline("token-classification", model=model, tokenizer=tok, aggregation_strategy=aggregation.value,
                    device="cpu", **kwargs)
    return pipe(texts)


def _name(agg: Aggregation) -> str:
    return DEFAULT_TAGGER if agg is Aggregation.SIMPLE else f"tagger_{agg.value}"


def test_build_detects_the_tagger_and_gates_it_per_token_and_per_entity(built):
    report = built["report"]
    assert report["selected"] in ("fp32", "int8", "ov_fp32") and report["aggregation"] == "simple"
    chosen = report["variants"][report["selected"]]
    assert chosen["passed"] and chosen["gated"] and chosen["entity_agreement"] >= 0.98
    for name, v in report["variants"].items():  # every variant timed; gated fastest first until one passes
        assert v["rows_per_s"] > 0 and 0.0 <= v["entity_agreement"] <= 1.0
        if not v["gated"]:
            assert v["rows_per_s"] <= chosen["rows_per_s"] and not v["passed"]
            assert v["reasons"][0].startswith(f"not gated: slower than {report['selected']}, which passed")
    fp32 = report["variants"]["fp32"]
    if fp32["gated"]:  # (else int8 was faster and passed; the fp32 graph's gate is tested below on its own)
        assert fp32["passed"] and fp32["max_abs"] < 1e-4 and fp32["token_agreement"] == 1.0
        assert fp32["entity_agreement"] == 1.0 and fp32["texts_equal"] == 1.0
    assert report["pipeline_rows_per_s"] > 0 and {"reference", "export", "fp32-speed"} <= set(report["stage_seconds"])
    # the one build record every task's report extends (exporter.artifacts.BuildRecord)
    assert report["repository"] == str(built["repo"].absolute()) and "onnxruntime" in report["versions"]
    info = read_repository(built["repo"]).models[DEFAULT_TAGGER]
    assert info.contract.head is Head.TOKEN_CLASSIFICATION and info.contract.labels == TAGS
    assert [t.name for t in info.contract.outputs] == [ENTITIES] and info.contract.task == "token-classification"


def _assert_equal(texts, expected, got, key):
    assert sum(len(r) for r in expected) > 0  # the random model finds entities: the comparison means something
    for text, exp, row in zip(texts, expected, got):
        assert [(e[key], e["word"], e["start"], e["end"]) for e in row] == \
               [(e[key], e["word"], int(e["start"]), int(e["end"])) for e in exp], text
        assert all(abs(e["score"] - float(x["score"])) < 1e-4 for e, x in zip(row, exp))


@pytest.mark.parametrize("aggregation", list(Aggregation))
def test_served_entities_equal_the_pipeline(server, built, aggregation):
    from serving.client import Tagger

    texts = _texts()
    expected = _pipeline(built["checkpoint"], aggregation, texts)
    with Tagger(url=server.http_url, model=_name(aggregation)) as tagger:
        got = tagger.entities(texts)
    _assert_equal(texts, expected, got, entity_key(aggregation))


def test_long_texts_in_overlapping_windows_equal_the_pipeline_with_stride(server, built):
    """--long-text chunk: every window run alone, entities merged by offset = pipeline(stride=overlap)."""
    from serving.client import AsyncTagger

    texts = _texts()
    long_text = texts[-1]
    expected = _pipeline(built["checkpoint"], Aggregation.SIMPLE, texts, stride=OVERLAP)
    truncated = _pipeline(built["checkpoint"], Aggregation.SIMPLE, [long_text])[0]
    assert max(e["end"] for e in expected[-1]) > max(e["end"] for e in truncated)  # windows reach further

    async def ask():
        async with AsyncTagger(url=server.http_url, model=WINDOWED) as tagger:
            return await tagger.entities(texts)

    import asyncio

    _assert_equal(texts, expected, asyncio.run(ask()), "entity_group")


def test_the_gate_measures_windows_and_refuses_a_drifting_variant(built, tmp_path):
    """The gate with --long-text chunk agrees with pipeline(stride); a graph with perturbed logits fails it."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from exporter.config import BuildConfig
    from exporter.token_classification import gate, reference

    texts, ck = _texts(), built["checkpoint"]
    config = BuildConfig(checkpoint=ck, repository=None, out=tmp_path / "b", max_length=MAX_LENGTH,
                         long_text="chunk", chunk_overlap=OVERLAP)
    ref = reference(config, texts)
    assert ref.rows_per_s > 0 and ref.labels == list(TAGS)
    fp32 = built["repo"].parent / "build" / "fp32.onnx"
    good = gate("fp32", fp32, config, ref)
    assert good.passed and good.entity_agreement == 1.0 and good.max_abs < 1e-4, good
    model = onnx.load(str(fp32))  # the classifier bias moved: logits drift, labels flip
    bias = next(t for t in model.graph.initializer if t.name == "classifier.bias")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.array([0, 0.5, -0.5, 0.5, -0.5],
                                                                                 np.float32), bias.name))
    onnx.save(model, str(tmp_path / "drift.onnx"))
    bad = gate("fp32", tmp_path / "drift.onnx", config, ref)
    assert not bad.passed and bad.entity_agreement < 1.0 and bad.reasons


def test_unicode_offsets_index_the_text_as_sent(server, built):
    """Per token (aggregation none, over gRPC): text[start:end] is the token's own characters in the text as
    sent (accents, emoji, CJK, astral-plane letters), as the checkpoint's normalizer reads them."""
    from tokenizers import Tokenizer

    from serving.client import Tagger

    normalizer = Tokenizer.from_file(str(built["checkpoint"] / "tokenizer.json")).normalizer
    with Tagger(url=server.grpc_url, model="tagger_none", protocol="grpc") as tagger:
        rows = tagger.entities(UNICODE)
    assert any(rows)
    for text, row in zip(UNICODE, rows):
        for e in row:
            piece = text[e["start"]:e["end"]]
            assert piece and (e["word"].removeprefix("##") == normalizer.normalize_str(piece).strip()
                              or e["word"] == piece), (e, piece)


def test_cli_entities_and_models(server, built, capsys):
    from serving.cli import main

    text = _texts()[0]
    assert main(["entities", text, "--url", server.http_url, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    expected = _pipeline(built["checkpoint"], Aggregation.SIMPLE, [text])
    _assert_equal([text], expected, [answer[0]["entities"]], "entity_group")
    assert main(["entities", text, "--url", server.grpc_url, "--protocol", "grpc"]) == 0
    assert "tagger" in capsys.readouterr().out
    assert main(["models", "--repository", str(built["repo"]), "--json"]) == 0
    listed = json.dumps(json.loads(capsys.readouterr().out))
    assert "token-classification" in listed and "tagger_windows" in listed
    assert main(["entities", text, "--url", server.http_url, "--model", "no_such_model"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_model" in err[0]


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_locust_picks_the_tag_users_for_a_tagger(server, scheme, tmp_path):
    import subprocess
    import sys

    from loadtest.report import read_locust_stats
    from loadtest.run import LOCUSTFILE, _child_env

    host = f"http://{server.http_url}" if scheme == "http" else f"grpc://{server.grpc_url}"
    texts = tmp_path / "texts.csv"
    with open(texts, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([["text"]] + [[t] for t in _texts()])
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "2", "-r", "2", "-t", "3s",
           "--host", host, "--texts", str(texts), "--texts-per-request", "4", "--model-name", DEFAULT_TAGGER,
           "--csv", str(tmp_path / "l"), "--json-file", str(tmp_path / "l")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), timeout=120)
    assert out.returncode == 0, (out.stdout + out.stderr)[-1500:]
    wanted = "TritonTagHttpUser" if scheme == "http" else "TritonTagGrpcUser"
    assert f"running {wanted}" in out.stderr + out.stdout
    total = read_locust_stats(tmp_path / "l.json")["total"]  # Locust's final stats (its CSV lags the end)
    assert total["requests"] > 0 and total["failures"] == 0


@pytest.mark.parametrize("extra, message", [(["--target", "gpu"], "cpu target"),
                                            (["--long-text", "chunk", "--aggregation", "none"], "aggregation")])
def test_what_a_tagger_build_refuses_is_one_line(built, tmp_path, capsys, extra, message):
    from exporter.cli import main

    code = main(["build", str(built["checkpoint"]), "--task", "token-classification", "--eval-data",
                 str(tmp_path / "none.csv"), "--out", str(tmp_path / "b"), "--repository", str(tmp_path / "r"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("long_text", ["truncate", "chunk"])
def test_left_truncation_offsets_still_index_the_text_as_sent(built, tmp_path, long_text):
    """A checkpoint that truncates on the left: the served code cuts a suffix; its offsets are shifted back and
    the entities equal the pipeline's (truncated, or in windows: stride)."""
    import shutil

    from exporter.config import BuildConfig
    from exporter.token_classification import gate, reference

    ck = Path(shutil.copytree(built["checkpoint"], tmp_path / "left"))
    cfg = json.loads((ck / "tokenizer_config.json").read_text())
    (ck / "tokenizer_config.json").write_text(json.dumps({**cfg, "truncation_side": "left"}))
    config = BuildConfig(checkpoint=ck, repository=None, out=tmp_path / "b", max_length=MAX_LENGTH,
                         long_text=long_text, chunk_overlap=OVERLAP)
    texts = _texts()
    ref = reference(config, texts)
    if long_text == "truncate":  # the kept tokens are the long text's last ones: no entity at its start
        assert ref.entities[-1] and min(e["start"] for e in ref.entities[-1]) > len(texts[-1]) // 2
    result = gate("fp32", built["repo"].parent / "build" / "fp32.onnx", config, ref)
    assert result.passed and result.entity_agreement == 1.0 and result.texts_equal == 1.0, result


def test_agreement_counts_texts_whose_entities_equal_the_reference():
    from loadtest.tagger_bench import agreement

    ref = [[{"entity_group": "PER", "word": "ann", "score": 0.9, "start": 0, "end": 3}], [],
           [{"entity_group": "LOC", "word": "paris", "score": 0.5, "start": 4, "end": 9}]]
    same = [[dict(e) for e in row] for row in ref]
    assert agreement(ref, same, "entity_group") == (1.0, 0.0)
    moved = [[{**ref[0][0], "end": 4}], [], [{**ref[2][0], "score": 0.52}]]  # a span moved, a score drifted
    share, worst = agreement(ref, moved, "entity_group")
    assert share == pytest.approx(1 / 3) and worst == pytest.approx(0.02)
    assert agreement(ref, [[], [], ref[2]], "entity_group")[0] == pytest.approx(2 / 3)  # an entity missed
    assert agreement(ref, [[{**ref[0][0], "word": "anne"}], [], ref[2]], "entity_group")[0] == pytest.approx(2 / 3)


def test_bench_task_token_classification(built, tmp_path, capsys, monkeypatch):
    """`loadtest bench --task token-classification`: the pipeline set up as the repository serves the tagger
    (its aggregation and windows, here first and chunk) beside the served tagger over HTTP and gRPC, closed and
    open loop; the fp32 graph's entities agree with the pipeline's on every text. No build directory is
    needed (none is read; the default ``build`` does not exist in the working directory)."""
    from loadtest.cli import main

    monkeypatch.chdir(tmp_path)

    repo, out = tmp_path / "repo", tmp_path / "bench"
    served = read_repository(built["repo"]).models[DEFAULT_TAGGER]
    add_model(repo, onnx_model=built["repo"].parent / "build" / "fp32.onnx", tokenizer_dir=built["checkpoint"],
              model=replace(served.contract, name="ner", aggregation=Aggregation.FIRST),
              config=RepositoryConfig(max_length=MAX_LENGTH, encoder_instances=1, long_text="chunk",
                                      chunk_overlap=OVERLAP, max_chunks=16))
    texts = tmp_path / "texts.csv"
    with open(texts, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([["text"]] + [[t] for t in _texts()])
    code = main(["bench", "--task", "token-classification", "--checkpoint", str(built["checkpoint"]),
                 "--repository", str(repo), "--model-name", "ner", "--texts", str(texts), "--n-texts", str(N_EVAL),
                 "--batch-size", "4", "--concurrency", "2", "--texts-per-request", "2", "--single-text-concurrency",
                 "2", "--served-seconds", "0.5", "--warmup-seconds", "0.2", "--open-loop-seconds", "0.5",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    saved = json.loads((out / "bench.json").read_text())
    assert saved["task"] == "token-classification" and saved["machine"]["aggregation"] == "first"
    assert saved["machine"]["long_text"] == "chunk" and saved["machine"]["chunk_overlap"] == OVERLAP
    rows = {r["name"]: r for r in saved["results"]}
    assert {"pytorch pipeline fp32 b4", "pytorch pipeline fp32 b1", "served http c2 x2", "served grpc c2 x2",
            "served http c2 x1", "served grpc c2 x1"} <= set(rows)
    assert any(r["kind"] == "open-loop" for r in saved["results"])
    for r in saved["results"]:
        assert r["seq_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0, r["name"]
        assert r["accuracy"] == 1.0 and r["detail"]["max_score_diff"] < 1e-3, r["name"]
        assert r["kind"] == "in-process" or r["detail"]["load"]["failures"] == 0
    assert rows["pytorch pipeline fp32 b4"]["ratio_to_pipeline"] == 1.0
    md = (out / "bench.md").read_text()
    assert "| served grpc c2 x2 |" in md and "aggregation `first`" in md
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", "--task", "token-classification", "--checkpoint", str(built["checkpoint"]),
                 "--repository", str(repo), "--model-name", "nope", "--out", str(tmp_path / "x")]) != 0


def test_openvino_variant_is_built_gated_and_served_as_measured(server, built):
    """ov_fp32 (issue 22 item 1): the fused graph converted to OpenVINO IR, timed and gated like every variant
    (the runtime's default precision: bf16 is judged by the fp16 budget); served, the tagger opens the IR
    (serving/models/runtime.py) and answers exactly what the gate measured in-process, over gRPC."""
    import openvino as ov_runtime  # noqa: F401 - installed with the cpu extra

    from exporter import openvino
    from exporter.config import BuildConfig
    from exporter.token_classification import served_tagger
    from serving.client import Tagger

    record = built["report"]["variants"]["ov_fp32"]
    settings = record["runtime_settings"]
    assert record["file"] == "ov_fp32/model.onnx" and record["rows_per_s"] > 0
    assert settings["runtime"] == "openvino" and settings["inference_precision"] == openvino.default_precision()
    assert {"ov_fp32-build", "ov_fp32-speed"} <= set(built["report"]["stage_seconds"])
    ir = built["repo"] / OPENVINO / "1" / "model.xml"
    assert ir.is_file() and (ir.parent / "model.bin").is_file()
    texts = _texts()
    config = BuildConfig(checkpoint=built["checkpoint"], repository=None, out=built["repo"].parent / "o",
                         max_length=MAX_LENGTH)
    one = served_tagger(ir.parent / "model.onnx", built["checkpoint"], config, list(TAGS))
    expected = [one(t)[1] for t in texts]
    with Tagger(url=server.grpc_url, model=OPENVINO, protocol="grpc") as tagger:
        got = tagger.entities(texts)
    _assert_equal(texts, expected, got, "entity_group")
    # gated against the pipeline (the build may not have: a faster variant passed): the budget of its precision
    from exporter.token_classification import gate, reference

    precision = openvino.gate_precision(settings["inference_precision"])
    result = gate("ov_fp32", ir.parent / "model.onnx", config, reference(config, texts), precision)
    max_abs = {"fp32": config.budgets.fp32_max_abs, "fp16": config.budgets.fp16_max_abs}[precision.value]
    assert result.entity_agreement >= 0.95 and result.token_agreement >= 0.99, result  # labels, words, offsets
    assert result.passed == (result.max_abs <= max_abs and not result.reasons), result
