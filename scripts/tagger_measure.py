"""Measure: a served tagger (real tritonserver) against transformers.pipeline("token-classification"), side by side.

    python scripts/tagger_measure.py [--workdir /tmp/tagger-measure] [--texts 300] [--precisions fp32,fp16,int8]

Makes a token classifier from the packaged all-MiniLM-L6-v2 encoder with a random-init 7-tag head (nothing is
downloaded; the checkpoint lives under --workdir: never commit it), builds it with `exporter build` on corpus
texts (the gate's table is printed), serves the repository (one pinned 1-thread instance per core), and in one
run measures texts/s of: the pipeline (1 thread, one text at a time), the served tagger with one client sending
one text per request, and with one client per core. It checks the served entities equal the pipeline's when the
fp32 variant is served. Prints a Markdown table (medians of 3 passes).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")


def make_checkpoint(work: Path, n: int) -> tuple[Path, Path, list[str]]:
    import torch
    from transformers import AutoTokenizer, BertForTokenClassification

    import random

    from finetune.train import packaged_base as packaged_encoder_dir
    from loadtest.texts import read_corpus_texts

    torch.manual_seed(0)
    ck = work / "minilm-ner"
    model = BertForTokenClassification.from_pretrained(packaged_encoder_dir(), num_labels=len(TAGS),
                                                       id2label=dict(enumerate(TAGS)),
                                                       label2id={t: i for i, t in enumerate(TAGS)})
    model.save_pretrained(ck)
    AutoTokenizer.from_pretrained(packaged_encoder_dir()).save_pretrained(ck)
    texts = random.Random(99).sample(list(read_corpus_texts().texts), n)
    with open(work / "eval.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["text"]] + [[t] for t in texts])
    return ck, work / "eval.csv", texts


def rate(fn, texts: list[str], workers: int = 1) -> float:
    """Median texts/s over 3 passes of ``fn(text)`` on every text (``workers`` threads sharing the texts)."""
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fn, texts))
        runs.append(len(texts) / (time.perf_counter() - start))
    return statistics.median(runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tagger-measure"))
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("--precisions", default="fp32,fp16,int8")
    args = parser.parse_args()
    import torch
    from transformers import pipeline

    from exporter.cli import main as exporter_main
    from serving.client import Tagger
    from serving.repository import usable_cores
    from serving.server import LocalTritonServer, ServerConfig

    args.workdir.mkdir(parents=True, exist_ok=True)
    ck, eval_csv, texts = make_checkpoint(args.workdir, args.texts)
    repo = args.workdir / "repo"
    code = exporter_main(["build", str(ck), "--eval-data", str(eval_csv), "--eval-size", str(len(texts)),
                          "--precisions", args.precisions, "--out", str(args.workdir / "build"),
                          "--repository", str(repo)])
    if code:
        return code
    selected = json.loads((args.workdir / "build" / "report.json").read_text())["selected"]
    torch.set_num_threads(1)
    pipe = pipeline("token-classification", model=str(ck), aggregation_strategy="simple", device="cpu")
    pipe.tokenizer.model_max_length = 128
    rows = [("transformers.pipeline, 1 thread, one text at a time", rate(pipe, texts))]
    cores = usable_cores()
    with LocalTritonServer(ServerConfig(repo, startup_timeout_s=180)) as server:
        local = threading.local()

        def tag(text):  # one client per thread
            if not hasattr(local, "client"):
                local.client = Tagger(url=server.http_url)
            return local.client.entities(text)

        got = Tagger(url=server.http_url).entities(texts)
        if selected == "fp32":
            want = [[(e["entity_group"], e["start"], e["end"]) for e in row] for row in pipe(texts)]
            assert [[(e["entity_group"], e["start"], e["end"]) for e in row] for row in got] == want
        rows.append((f"served tagger ({selected}), 1 client, 1 text/request", rate(tag, texts)))
        rows.append((f"served tagger ({selected}), {cores} clients, 1 text/request", rate(tag, texts, cores)))
    base = rows[0][1]
    print("\n| path | texts/s (median of 3) | vs pipeline |\n|---|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.0f} | {value / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
