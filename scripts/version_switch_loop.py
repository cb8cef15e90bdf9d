"""Switch a served model's version again and again while clients send requests: the drill that found why a
model's second load hung on the bundled Triton 2.51 (docs/RELIABILITY.md, "The second load that hung").

    PYTHONPATH=$PWD .venv/bin/python scripts/minilm_repository.py /tmp/minilm_repository
    PYTHONPATH=$PWD .venv/bin/python scripts/version_switch_loop.py /tmp/minilm_repository --rounds 16 --burners 2

It copies the served classifier of the given repository (its ONNX file and tokenizer) into a fresh one, serves
it with tritonserver (``--log-verbose``), starts ``--clients`` threads classifying without retries and
``--burners`` busy-loop processes, then alternates: write the next version (serving.repository.add_model) and
load it; roll back (serving.control). A load that takes longer than ``--hang-s`` is a hang: the loop stops
and names the server log (look for "Signal (" there; ``py-spy dump`` the stubs, ``gdb -p`` the server while
it hangs with ``--keep``). Prints one line per switch and a JSON summary; exit 1 on a hang or a failed request.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

TEXT = "the new model must answer this"


def _burn() -> None:
    while True:
        pass


class Clients:
    """Threads classifying TEXT in a closed loop with no retries; counts answers and failures."""

    def __init__(self, url: str, threads: int) -> None:
        self.url, self.ok, self.errors = url, 0, []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        from serving.client import TextClassifier

        with TextClassifier(self.url, retries=0, timeout_s=60) as client:
            while not self.stop.is_set():
                try:
                    client.classify([TEXT])
                    self.ok += 1
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    self.errors.append(f"{type(exc).__name__}: {exc}"[:200])

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=70)


def fresh_repository(source: Path, out: Path):
    """(a one-model repository at ``out`` serving ``source``'s classifier at version 1, a function writing the
    next version)."""
    from serving.repository import RepositoryConfig, add_model, read_repository, write_repository

    served = read_repository(source).model()
    tokenizer = served.onnx_path.parent / "tokenizer"
    config = RepositoryConfig(max_batch_size=8)
    write_repository(out, onnx_model=served.onnx_path, tokenizer_dir=tokenizer, model=served.contract,
                     id2label=dict(enumerate(served.contract.labels)), config=config)
    return lambda: add_model(out, onnx_model=served.onnx_path, tokenizer_dir=tokenizer, model=served.contract,
                             config=config)


def switch_loop(server, next_version, args) -> dict:
    """Alternate a new version and a rollback under clients; stop at the first hang."""
    from serving.control import ModelControl

    control = ModelControl(server.http_url, server.admin_key, timeout_s=args.hang_s)
    name = control.models()[0].name
    clients = Clients(server.http_url, args.clients)
    rounds, hang = [], None
    try:
        for i in range(args.rounds):
            step, t0 = ("build", "rollback")[i % 2], time.time()
            try:
                if step == "build":
                    next_version()
                    control.load(name)
                else:
                    control.rollback(name)
            except Exception as exc:  # noqa: BLE001 - a load with no answer: the hang this drill looks for
                hang = {"round": i, "step": step, "after_s": round(time.time() - t0, 1), "error": str(exc)[:300]}
                break
            rounds.append({"round": i, "step": step, "s": round(time.time() - t0, 2),
                           "served": list(control.served_versions(name))})
            print(json.dumps(rounds[-1]), flush=True)
            time.sleep(args.pause_s)
    finally:
        clients.close()
    signals = [ln for ln in server.log_text().splitlines() if "Signal (" in ln or "malloc(" in ln]
    return {"rounds": len(rounds), "hang": hang, "answered": clients.ok, "failed": len(clients.errors),
            "errors": clients.errors[:3], "fatal_signals_in_log": signals[:5], "log": str(server.log_path)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repository", type=Path, help="a repository whose served classifier is copied")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--burners", type=int, default=2, help="busy-loop processes beside the server")
    parser.add_argument("--hang-s", type=float, default=40.0, help="a load taking longer is a hang")
    parser.add_argument("--pause-s", type=float, default=1.0)
    parser.add_argument("--log-verbose", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="on a hang, leave the server running for gdb/py-spy")
    args = parser.parse_args(argv)

    from serving.server import LocalTritonServer, ServerConfig

    work = Path(tempfile.mkdtemp(prefix="version-switch-"))
    next_version = fresh_repository(args.repository, work / "model_repository")
    burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(args.burners)]
    for burner in burners:
        burner.start()
    server = LocalTritonServer(ServerConfig(work / "model_repository", log_file=work / "tritonserver.log",
                                            log_verbose=args.log_verbose, exit_timeout_s=3)).start()
    try:
        summary = switch_loop(server, next_version, args)
        print(json.dumps(summary, indent=2), flush=True)
        if summary["hang"] and args.keep:
            input(f"hung: tritonserver pid {server.process.pid}; press Enter to stop it ")
    finally:
        for burner in burners:
            burner.kill()
        if server.process.poll() is None:
            server.process.kill()  # a wedged server would only wait out its exit timeout
        server.stop()
    return 1 if summary["hang"] or summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
