"""Sentence-embedding export: pipeline reading, pooling/normalize inside the ONNX graph, the gate."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from embedding_helpers import build_tiny_sentence_transformer
from exporter import steps
from exporter.config import Precision, Target
from exporter.embedding import Pooling, Source, export_body, fp32_variant, read_pipeline
from exporter.embedding_build import EmbeddingVariant, held_out_texts
from exporter.embedding_flow import EmbeddingTask, build_embedding_variants
from exporter.embedding_gate import (EmbeddingBudgets, EmbeddingSpeed, RowEncoder, check_variant, judge, measure_speed,
                                     reference_embeddings, reference_model)
from exporter.errors import CheckpointError, EvalDataError, ExporterError

TEXTS = [
    "self-driving cars just seem lazy and a waste of money",
    "I can't see how autonomous cars won't cause a million wrecks",
    "you'll never get me in an autonomous vehicle. Ever.",
    "Google's driverless car passed its test today",
    "would love a car that drives me home after work",
    "the weather is nice",
    "a",
    "Traffic jams could disappear with robot cars!!! #future",
    "my cat is asleep on the keyboard",
    "how much will a self driving car cost?",
    "autonomous trucks are coming for the highways",
    "I trust computers more than most drivers on this road",
]


@pytest.fixture(scope="module")
def st_mean(tmp_path_factory) -> Path:
    return build_tiny_sentence_transformer(tmp_path_factory.mktemp("st-mean") / "model", pooling="mean")


@pytest.fixture(scope="module")
def st_mean_onnx(st_mean, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("st-mean-onnx")
    pipeline = read_pipeline(st_mean)
    return fp32_variant(export_body(pipeline, out / "body"), pipeline, out / "fp32.onnx")


def _row_embeddings(path: Path, model_dir: Path, **kwargs) -> np.ndarray:
    encoder = RowEncoder(path, read_pipeline(model_dir, **kwargs))
    return np.stack([encoder(t) for t in TEXTS])


# ----------------------------------------------------------------------------------------- reading


def test_reads_sentence_transformers_modules(st_mean):
    p = read_pipeline(st_mean)
    assert (p.source, p.pooling, p.normalize, p.dim, p.max_seq_length) == (
        Source.SENTENCE_TRANSFORMERS, Pooling.MEAN, True, 32, 64)


def test_reads_packaged_minilm(encoder_dir):
    p = read_pipeline(encoder_dir)
    assert (p.pooling, p.normalize, p.dim, p.max_seq_length) == (Pooling.MEAN, True, 384, 256)


def test_new_style_pooling_config(st_mean, tmp_path):
    model = shutil.copytree(st_mean, tmp_path / "m")
    (model / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": "cls"}))
    assert read_pipeline(model).pooling is Pooling.CLS


@pytest.mark.parametrize("config, message", [
    ({"word_embedding_dimension": 32, "pooling_mode_lasttoken": True}, "'lasttoken' is not supported"),
    ({"embedding_dimension": 32, "pooling_mode": ["mean", "max"]}, "only a single pooling mode"),
    ({"embedding_dimension": 32, "pooling_mode": "mean", "include_prompt": False}, "include_prompt"),
    ({"embedding_dimension": 16, "pooling_mode": "mean"}, "dimension 16"),
])
def test_refuses_unsupported_pooling(st_mean, tmp_path, config, message):
    model = shutil.copytree(st_mean, tmp_path / "m")
    (model / "1_Pooling" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        read_pipeline(model)


def test_refuses_other_modules_and_contradictions(st_mean, tmp_path):
    model = shutil.copytree(st_mean, tmp_path / "m")
    with pytest.raises(CheckpointError, match="specifies pooling=mean"):
        read_pipeline(model, pooling="cls")
    modules = json.loads((model / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (model / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(CheckpointError, match="Transformer -> Pooling -> Normalize -> Dense"):
        read_pipeline(model)


def test_plain_encoder_needs_a_pooling(st_mean, tmp_path):
    model = shutil.copytree(st_mean, tmp_path / "m")
    (model / "modules.json").unlink()
    with pytest.raises(CheckpointError, match="choose a pooling"):
        read_pipeline(model)
    p = read_pipeline(model, pooling="cls")
    assert (p.source, p.pooling, p.normalize, p.max_seq_length) == (Source.TRANSFORMERS, Pooling.CLS, False, 128)
    with pytest.raises(CheckpointError, match="pooling 'lasttoken' is not supported"):
        read_pipeline(model, pooling="lasttoken")


# ------------------------------------------------------------------------------------------ export


def test_mean_normalize_graph_equals_sentence_transformers(st_mean, st_mean_onnx):
    import onnx

    graph = onnx.load(str(st_mean_onnx)).graph
    assert [o.name for o in graph.output] == ["embedding"]
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    ref = reference_embeddings(reference_model(read_pipeline(st_mean)), TEXTS)
    got = _row_embeddings(st_mean_onnx, st_mean)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_padded_batch_equals_rows_alone(st_mean, st_mean_onnx):
    """The pooling masks padding: the GPU target's padded batches give each row's own embedding."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(st_mean)(TEXTS, padding=True, return_tensors="np")
    sess = ort.InferenceSession(str(st_mean_onnx), providers=["CPUExecutionProvider"])
    batch = sess.run(["embedding"], {k: v.astype(np.int64) for k, v in enc.items()})[0]
    np.testing.assert_allclose(batch, _row_embeddings(st_mean_onnx, st_mean), atol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "max"])
def test_plain_encoder_pooling_equals_sentence_transformers(st_mean, tmp_path, pooling):
    """A plain encoder (no modules.json), explicit pooling, no normalisation."""
    model = shutil.copytree(st_mean, tmp_path / "m")
    (model / "modules.json").unlink()
    pipeline = read_pipeline(model, pooling=pooling)
    path = fp32_variant(export_body(pipeline, tmp_path / "body"), pipeline, tmp_path / "fp32.onnx")
    ref = reference_embeddings(reference_model(pipeline), TEXTS)
    got = _row_embeddings(path, model, pooling=pooling)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)  # no Normalize module, none in the graph


# -------------------------------------------------------------------------------------------- gate


def test_budgets_validation():
    assert EmbeddingBudgets().limits(Precision.INT8) == (0.99, 0.9)
    for bad in ({"fp32_min_cosine": 1.5}, {"fp16_min_cosine": float("nan")}, {"int8_min_topk_overlap": -0.1},
                {"top_k": 0}, {"top_k": 2.5}):
        with pytest.raises(ExporterError):
            EmbeddingBudgets(**bad)


def test_judge_fails_on_drift_and_nan():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 16)).astype(np.float32)
    assert judge(Precision.FP32, ref, ref.copy(), EmbeddingBudgets()).passed
    noisy = ref + rng.normal(scale=0.3, size=ref.shape).astype(np.float32)
    gate = judge(Precision.INT8, ref, noisy, EmbeddingBudgets())
    assert not gate.passed and "min cosine" in gate.reason and gate.topk_overlap < 1.0
    broken = ref.copy()
    broken[3, 2] = np.nan
    gate = judge(Precision.FP16, ref, broken, EmbeddingBudgets())
    assert not gate.passed and gate.nan_inf and "NaN" in gate.reason
    with pytest.raises(EvalDataError):
        judge(Precision.FP32, ref[:5], ref[:5], EmbeddingBudgets())


def test_gate_rejects_a_perturbed_graph(st_mean, st_mean_onnx, tmp_path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(st_mean_onnx))
    rng = np.random.default_rng(1)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 2 and w.shape[0] == w.shape[1] == 32:  # attention/projection weights
            init.CopyFrom(numpy_helper.from_array((w + rng.normal(scale=0.05, size=w.shape)).astype(w.dtype), init.name))
    perturbed = tmp_path / "perturbed.onnx"
    onnx.save(model, str(perturbed))
    pipeline = read_pipeline(st_mean)
    ref = reference_embeddings(reference_model(pipeline), TEXTS)
    good = check_variant(st_mean_onnx, Precision.FP32, pipeline, TEXTS, ref, EmbeddingBudgets())
    bad = check_variant(perturbed, Precision.FP32, pipeline, TEXTS, ref, EmbeddingBudgets())
    speed = measure_speed(st_mean_onnx, pipeline, TEXTS, seconds=0.2)  # per row, 1 thread: the classifier's measure
    assert good.passed and good.min_cosine > 0.99999 and speed.rows_per_s > 0 and speed.intra_op_threads == 1
    assert not bad.passed and bad.min_cosine < 0.99999


def test_build_embedding_variants(st_mean, tmp_path):
    texts = TEXTS + TEXTS[:3] + [" "]  # duplicates and blanks are dropped
    build = build_embedding_variants(st_mean, texts, tmp_path / "out", speed_seconds=0.2)
    assert build.n_texts == len(TEXTS)
    assert [v.name for v in build.variants] == ["fp32", "fp16", "int8"]
    # every variant built and timed, then gated fastest first until one passes: the slower ones are not gated
    by_speed = sorted(build.variants, key=lambda v: -v.speed.rows_per_s)
    first = next(i for i, v in enumerate(by_speed) if v.passed)
    assert build.selected == by_speed[first].name
    for i, v in enumerate(by_speed):
        assert v.error is None and v.path.is_file() and v.speed.rows_per_s > 0, v
        assert v.gate.gated == (i <= first)  # (no tuning texts: int8 is quantized once, gated like the rest)
        if v.gate.gated:
            assert v.gate.n_texts == len(TEXTS)
        else:
            assert not v.passed and v.gate.reason.startswith(f"not gated: slower than {build.selected}")
    every = build_embedding_variants(st_mean, texts, tmp_path / "every", speed_seconds=0.2, exhaustive=True)
    assert all(v.gate.gated and v.gate.n_texts == len(TEXTS) for v in every.variants)
    assert every.variant("fp32").passed and every.variant("fp32").gate.min_cosine >= 0.99999
    assert (build.tokenizer_dir / "tokenizer.json").is_file()


def test_selection_and_held_out_texts():
    with pytest.raises(EvalDataError):
        held_out_texts(["a", "b", "a", "", "c"], top_k=5)
    assert held_out_texts(["a", "b", "a", "c"], top_k=2) == ["a", "b", "c"]
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(10, 4)).astype(np.float32)
    ok = judge(Precision.FP32, ref, ref, EmbeddingBudgets())
    bad = judge(Precision.FP32, ref, -ref, EmbeddingBudgets())

    def variant(name, gate, rate):
        return EmbeddingVariant(name, Precision(name), gate=gate, speed=EmbeddingSpeed(rate, 10, 1.0, 1, 1.0, 1.0))

    def select(variants):  # the one rule (exporter.steps.select) over the embedder's candidates
        task = EmbeddingTask()
        return steps.select([task.candidate(None, v.name, v) for v in variants], Target.CPU)

    assert select([]) is None
    # fastest passing wins; a faster failing variant is never selected; a failed conversion neither
    assert select([variant("fp32", ok, 10.0), variant("fp16", ok, 20.0), variant("int8", bad, 99.0)]) == "fp16"
    assert select([variant("fp32", bad, 10.0), EmbeddingVariant("int8", Precision.INT8, error="boom")]) is None


TUNING = [
    "the bus was late again this morning", "robots will drive us all to work one day", "I prefer trains anyway",
    "who is liable when a driverless car crashes?", "electric cars are quiet", "parking is the real problem",
    "my neighbour bought a self-driving car", "lidar sensors are getting cheaper",
]


def test_int8_exclusion_search_is_judged_by_the_embedding_gate(st_mean, tmp_path):
    """A budget round 0 cannot meet makes the search exclude nodes; the kept file carries the final gate."""
    budgets = EmbeddingBudgets(int8_min_cosine=0.9999999, int8_min_topk_overlap=1.0)
    build = build_embedding_variants(st_mean, TEXTS, tmp_path / "out", precisions=["int8"], budgets=budgets,
                                     tuning_texts=TUNING + TEXTS[:2], max_exclusion_rounds=2)
    (v,) = build.variants
    assert build.n_tuning_texts == len(TUNING)  # texts of the gate are never tuning texts
    assert v.error is None and len(v.search) >= 2 and v.excluded_nodes
    assert [a["round"] for a in v.search] == list(range(len(v.search)))  # bisection rounds too, flagged
    assert v.path == tmp_path / "out" / "int8.onnx" and v.gate.n_texts == len(TEXTS)
    assert v.passed == (v.gate.min_cosine >= 0.9999999 and v.gate.topk_overlap == 1.0)
    assert build.selected == ("int8" if v.passed else None)


def test_gpu_gate_runs_the_served_sub_batches_and_matches_rows_alone(st_mean, st_mean_onnx):
    """The GPU target's gate (token-budget sub-batches, each padded to its own longest row) gives every text
    the embedding it gets alone (fp32 <= 1e-5), in the texts' order, and passes the same budget."""
    from exporter.embedding_gate import BatchEncoder, encode_batched

    pipeline = read_pipeline(st_mean)
    got, speed = encode_batched(BatchEncoder(st_mean_onnx, pipeline, max_batch_tokens=64), TEXTS)
    assert got.shape == (len(TEXTS), 32) and speed.n_rows == len(TEXTS)
    assert np.abs(got - _row_embeddings(st_mean_onnx, st_mean)).max() <= 1e-5
    reference = reference_embeddings(reference_model(pipeline), TEXTS)
    gate = check_variant(st_mean_onnx, Precision.FP32, pipeline, TEXTS, reference, EmbeddingBudgets(top_k=3),
                            max_batch_tokens=64)
    assert gate.passed and gate.min_cosine > 0.99999


@pytest.mark.parametrize("normalize", [True, False])
def test_dense_modules_are_graph_nodes_equal_to_sentence_transformers(st_mean, tmp_path, normalize):
    """Issue 19: Transformer -> Pooling -> Dense (-> Dense) -> [Normalize] was refused; the Dense modules now
    run in the graph (MatMul + Add + activation) and the embedding equals SentenceTransformer.encode."""
    import torch
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(5)
    base = SentenceTransformer(str(st_mean), device="cpu")
    modules = [base[0], base[1], models.Dense(32, 24, activation_function=torch.nn.Tanh()),
               models.Dense(24, 16, bias=False, activation_function=torch.nn.Identity())]
    SentenceTransformer(modules=modules + ([models.Normalize()] if normalize else []), device="cpu").save(
        str(tmp_path / "dense"))
    pipeline = read_pipeline(tmp_path / "dense")
    assert pipeline.dim == 16 and len(pipeline.dense) == 2 and pipeline.normalize is normalize
    onnx_path = fp32_variant(export_body(pipeline, tmp_path / "body"), pipeline, tmp_path / "fp32.onnx")
    ref = reference_embeddings(reference_model(pipeline), TEXTS)
    got = _row_embeddings(onnx_path, tmp_path / "dense")
    assert got.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_chunked_gate_averages_the_windows_before_normalisation(st_mean, tmp_path, normalize):
    """--long-text chunk: a chunked build's graph (Dense modules included) ends before Normalize; the gate runs
    each window alone, averages, then L2-normalises when the model does (WindowEncoder), and its reference
    (chunked_reference: padded batches of windows) equals the definition computed here window by window with
    the sentence-transformers modules, with and without Normalize."""
    import torch
    from dataclasses import replace

    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer

    from exporter.chunking import ChunkConfig, window_batches
    from exporter.embedding import load_tokenizer
    from exporter.embedding_gate import Chunked, WindowEncoder, chunked_reference

    torch.manual_seed(6)
    base = SentenceTransformer(str(st_mean), device="cpu")
    modules = [base[0], base[1], models.Dense(32, 24, activation_function=torch.nn.Tanh())]
    SentenceTransformer(modules=modules + ([models.Normalize()] if normalize else []), device="cpu").save(
        str(tmp_path / "dense"))
    pipeline = read_pipeline(tmp_path / "dense")
    onnx_path = fp32_variant(export_body(pipeline, tmp_path / "body"), replace(pipeline, normalize=False),
                             tmp_path / "fp32.onnx")
    texts = [" ".join(TEXTS[:k]) for k in (1, 4)] + [" ".join(TEXTS * 3), ""]
    chunked = Chunked(ChunkConfig(4, 3), normalize)
    want, counts = chunked_reference(reference_model(pipeline), load_tokenizer(pipeline), texts,
                                     pipeline.max_seq_length, chunked)
    assert counts[0] == 1 and counts[2] == 3 and counts[-1] == 1  # several windows, capped at max_chunks
    model = SentenceTransformer(str(tmp_path / "dense"), device="cpu")
    windows, hand_counts = window_batches(AutoTokenizer.from_pretrained(tmp_path / "dense"), texts, None,
                                          pipeline.max_seq_length, ChunkConfig(4, 3))
    with torch.no_grad():
        pooled = [model[2](model[1](model[0]({k: torch.from_numpy(v) for k, v in w.items()})))["sentence_embedding"][0]
                  for w in windows]
    edges = np.cumsum([0, *hand_counts])
    means = [torch.stack(pooled[a:b]).mean(0) for a, b in zip(edges[:-1], edges[1:])]
    hand = np.stack([(torch.nn.functional.normalize(m, dim=0) if normalize else m).numpy() for m in means])
    assert hand_counts == counts
    np.testing.assert_allclose(want, hand, atol=1e-5)
    encoder = WindowEncoder(onnx_path, pipeline, chunked=chunked)
    got = np.stack([encoder(t) for t in texts])
    np.testing.assert_allclose(got, want, atol=1e-5)
    window_vector = encoder.session.run(None, {n: windows[0][n] for n in encoder.inputs})[0][0]
    assert abs(np.linalg.norm(window_vector) - 1) > 1e-3  # the graph answers before normalisation
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5) is normalize
