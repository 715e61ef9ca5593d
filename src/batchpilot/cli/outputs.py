"""Output paths: checked before any work, and results that survive a failed write.

Every verb checks its output paths (``--out``, ``--store``) before the expensive part, so a
typo costs seconds, not a training run. A write that still fails after the work (a full disk,
a directory removed meanwhile) does not lose the result: :func:`save_or_fallback` writes it
to a fallback file in the temporary directory, or prints it, and says where.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from batchpilot.errors import BatchpilotError
from batchpilot.files import check_input_file


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the cwd for a relative path with none)."""
    p = path
    while not p.exists() and not p.is_symlink():
        parent = p.parent
        if parent == p:
            break
        p = parent
    return p


def writable_dir(path: Path) -> bool:
    """Whether this process can create files in the directory ``path`` (permissions, read-only mounts, root)."""
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    try:  # os.access says yes to root and ignores read-only mounts: try an unnamed temporary file
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError:
        return False
    return True


def _check_creatable(path: Path, flag: str, what: str, shown: str) -> None:
    """The directory ``path`` (not there yet) can be created: no file in the way, a writable ancestor."""
    anchor = _nearest_existing(path.absolute())
    if not anchor.is_dir():
        raise BatchpilotError(f"{flag} {shown!r}: {str(anchor)!r} is a file, so {what} cannot be created under it; "
                              f"expected a path in a directory")
    if not writable_dir(anchor):
        raise BatchpilotError(f"{flag} {shown!r}: directory {str(anchor)!r} is not writable; expected a writable "
                              f"location for {what}")


def check_out_dir(value: str | os.PathLike | None, flag: str = "--out") -> Path | None:
    """Check an output directory before any work; nothing is created.

    Raises:
        BatchpilotError: ``value`` names an existing file, lies under a file, or is (or would be created in)
            a directory this process cannot write.
    """
    if value is None:
        return None
    text = os.fspath(value)
    if not text.strip():
        raise BatchpilotError(f"{flag} must name a directory, got {text!r}")
    path = Path(text)
    if path.exists():
        if not path.is_dir():
            raise BatchpilotError(f"{flag} {text!r} exists and is not a directory; expected a directory (new or existing)")
        if not writable_dir(path):
            raise BatchpilotError(f"{flag} {text!r} is not writable; expected a directory this user can write")
        return path
    _check_creatable(path, flag, "the output directory", text)
    return path


def check_out_file(value: str | os.PathLike, flag: str) -> Path:
    """Check an output file path (e.g. ``--store sweep.db``) before any work; nothing is created.

    Raises:
        BatchpilotError: ``value`` is a directory, lies under a file, or its directory is not writable.
    """
    text = os.fspath(value)
    if not text.strip():
        raise BatchpilotError(f"{flag} must name a file, got {text!r}")
    path = Path(text)
    if path.is_dir():
        raise BatchpilotError(f"{flag} {text!r} is a directory; expected a file path")
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            raise BatchpilotError(f"{flag} {text!r} is not readable and writable; expected a file this user can write")
        if not writable_dir(path.absolute().parent):  # SQLite writes a journal next to it
            raise BatchpilotError(f"{flag} {text!r}: its directory is not writable; expected a writable directory")
        return path
    _check_creatable(path.absolute().parent, flag, "the file", text)
    return path


def check_in_file(value: str | os.PathLike, flag: str) -> Path:
    """An input file that must exist and be a readable file (:func:`batchpilot.files.check_input_file`)."""
    return check_input_file(value, flag)


def fallback_path(verb: str, name: str) -> Path:
    """A fresh file in the temporary directory for a result that could not go where asked."""
    stem, _, suffix = name.rpartition(".")
    fd, path = tempfile.mkstemp(prefix=f"batchpilot-{verb}-{stem or name}-", suffix=f".{suffix}" if stem else "")
    os.close(fd)
    return Path(path)


def save_or_fallback(write: Callable[[], Any], data: Any, *, verb: str, what: str, name: str) -> str | None:
    """Run ``write()``; if it fails with an OS error, keep ``data`` (JSON-ready) elsewhere.

    Returns ``None`` when the write succeeded, else a one-line message: why it failed and where the
    result went (a fallback file in the temporary directory, or stdout when even that fails).
    """
    try:
        write()
        return None
    except OSError as exc:
        reason = exc.strerror or str(exc)
    text = json.dumps(data, indent=2, allow_nan=False, default=str) + "\n"
    try:
        path = fallback_path(verb, name)
        path.write_text(text, encoding="utf-8")
        where = f"the result was saved to {path}"
    except OSError:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
            where = "the result was printed on stdout"
        except OSError:
            where = "the result could not be saved anywhere"
    return f"could not write {what}: {reason}; {where}"


def report_write_failure(verb: str, message: str) -> None:
    """Print a failed write's one line on stderr."""
    print(f"batchpilot {verb}: error: {message}", file=sys.stderr)
