"""OpenVINO variants (exporter/openvino.py, serving/models/runtime.py): built beside the ONNX Runtime ones,
gated and timed per row as served, selectable, and served by the real tritonserver with the OpenVINO runtime.

One tiny build (fp32 and int8, so ov_fp32 and ov_int8 are made) with ``--variant ov_fp32`` and one server
serve every test here. ov_fp32 runs at the runtime's default precision (bf16 where the CPU has it), judged
by the fp16 budget; this random-init model has large logits (initializer_range 0.2), so the test widens the
fp16 logit budget to 0.1: the test is about the served path, the budget rule is tested on its own below.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from serving_helpers import corpus_texts
from test_exporter import make_checkpoint, run_main

from exporter.config import Precision
from serving.models import runtime
from serving.server import LocalTritonServer, ServerConfig

pytestmark = pytest.mark.server

FP16_MAX_ABS = 0.1
BUILD_ARGS = ["--precisions", "fp32,int8", "--variant", "ov_fp32", "--exhaustive", "--fp16-max-abs", str(FP16_MAX_ABS),
              "--speed-seconds", "0.2", "--calibration-size", "32", "--tuning-size", "64", "--eval-size", "120"]


@pytest.fixture(scope="module")
def ov_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("openvino")
    ckpt = make_checkpoint(root)
    rc = run_main(["build", ckpt, "--out", root / "build", "--repository", root / "repo", *BUILD_ARGS])
    report = json.loads((root / "build" / "report.json").read_text())
    return {"rc": rc, "ckpt": ckpt, "build": root / "build", "repo": root / "repo", "report": report}


@pytest.fixture(scope="module")
def server(ov_build):
    with LocalTritonServer(ServerConfig(ov_build["repo"], startup_timeout_s=120)) as srv:
        yield srv


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus_texts(48, seed=7)


def test_openvino_variants_are_built_gated_timed_and_recorded(ov_build):
    from common.provenance import sha256_file
    from exporter import openvino

    rep = ov_build["report"]
    assert ov_build["rc"] == 0
    assert {"fp32", "int8_dynamic", "int8_static", "ov_fp32", "ov_int8"} <= set(rep["variants"])
    default = openvino.default_precision()
    for name in ("ov_fp32", "ov_int8"):
        v = rep["variants"][name]
        settings = v["runtime_settings"]
        assert settings["runtime"] == "openvino" and settings["ir_files"] == ["model.xml", "model.bin"]
        assert (ov_build["build"] / name / "model.xml").is_file() and (ov_build["build"] / name / "model.bin").is_file()
        assert rep["files"][v["file"]] == sha256_file(ov_build["build"] / v["file"])
        assert v["parity"]["gate_mode"] == "per_row" and v["parity"]["n_examples"] >= 120
        assert v["speed"]["throughput_seq_s"] > 0 and v["speed"]["intra_op_threads"] == 1
        assert v["servable"] is True
        ir = [ov_build["build"] / name / f for f in ("model.xml", "model.bin")]
        assert v["size_bytes"] == sum(f.stat().st_size for f in ir)  # what the server loads, not the IR's source
    fp32 = rep["variants"]["ov_fp32"]
    assert fp32["runtime_settings"]["inference_precision"] == default
    assert fp32["precision"] == openvino.gate_precision(default).value  # the budget of the precision that ran
    assert rep["variants"]["ov_int8"]["runtime_settings"]["quantization"]["tool"] == "nncf.quantize"
    # int8's float remainder runs in f32 (bf16 broke MiniLM's int8), written in the IR and compiled so
    assert rep["variants"]["ov_int8"]["runtime_settings"]["inference_precision"] == "f32"
    assert runtime.OpenVINOSession(ov_build["build"] / "ov_int8" / "model.xml").precision == "f32"
    assert rep["variants"]["ov_int8"]["calibration"]["rows"] == 32
    assert rep["selected"] == "ov_fp32" and fp32["parity"]["passed"]


def test_the_budget_follows_the_precision_that_ran():
    from exporter import openvino

    assert openvino.gate_precision("bf16") is Precision.FP16
    assert openvino.gate_precision("f16") is Precision.FP16
    assert openvino.gate_precision("f32") is Precision.FP32


def test_variant_flag_selects_only_a_passing_variant(ov_build):
    from exporter import steps
    from exporter.artifacts import read_report
    from exporter.config import Target
    from exporter.variants import candidates

    def select(variants, target, forced=None):  # the one rule over the classifier's candidates
        return steps.select(candidates(variants, target), target, forced)

    variants = read_report(ov_build["build"]).variants
    assert select(variants, Target.CPU, "ov_fp32") == "ov_fp32"
    assert select(variants, Target.CPU, "no_such_variant") is None
    failing = [n for n, v in variants.items() if not v.parity.passed]
    for name in failing:
        assert select(variants, Target.CPU, name) is None
    assert select(variants, Target.GPU) in ("fp32", "fp16")  # the GPU target never selects OpenVINO


def test_the_repository_carries_the_ir_and_the_runtime_adapter(ov_build):
    from serving.repository import read_repository, validate_repository

    info = read_repository(ov_build["repo"])
    folder = info.model().onnx_path.parent
    for fname in ("model.onnx", "model.xml", "model.bin", "runtime.py", "textmodel.py"):
        assert (folder / fname).is_file(), fname
    assert runtime.runtime_of(folder / "model.onnx") == runtime.OPENVINO
    assert (folder / "model.xml").read_bytes() == (ov_build["build"] / "ov_fp32" / "model.xml").read_bytes()
    validate_repository(ov_build["repo"])


def test_tune_trials_serve_the_ir_the_repository_serves(ov_build, tmp_path):
    """loadtest tune rewrites the repository from copies of what it serves: an OpenVINO repository's trials
    and its tuned result keep the IR (not its source ONNX on ONNX Runtime)."""
    from loadtest.tune import _sources
    from serving.repository import read_repository

    src = _sources(ov_build["repo"], tmp_path)
    assert runtime.runtime_of(src.onnx) == runtime.OPENVINO
    trial = src.write(tmp_path / "trial", src.base)
    folder = read_repository(trial).model().onnx_path.parent
    assert runtime.runtime_of(folder / "model.onnx") == runtime.OPENVINO
    assert (folder / "model.bin").read_bytes() == (ov_build["build"] / "ov_fp32" / "model.bin").read_bytes()


def test_the_bench_ceiling_opens_what_is_served(ov_build):
    """loadtest's in-process sessions (the ceiling) run an OpenVINO variant's IR, not its source ONNX."""
    from loadtest.bench import ort_session

    assert isinstance(ort_session(ov_build["build"] / "ov_fp32" / "model.onnx", 1), runtime.OpenVINOSession)
    assert not isinstance(ort_session(ov_build["build"] / "fp32" / "model.onnx", 1), runtime.OpenVINOSession)


def test_the_bench_names_each_in_process_row_after_the_runtime_it_ran(ov_build, texts):
    """An OpenVINO variant's in-process row is an OpenVINO run, and the table says so (it said onnxruntime)."""
    from loadtest.bench import bench_ort

    build, rows = ov_build["build"], texts[:8]
    ov = bench_ort("ov_fp32", build / "ov_fp32" / "model.onnx", ov_build["ckpt"], rows, None, 4, 64, 1)
    ort = bench_ort("fp32", build / "fp32" / "model.onnx", ov_build["ckpt"], rows, None, 4, 64, 1)
    assert (ov.name, ort.name) == ("openvino ov_fp32 b4", "onnxruntime fp32 b4")
    assert ov.seq_per_s > 0 and ort.seq_per_s > 0


def _gate_logits(build: Path, tokenizer, texts: list[str]) -> np.ndarray:
    """Each text alone in the session the gate judged ov_fp32 with (parity.session: OpenVINO, 1 thread)."""
    from exporter import parity

    sess = parity.session(build / "ov_fp32" / "model.onnx", Precision.FP32, threads=1)
    assert isinstance(sess, runtime.OpenVINOSession)
    names = [i.name for i in sess.get_inputs()]
    out = []
    for text in texts:
        enc = tokenizer(text, truncation=True, max_length=128, return_tensors="np")
        out.append(sess.run(["logits"], {n: enc[n].astype(np.int64) for n in names})[0][0])
    return np.stack(out)


def _served(server, rows: list[str]) -> dict[str, np.ndarray]:
    """LOGITS and PROBABILITIES of one KServe v2 HTTP request holding ``rows``."""
    import urllib.request

    from serving.contract import http_infer_body, http_outputs

    body = json.dumps(http_infer_body(rows, outputs=("LOGITS", "PROBABILITIES"))).encode()
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/classifier/infer", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return http_outputs(json.loads(resp.read()))


def test_served_answers_equal_the_gates_openvino_answers(ov_build, server, texts):
    from transformers import AutoTokenizer

    from exporter import parity

    tokenizer = AutoTokenizer.from_pretrained(ov_build["ckpt"])
    gate = _gate_logits(ov_build["build"], tokenizer, texts)
    served = _served(server, texts)["LOGITS"]
    np.testing.assert_allclose(served, gate, atol=1e-5)
    batches = parity.tokenize(tokenizer, texts, batch_size=16, max_length=128)
    torch_logits = parity.torch_logits(parity.load_torch_model(ov_build["ckpt"]), batches)
    assert np.abs(served - torch_logits).max() <= FP16_MAX_ABS  # within the budget the gate passed it on
    assert (served.argmax(1) == torch_logits.argmax(1)).mean() >= 0.995


def test_an_openvino_answer_does_not_depend_on_its_neighbours(server, texts):
    """The same text alone, among others in one request, and among concurrent gRPC requests (which the
    dynamic batcher groups into one execute call): equal to 1e-6."""
    import tritonclient.grpc.aio as grpcaio

    target, others = texts[3], texts[10:40]
    alone = _served(server, [target])
    mixed = _served(server, [*others[:4], target, *others[4:7]])

    async def concurrent() -> list[np.ndarray]:
        client = grpcaio.InferenceServerClient(server.grpc_url)
        try:
            async def one(rows):
                tensor = grpcaio.InferInput("TEXT", [len(rows), 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[t.encode()] for t in rows], dtype=np.object_))
                result = await client.infer("classifier", [tensor],
                                            outputs=[grpcaio.InferRequestedOutput("LOGITS")])
                return result.as_numpy("LOGITS")[rows.index(target)] if target in rows else None
            requests = [others[i:i + 3] for i in range(0, 24, 3)]
            requests[4:4] = [[target]]
            requests.append([others[25], target])
            return [r for r in await asyncio.gather(*(one(r) for r in requests)) if r is not None]
        finally:
            await client.close()

    rows = [mixed["LOGITS"][4], *asyncio.run(concurrent())]
    assert len(rows) == 3
    for row in rows:
        assert np.abs(row - alone["LOGITS"][0]).max() <= 1e-6
    assert np.abs(mixed["PROBABILITIES"][4] - alone["PROBABILITIES"][0]).max() <= 1e-6


def test_openvino_session_outputs_are_the_callers_own(ov_build, texts):
    """A result is a copy: the next run (another length) leaves it as it was (the request reuses buffers)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ov_build["ckpt"])
    sess = runtime.open_session(ov_build["build"] / "ov_fp32" / "model.onnx", threads=1)
    names = [i.name for i in sess.get_inputs()]
    feeds = [{n: v.astype(np.int64) for n, v in tokenizer(t, return_tensors="np").items() if n in names}
             for t in (texts[0], texts[1] + " " + texts[2])]
    first = sess.run(["logits"], feeds[0])[0]
    kept = first.copy()
    sess.run(["logits"], feeds[1])
    np.testing.assert_array_equal(first, kept)
    np.testing.assert_array_equal(sess.run(["logits"], feeds[0])[0], kept)  # deterministic per row


def test_embedding_build_makes_gated_openvino_variants(tmp_path):
    """The embedding build (cpu target) adds ov_fp32/ov_int8 beside fp32/int8: each in its own directory
    (model.onnx + IR), gated per row by the embedding gate on the OpenVINO session, timed, selectable."""
    from embedding_helpers import build_tiny_sentence_transformer
    from exporter import openvino
    from exporter.embedding_flow import EmbeddingTask, build_embedding_variants
    from exporter.embedding_gate import RowEncoder
    from exporter.steps import select
    from test_embedding import TEXTS, TUNING

    model = build_tiny_sentence_transformer(tmp_path / "st", pooling="mean")
    build = build_embedding_variants(model, TEXTS, tmp_path / "out", precisions=["fp32", "int8"],
                                     tuning_texts=TUNING, max_exclusion_rounds=0, openvino=True, exhaustive=True,
                                     speed_seconds=0.2)
    by_name = {v.name: v for v in build.variants}
    assert list(by_name) == ["fp32", "int8", "ov_fp32", "ov_int8"]
    assert by_name["ov_fp32"].precision is openvino.gate_precision(openvino.default_precision())
    for name in ("ov_fp32", "ov_int8"):
        v = by_name[name]
        assert v.error is None and v.path == tmp_path / "out" / name / "model.onnx"
        assert runtime.runtime_of(v.path) == runtime.OPENVINO and v.runtime_settings["runtime"] == "openvino"
        assert v.gate.n_texts == len(TEXTS) and v.speed.rows_per_s > 0
        assert isinstance(RowEncoder(v.path, build.pipeline).session, runtime.OpenVINOSession)
    assert by_name["ov_fp32"].passed  # bf16 (or f32) of a small model within the fp16 (fp32) cosine budget
    assert runtime.runtime_of(tmp_path / "out" / "fp32.onnx") == runtime.ONNXRUNTIME  # the others stay ORT
    assert build.selected == select([EmbeddingTask().candidate(None, v.name, v) for v in build.variants], "cpu")
