"""Measure a `--long-text chunk` embedder on long documents, served and by the reference (docs/EMBEDDINGS.md
quotes its output).

    python scripts/embedding_chunk_measure.py --model <sentence-transformers dir> --build <build dir> \
        --repository <repository> [--model-name embedder] [--docs 24] [--texts data/test.csv]

Documents: ``--docs`` texts of 2,000-50,000 characters joined from the example corpus (loadtest/long_docs.py).
Reference: sentence-transformers' modules before Normalize on each document's windows, averaged, normalised as
the model does (exporter.embedding_gate.chunked_reference, the build's chunk settings from its report.json),
padded batches of 32, 2 torch threads. Served: the repository in a real tritonserver, one document per gRPC
request, one client. Printed as JSON: min/mean cosine served vs reference, WINDOWS = the reference's counts,
docs/s of each, and the cosine of the truncating answer (``encode``) to the chunked one.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _reference(model_dir: Path, build: Path, docs: list[str]) -> dict:
    import torch

    from exporter.chunking import ChunkConfig
    from exporter.embedding import load_tokenizer, read_pipeline
    from exporter.embedding_gate import Chunked, chunked_reference, reference_embeddings, reference_model

    settings = json.loads((build / "report.json").read_text())["settings"]
    pipeline = read_pipeline(model_dir)
    chunked = Chunked(ChunkConfig(settings["chunk_overlap"], settings["max_chunks"]), pipeline.normalize)
    model, tokenizer = reference_model(pipeline), load_tokenizer(pipeline)
    torch.set_num_threads(2)
    chunked_reference(model, tokenizer, docs[:2], pipeline.max_seq_length, chunked)  # warm-up
    start = time.perf_counter()
    want, counts = chunked_reference(model, tokenizer, docs, pipeline.max_seq_length, chunked)
    seconds = time.perf_counter() - start
    truncated = reference_embeddings(model, docs)
    return {"embeddings": want, "counts": counts, "docs_per_s": len(docs) / seconds, "truncated": truncated,
            "settings": {k: settings[k] for k in ("chunk_overlap", "max_chunks")}}


def _served(repository: Path, name: str, docs: list[str]) -> dict:
    import tritonclient.grpc as grpc

    from serving.contract import EMBEDDING, WINDOWS, infer_inputs, requested_outputs
    from serving.server import LocalTritonServer, ServerConfig

    rows, windows, times = [], [], []
    with LocalTritonServer(ServerConfig(repository, startup_timeout_s=300)) as srv:
        client = grpc.InferenceServerClient(srv.grpc_url)
        outputs = requested_outputs(grpc, [EMBEDDING, WINDOWS])
        client.infer(name, infer_inputs(grpc, docs[:1]), outputs=outputs)  # warm-up
        for doc in docs:
            start = time.perf_counter()
            res = client.infer(name, infer_inputs(grpc, [doc]), outputs=outputs, client_timeout=300)
            times.append(time.perf_counter() - start)
            rows.append(res.as_numpy(EMBEDDING)[0])
            windows.append(int(res.as_numpy(WINDOWS).reshape(-1)[0]))
        client.close()
    return {"embeddings": np.stack(rows), "windows": windows, "docs_per_s": len(docs) / sum(times),
            "median_ms": float(np.median(times) * 1e3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--build", type=Path, required=True)
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model-name", default="embedder")
    parser.add_argument("--docs", type=int, default=24)
    parser.add_argument("--texts", type=Path, default=None)
    args = parser.parse_args(argv)
    from loadtest.long_docs import long_documents
    from loadtest.texts import load_texts

    docs = long_documents(load_texts(args.texts).texts, args.docs, seed=0)
    ref = _reference(args.model, args.build, docs)
    served = _served(args.repository, args.model_name, docs)
    cos = _cosines(served["embeddings"], ref["embeddings"])
    print(json.dumps({
        "docs": len(docs), "chars": [min(map(len, docs)), max(map(len, docs))], **ref["settings"],
        "windows_mean": float(np.mean(ref["counts"])), "windows_equal": served["windows"] == ref["counts"],
        "served_vs_reference_min_cosine": float(cos.min()), "served_vs_reference_mean_cosine": float(cos.mean()),
        "reference_docs_per_s_2_threads": ref["docs_per_s"], "served_docs_per_s_grpc_c1": served["docs_per_s"],
        "served_median_ms": served["median_ms"],
        "truncated_vs_chunked_mean_cosine": float(_cosines(ref["truncated"], ref["embeddings"]).mean())}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
