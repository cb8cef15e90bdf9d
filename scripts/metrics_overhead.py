"""What the textclf_* metrics cost on the served path, side by side in one run.

    PYTHONPATH=$PWD .venv/bin/python scripts/metrics_overhead.py [--requests 1000] [--rows 1] [--json FILE]

Serves the packaged all-MiniLM-L6-v2 as a 3-label classifier (random head) twice in one repository:
``classifier`` with its metrics and ``plain`` with the model-config parameter ``metrics: "false"``. Sends
``--requests`` requests of ``--rows`` corpus texts to each, alternating (ABAB..., the order flipped every
pair), and prints per model the client's median latency and Triton's mean compute time per execution
(``nv_inference_compute_infer_duration_us`` / ``nv_inference_exec_count``: execute, with the metric flush).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from warm_start import LABELS, build_classifier  # noqa: E402


def _texts(n: int) -> list[str]:
    from finetune.data import load_corpus

    texts, _ = load_corpus()
    return [t for t in texts if t.strip()][:n]


def _server_compute_us(metrics_url: str, model: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") == model:
                values[family.name] = s.value
    return values["nv_inference_compute_infer_duration_us"] / max(values["nv_inference_exec_count"], 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from loadtest.warmstart import _timed_post
    from serving.contract import ServedModel, http_infer_body, infer_path
    from serving.repository import RepositoryConfig, add_model, write_repository
    from serving.server import LocalTritonServer, ServerConfig

    texts = _texts(args.requests * args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        ck, onnx = build_classifier(Path(tmp))
        repo = write_repository(Path(tmp) / "repo", onnx_model=onnx, tokenizer_dir=ck,
                                id2label=dict(enumerate(LABELS)), config=RepositoryConfig())
        add_model(repo, onnx_model=onnx, tokenizer_dir=ck, config=RepositoryConfig(extra={"metrics": "false"}),
                  model=ServedModel(name="plain", labels=LABELS))
        latency: dict[str, list[float]] = {"classifier": [], "plain": []}
        with LocalTritonServer(ServerConfig(repo, startup_timeout_s=300)) as server:
            for i in range(args.requests):
                body = json.dumps(http_infer_body(texts[i * args.rows:(i + 1) * args.rows], outputs=())).encode()
                for model in (("classifier", "plain") if i % 2 == 0 else ("plain", "classifier")):
                    latency[model].append(_timed_post(f"http://{server.http_url}{infer_path(model)}", body, 60))
            compute = {m: _server_compute_us(server.metrics_url, m) for m in latency}
    result = {m: {"median_ms": round(statistics.median(v) * 1e3, 3), "compute_us_per_exec": round(compute[m], 1)}
              for m, v in latency.items()}
    result["ratio_median"] = round(result["classifier"]["median_ms"] / result["plain"]["median_ms"], 3)
    result["ratio_compute"] = round(result["classifier"]["compute_us_per_exec"] /
                                    result["plain"]["compute_us_per_exec"], 3)
    result["requests"], result["rows_per_request"] = args.requests, args.rows
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
