"""The gateway's options (one dataclass: the CLI is generated from it) and where its API key comes from."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from serving.errors import GatewayError

API_KEY_ENV = "TEXTCLF_API_KEY"
API_KEY_FILE_ENV = "TEXTCLF_API_KEY_FILE"
MIN_KEY_CHARS = 16
DEFAULT_PORT = 8080
MIB = 1 << 20


@dataclass
class GatewayConfig:
    """Where the gateway listens, which Triton it forwards to, its caps and its key."""

    repository: Path = field(metadata={"help": "the model repository tritonserver serves (contracts, tokenizers)"})
    triton_url: str = field(default="127.0.0.1:8001", metadata={"help": "tritonserver gRPC host:port"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (loopback only by default)"})
    port: int = field(default=DEFAULT_PORT, metadata={"help": "port to listen on"})
    api_key: str | None = field(default=None, repr=False, metadata={
        "help": f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV}, else "
                f"the file ${API_KEY_FILE_ENV} names, else no key); see docs/GATEWAY.md"})
    max_body_bytes: int = field(default=16 * MIB, metadata={"help": "largest request body (larger: 413)"})
    max_rows: int = field(default=2048, metadata={"help": "most texts (or pairs) in one request (more: 413)"})
    max_text_chars: int = field(default=4 * MIB, metadata={"help": "longest text in characters (longer: 413)"})
    channels: int = field(default=2, metadata={"help": "pooled gRPC channels to tritonserver"})
    timeout_s: float = field(default=60.0, metadata={"help": "seconds a request to tritonserver may take"})
    embedder: str | None = field(default=None, metadata={
        "help": "default model of /embed, /v1/embeddings (default: 'embedder', else the only embedding model)"})
    classifier: str | None = field(default=None, metadata={
        "help": "default model of /predict (default: 'classifier', else the only classifier)"})
    reranker: str | None = field(default=None, metadata={
        "help": "default model of /rerank (default: 'reranker', else the only text-pair regression model)"})

    def __post_init__(self) -> None:
        self.repository = Path(self.repository)
        if not 0 <= self.port <= 65535:
            raise GatewayError(f"port must be in 0..65535, got {self.port}")
        if min(self.max_body_bytes, self.max_rows, self.max_text_chars, self.channels) < 1 or self.timeout_s <= 0:
            raise GatewayError("max_body_bytes, max_rows, max_text_chars and channels must be >= 1, timeout_s > 0")
        if self.api_key is None:
            self.api_key = key_from_environment()
        if self.api_key is not None:
            check_api_key(self.api_key)


def check_api_key(key: str) -> str:
    """At least 16 printable ASCII characters without spaces (it travels in a header)."""
    if len(key) < MIN_KEY_CHARS or not all(33 <= ord(c) < 127 for c in key):
        raise GatewayError(f"API key must be at least {MIN_KEY_CHARS} printable ASCII characters without spaces "
                           f"(got {len(key)} characters)")
    return key


def key_from_environment(environ: dict[str, str] | None = None) -> str | None:
    """``TEXTCLF_API_KEY``, else the contents of the file ``TEXTCLF_API_KEY_FILE`` names, else None."""
    env = os.environ if environ is None else environ
    if env.get(API_KEY_ENV):
        return env[API_KEY_ENV].strip()
    path = env.get(API_KEY_FILE_ENV)
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.read().strip()
        except OSError as exc:
            raise GatewayError(f"{API_KEY_FILE_ENV}: cannot read {path}: {exc.strerror}") from None
    return None
