"""The one place where user-facing errors become a line on stderr and a non-zero exit."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DISTRIBUTION = "triton-textclf"


def package_version() -> str:
    """The installed version of this toolkit (``unknown`` when run from a tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"


def prog_name(module_prog: str) -> str:
    """The program name for usage lines: the console script's (``textclf-serve``) or ``python -m serving``."""
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return invoked if invoked.startswith("textclf-") else module_prog


def command_parser(module_prog: str, description: str, verbose: bool = True):
    """A CLI's top parser (``--version``, ``-v``) and its required subcommands: ``(parser, subparsers)``."""
    parser = argparse.ArgumentParser(prog=prog_name(module_prog), description=description)
    add_common_flags(parser, verbose=verbose)
    return parser, parser.add_subparsers(dest="command", required=True)


def add_common_flags(parser: argparse.ArgumentParser, verbose: bool = True) -> None:
    """``--version`` (and ``-v/--verbose`` unless the subcommands carry it), the same on every CLI."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                        help="print the installed version and exit")
    if verbose:
        parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


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
