"""The one place where user-facing errors become a line on stderr and a non-zero exit."""
from __future__ import annotations

import logging
import sys
from typing import Callable

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def setup_logging(verbose: bool = False) -> None:
    """Log lines with their time to stderr; quiet the chattiest libraries."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("urllib3", "filelock", "datasets", "matplotlib", "PIL", "h5py", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_cli(func: Callable[[], int], user_errors: tuple[type[BaseException], ...], prog: str) -> int:
    """Run ``func``; report ``user_errors`` as one line (``prog: error: …``) and exit code 2.

    Anything else is a bug and keeps its traceback. Ctrl-C exits 130 without a traceback.
    """
    try:
        return func()
    except user_errors as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
