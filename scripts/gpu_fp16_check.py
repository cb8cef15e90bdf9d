"""fp16 on a CUDA GPU against fp32, for a fine-tuned checkpoint, on real held-out text (PyTorch).

Run where a GPU is: `python scripts/gpu_fp16_check.py CHECKPOINT --eval-data data/test.csv`. Prints one
JSON object: label agreement and max |logit diff| of fp16 (model.half()) against fp32 on the same device,
accuracy of both, and throughput at batch 32 for both. This is the PyTorch side of the GPU target's fp16
claim; the served path (ONNX Runtime's CUDA provider in the NGC image) needs onnxruntime-gpu.
"""
from __future__ import annotations

import argparse
import csv
import json
import time

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--eval-data", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()
    dev = torch.device("cuda")
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    with open(args.eval_data, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    texts = [r["text"] for r in rows]
    model = AutoModelForSequenceClassification.from_pretrained(args.checkpoint, torch_dtype=torch.float32).to(dev).eval()
    label2id = model.config.label2id
    labels = np.array([label2id[r["label"]] for r in rows])
    batches = [tok(texts[i:i + args.batch_size], padding=True, truncation=True, max_length=args.max_length,
                   return_tensors="pt").to(dev) for i in range(0, len(texts), args.batch_size)]

    def run(m):
        with torch.inference_mode():
            out = [m(**b).logits.float() for b in batches]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(3):
                for b in batches:
                    m(**b)
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - t0) / 3
        return torch.cat(out).cpu().numpy(), len(texts) / seconds

    fp32, fp32_speed = run(model)
    fp16, fp16_speed = run(model.half())
    print(json.dumps({
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "n_examples": len(texts),
        "label_agreement": float((fp16.argmax(1) == fp32.argmax(1)).mean()),
        "max_abs_diff": float(np.abs(fp16 - fp32).max()), "nan_inf": int((~np.isfinite(fp16)).sum()),
        "accuracy_fp32": float((fp32.argmax(1) == labels).mean()), "accuracy_fp16": float((fp16.argmax(1) == labels).mean()),
        "throughput_seq_s": {"fp32": round(fp32_speed, 1), "fp16": round(fp16_speed, 1)},
    }, indent=1))


if __name__ == "__main__":
    main()
