"""Why the old ceiling ran below a plain loop (issue 22 item 0): the same ONNX file, texts and 1-thread
session, one text at a time, each way timed in its own fresh spawned process, the ways interleaved over
``--rounds`` rounds (so the machine's load hits them alike); medians printed.

    PYTHONPATH=$PWD .venv/bin/python scripts/ceiling_probe.py REPOSITORY [--model textclf] [--n 512]

Ways: ``hf-call`` the old ceiling's per-text work (``AutoTokenizer(text, return_tensors="np")``, one
output) after 8 warm-up texts; ``hf-call-warm`` the same after a whole warm-up pass; ``served-row`` the
served model's own per-row work (serving.models.tokenization's LengthTokenizer, every encoder output)
after 8 texts; ``served-row-warm`` that after a whole pass; ``+torch`` variants import torch first (the old
ceiling's child imported loadtest.bench and transformers).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
WAYS = ("hf-call", "hf-call-warm", "served-row", "served-row-warm", "served-row-warm+torch")


def _worker(way: str, folder: str, texts: list[str], max_length: int, out) -> None:
    if way.endswith("+torch"):
        import torch  # noqa: F401
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(Path(folder) / "model.onnx"), so, providers=["CPUExecutionProvider"])
    wanted = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]
    if way.startswith("hf-call"):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(Path(folder) / "tokenizer"))

        def run(text: str) -> None:
            enc = tok(text, truncation=True, max_length=max_length, return_tensors="np")
            feed = {k: enc[k].astype(np.int64) if k in enc else np.zeros_like(enc["input_ids"], dtype=np.int64)
                    for k in wanted}
            sess.run(outputs[:1], feed)
    else:
        from tokenizers import Tokenizer

        from serving.models.tokenization import LengthTokenizer

        tok = LengthTokenizer(Tokenizer.from_file(str(Path(folder) / "tokenizer" / "tokenizer.json")), max_length)

        def run(text: str) -> None:
            for enc in tok.encode(text).encodings:
                cols = {"input_ids": enc.ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.type_ids}
                sess.run(outputs, {k: np.asarray([cols[k]], dtype=np.int64) for k in wanted})

    for text in (texts if way.endswith(("-warm", "+torch")) else texts[:8]):
        run(text)
    t0 = time.perf_counter()
    for text in texts:
        run(text)
    out.put(len(texts) / (time.perf_counter() - t0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("repository", type=Path)
    ap.add_argument("--model", default="textclf")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args(argv)
    from loadtest.texts import load_texts

    folder = max((p for p in (args.repository / args.model).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    texts = list(load_texts(None).sample(args.n, seed=0).texts)
    ctx = multiprocessing.get_context("spawn")
    rates: dict[str, list[float]] = {w: [] for w in WAYS}
    for _ in range(args.rounds):
        for way in WAYS:
            q = ctx.Queue()
            p = ctx.Process(target=_worker, args=(way, str(folder), texts, args.max_length, q))
            p.start()
            rates[way].append(q.get(timeout=600))
            p.join()
    base = statistics.median(rates["hf-call"])
    for way, r in rates.items():
        med = statistics.median(r)
        print(f"{way:24s} median {med:7.1f} seq/s  x{med / base:.3f}  ({', '.join(f'{x:.0f}' for x in r)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
