"""The build process's memory: its peak and current resident set size, and handing freed heap back to the
OS. Standard library only, so every stage (and a worker process) can call it."""
from __future__ import annotations

import ctypes
import gc
import resource
from pathlib import Path

_PAGE = resource.getpagesize()


def peak_rss() -> int:
    """The process's high-water resident set size in bytes (it never goes down)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    """The process's resident set size now, in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def weights_size(checkpoint: Path) -> int | None:
    """The bytes of a checkpoint folder's weights file (the unit of a build's memory record), None without one."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (Path(checkpoint) / name).is_file():
            return (Path(checkpoint) / name).stat().st_size
    return None
