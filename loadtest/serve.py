"""Start the local tritonserver (serving.server.LocalTritonServer, free ports, loopback) for a load test."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from loadtest.errors import LoadtestError
from serving.contract import Endpoint, Protocol
from serving.errors import ServingError
from serving.server import LocalTritonServer, ServerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoints:
    http_url: str  # http://127.0.0.1:PORT
    grpc_url: str  # 127.0.0.1:PORT
    metrics_url: str
    start_seconds: float | None
    log_path: str | None
    pid: int | None = None

    def url(self, protocol: Protocol | str) -> str:
        """The URL, with its scheme, that a client of ``protocol`` calls."""
        if Protocol(protocol) is Protocol.HTTP:
            return self.http_url
        return Endpoint(self.grpc_url, Protocol.GRPC).url

    def as_dict(self) -> dict:
        return {"http_url": self.http_url, "grpc_url": self.grpc_url, "metrics_url": self.metrics_url,
                "start_seconds": self.start_seconds, "log": self.log_path}


@contextlib.contextmanager
def served(repository: Path, log_file: Path | None = None, extra_args: tuple[str, ...] = ()) -> Iterator[Endpoints]:
    """Run tritonserver on ``repository`` (with ``extra_args``, more tritonserver flags) for the duration of
    the block; yield its endpoints."""
    try:
        server = LocalTritonServer(ServerConfig(Path(repository), log_file=log_file, extra_args=tuple(extra_args)))
        server.start()
    except ServingError as exc:
        raise LoadtestError(f"could not start tritonserver: {exc}") from exc
    try:
        yield Endpoints(f"http://{server.http_url}", server.grpc_url, server.metrics_url, server.start_seconds,
                        None if server.log_path is None else str(server.log_path),
                        server.process.pid if server.process is not None else None)
        if not server.is_alive():
            raise LoadtestError(f"tritonserver died during the run (log: {server.log_path})")
    finally:
        server.stop()
