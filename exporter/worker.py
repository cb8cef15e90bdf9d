"""`python -m exporter.worker CHECKPOINT SCRATCH TARGET`: export + graph fusion in a process of its own.

The torch exporter and the fusion passes hold several copies of the weights at once (measured on a
BERT-base-sized checkpoint: +2.6 GB for the export, +3.8 GB for ORTOptimizer's O2 pass). Run here, all
of it is returned to the system when the worker exits, and the build process's own peak stays with
the variants. The result is ``SCRATCH/optimized/model.onnx`` and ``SCRATCH/optimization.json``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULT = "optimization.json"
EXIT_USER_ERROR = 3


def run(checkpoint: Path, scratch: Path, target: str) -> dict:
    """Export and fuse; return the optimisation record (the fused graph is in ``scratch/optimized``)."""
    from exporter import export, optimize
    from exporter.config import Target

    export.export_onnx(checkpoint, scratch / "raw")
    _, record = optimize.optimize_onnx(scratch / "raw", scratch / "optimized", Target(target))
    return record


def main(argv: list[str] | None = None) -> int:
    from common.cli import setup_logging
    from exporter.errors import ExporterError

    checkpoint, scratch, target = (argv or sys.argv[1:])[:3]
    setup_logging(False)
    scratch_dir = Path(scratch)
    try:
        record = run(Path(checkpoint), scratch_dir, target)
    except ExporterError as exc:  # a user error (unexportable checkpoint): the parent reports it as one line
        (scratch_dir / RESULT).write_text(json.dumps({"error": str(exc), "type": type(exc).__name__}))
        return EXIT_USER_ERROR
    (scratch_dir / RESULT).write_text(json.dumps({"record": record}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
