"""Repository integrity: compare a model repository with the SHA-256 hashes its ``provenance.json`` records.

``serving.repository.write_repository`` records ``files``: the hash of every file it wrote (relative path
-> hex SHA-256), taken before ``provenance.json`` itself is written, so that file is the one not covered.
A file changed, missing or added since is a tampered repository: :func:`verify_repository` raises
:class:`IntegrityError` naming it, before any server loads code (``model.py``) from it.

Bytecode is derived, never trusted: the python-backend stub of Triton 2.51 writes ``__pycache__`` beside
each ``model.py`` (it ignores PYTHONDONTWRITEBYTECODE), and a planted ``.pyc`` whose header matches the
source's size and mtime would run instead of the verified source. :func:`clear_bytecode` removes them
before a start; :func:`verify_repository` refuses any that remain (they are not in the hashes).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from serving.errors import RepositoryError

# The file beside the models that records every file's hash (serving.repository writes it, re-exports the name)
PROVENANCE = "provenance.json"

log = logging.getLogger(__name__)


class IntegrityError(RepositoryError):
    """The repository does not match the hashes in its provenance.json."""


def _recorded(repository: Path) -> dict[str, str]:
    path = repository / PROVENANCE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IntegrityError(f"{path}: no provenance.json, nothing to verify against "
                             "(rebuild the repository, or --skip-verify if you know why)") from None
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{path}: unreadable provenance ({exc})") from None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        raise IntegrityError(f"{path}: has no 'files' hashes to verify against")
    return files


def _present(repository: Path) -> list[str]:
    found = []
    for path in sorted(repository.rglob("*")):
        rel = path.relative_to(repository)
        if path.is_file() and str(rel) != PROVENANCE:
            found.append(str(rel))
    return found


def clear_bytecode(repository: Path | str) -> int:
    """Remove every ``__pycache__`` directory below ``repository``; return how many were removed."""
    import shutil

    caches = [p for p in Path(repository).rglob("__pycache__") if p.is_dir()]
    for cache in caches:
        try:
            shutil.rmtree(cache)
        except OSError as exc:
            raise IntegrityError(f"{cache}: cannot remove stale bytecode ({exc.strerror or exc})") from None
    if caches:
        log.info("removed %d __pycache__ director%s from %s", len(caches), "y" if len(caches) == 1 else "ies",
                 repository)
    return len(caches)


def verify_repository(repository: Path | str) -> int:
    """Raise IntegrityError on the first changed, missing or unexpected file; return the files checked."""
    from common.provenance import sha256_file

    repository = Path(repository)
    recorded = _recorded(repository)
    present = set(_present(repository))
    for rel, digest in sorted(recorded.items()):
        path = repository / rel
        if rel not in present:
            raise IntegrityError(f"{path}: missing (recorded in {PROVENANCE})")
        if sha256_file(path) != digest:
            raise IntegrityError(f"{path}: modified since the repository was built (SHA-256 differs from "
                                 f"{PROVENANCE})")
    extra = sorted(present - set(recorded))
    if extra:
        raise IntegrityError(f"{repository / extra[0]}: not in {PROVENANCE} (added after the repository was built)")
    log.info("repository %s matches its provenance (%d files)", repository, len(recorded))
    return len(recorded)
