"""What a build returns (``BuildResult``) and the exit codes it maps to: a record every build flow (the
classifier's, the embedder's, the tagger's) returns, below them all so none imports another for it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from exporter.artifacts import BuildReport

EXIT_OK, EXIT_NO_VARIANT = 0, 1


@dataclass
class BuildResult:
    report: BuildReport
    out: Path

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.report.selected else EXIT_NO_VARIANT
