"""The architecture matrix: tiny random-init BERT, DistilBERT, RoBERTa, ELECTRA, XLM-RoBERTa, ALBERT and
DeBERTa-v2 classifiers with locally trained tokenizers (tests/checkpoint_factory.py) -> exporter build
(fp32, gated) -> one real tritonserver serving all seven (one repository each, distinct model names) ->
served LOGITS equal PyTorch's within 1e-4, long texts (truncated) included."""
from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.server

ARCHS = ("bert", "distilbert", "roberta", "electra", "xlm-roberta", "albert", "deberta-v2")
MAX_LENGTH = 32
LABELS = ("neg", "pos")


def _name(arch: str) -> str:
    return "clf_" + arch.replace("-", "_")


def _texts() -> list[str]:
    from checkpoint_factory import corpus

    rows = corpus(12, seed=21)
    joined = " ".join(rows)
    # truncated at MAX_LENGTH tokens; the long ones are cut before tokenizing by the served model (WordPiece,
    # byte-level BPE, Metaspace/Unigram tokenizers alike: docs/LONG_TEXT.md)
    return rows + [joined[:480], (joined * 40)[:20_000], " " * 3_000 + joined, "x" * 5_000 + " " + joined]


def _build(arch: str, root: Path, ck: Path) -> tuple[Path, Path]:
    """exporter build (fp32 only) of the arch's checkpoint, then its repository under a distinct name (run in
    a process of the fixture's pool)."""
    from checkpoint_factory import corpus

    from exporter.build import build
    from exporter.config import BuildConfig
    from serving.contract import ServedModel
    from serving.repository import RepositoryConfig, write_repository

    eval_csv = root / f"{arch}.csv"
    eval_csv.write_text("text,label\n" + "".join(f"\"{t}\",{i % 2}\n" for i, t in enumerate(corpus(40, seed=2))),
                        encoding="utf-8")
    out = root / f"build-{arch}"
    # openvino=False: the served file is the ONNX fp32 one; OpenVINO's conversion is tested in test_openvino
    result = build(BuildConfig(ck, out=out, repository=None, precisions="fp32", eval_data=eval_csv, eval_size=40,
                               max_length=MAX_LENGTH, speed_seconds=0.05, calibration_size=8, tuning_size=8,
                               openvino=False))
    assert result.report.selected == "fp32", (arch, result.report.variants["fp32"].parity.reason)
    repo = write_repository(root / f"repo-{arch}", onnx_model=result.report.variant_path("fp32", out),
                            tokenizer_dir=ck, id2label=dict(enumerate(LABELS)),
                            config=RepositoryConfig(max_length=MAX_LENGTH, encoder_instances=1),
                            model=ServedModel(name=_name(arch), labels=LABELS))
    return ck, repo


@pytest.fixture(scope="module")
def served(tmp_path_factory, arch_checkpoint):
    from serving.server import LocalTritonServer, ServerConfig

    root = tmp_path_factory.mktemp("matrix")
    t0 = time.perf_counter()
    checkpoints = {arch: arch_checkpoint(arch, labels=LABELS) for arch in ARCHS}
    # two builds at a time, each in a process of its own (a build is mostly one core's imports and worker
    # starts): not threads, transformers loads a model under a process-wide meta-device mode, so a build in a
    # second thread (its PyTorch reference) ran on meta tensors and left the mode on for the session
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {arch: pool.submit(_build, arch, root, ck) for arch, ck in checkpoints.items()}
        built = {arch: job.result() for arch, job in jobs.items()}
    repos = [repo for _, repo in built.values()]
    extra = tuple(f"--model-repository={r}" for r in repos[1:])
    with LocalTritonServer(ServerConfig(repos[0], startup_timeout_s=180, extra_args=extra)) as srv:
        yield srv, {arch: ck for arch, (ck, _) in built.items()}, time.perf_counter() - t0


def _torch_logits(ck: Path, texts: list[str]) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ck)
    model = AutoModelForSequenceClassification.from_pretrained(ck).eval()
    with torch.inference_mode():
        return np.concatenate([model(**tok([t], truncation=True, max_length=MAX_LENGTH, return_tensors="pt"))
                               .logits.numpy() for t in texts])


@pytest.mark.parametrize("arch", ARCHS)
def test_served_logits_equal_pytorch(served, arch):
    from serving.client import TextClassifier

    srv, checkpoints, _ = served
    texts = _texts()
    with TextClassifier(srv.http_url, model=_name(arch), timeout_s=60, return_logits=True) as client:
        got = np.array([p.logits for p in client.classify(texts)])
    np.testing.assert_allclose(got, _torch_logits(checkpoints[arch], texts), atol=1e-4, err_msg=arch)
