"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every result file batchpilot writes (checkpoints, ``summary.json``, ``plan.json``, reports, metrics
rewrites) goes through :func:`atomic_write`: the data goes to a fresh temporary file made by
:func:`tempfile.mkstemp` in the target's own directory (an unpredictable name, created exclusively,
on the same file system so the rename is atomic), is flushed and ``fsync``-ed, then renamed over
the target with :func:`os.replace`. If anything fails, including ``KeyboardInterrupt`` or a full
disk, the temporary file is removed and the target is left as it was.

The new file gets the permissions a plain ``open(path, "w")`` would give it (those of the file it
replaces, else ``0o666`` less the umask), and a symlink target is written through, as ``open`` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from batchpilot.errors import BatchpilotError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); best effort elsewhere."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                durable: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on success it replaces ``path``.

    Args:
        path: the file to (re)write. Its directory must exist.
        mode: ``"wb"`` or ``"w"`` (text; ``encoding`` defaults to UTF-8).
        encoding: text encoding for ``mode="w"``.
        durable: ``fsync`` the file and its directory (survives a power cut, not only a crash).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    if target.is_symlink():  # write through the link, as open(path, "w") would
        target = Path(os.path.realpath(target))
    directory = target.parent
    try:
        perms = target.stat().st_mode & 0o7777
    except OSError:
        perms = 0o666 & ~_UMASK
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, **({"encoding": encoding or "utf-8"} if mode == "w" else {})) as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.chmod(tmp, perms)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        _fsync_dir(directory)


def atomic_write(path: str | os.PathLike, data: bytes | str, *, encoding: str = "utf-8",
                 durable: bool = True) -> Path:
    """Write ``data`` (bytes, or text in ``encoding``) to ``path`` atomically; returns the path."""
    if isinstance(data, str):
        data = data.encode(encoding)
    with atomic_open(path, "wb", durable=durable) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", durable: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, text, encoding=encoding, durable=durable)


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2, allow_nan: bool = False,
                      durable: bool = True, **dumps_kwargs: Any) -> Path:
    """Write ``data`` as JSON (strict by default: NaN/inf raise before anything is written) plus a newline.

    The JSON text is built before the temporary file is made, so a value that does not serialize
    leaves no trace on disk.
    """
    text = json.dumps(data, indent=indent, allow_nan=allow_nan, **dumps_kwargs) + "\n"
    return atomic_write(path, text, durable=durable)


def atomic_torch_save(path: str | os.PathLike, obj: Any, *, durable: bool = True) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    try:
        with atomic_open(path, "wb", durable=durable) as fh:
            torch.save(obj, fh)
    except RuntimeError as exc:
        # Ctrl-C inside torch's zip writer: its clean-up then fails ("unexpected pos ...") and reports a
        # RuntimeError in place of the KeyboardInterrupt; the temporary file is gone and the target untouched
        if _interrupted(exc):
            raise KeyboardInterrupt from None
        raise
    return Path(path)


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while handling a ``KeyboardInterrupt`` (anywhere in its context chain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__context__
    return False


def atomic_write_with(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, durable: bool = True) -> Path:
    """Call ``write(fh)`` on a binary temporary file, then put it in place atomically
    (e.g. ``lambda fh: fig.savefig(fh, format="png")``)."""
    with atomic_open(path, "wb", durable=durable) as fh:
        write(fh)
    return Path(path)


def check_input_file(value: str | os.PathLike, what: str, expected: str = "an existing file") -> Path:
    """``value`` as the path of an input file that exists, is a file and is readable.

    Args:
        value: the path the user gave.
        what: how messages name it (``--plan``, ``--calibration``).
        expected: what the file should be, for the messages.

    Raises:
        BatchpilotError: an empty path, or one that does not exist, is not a file or cannot be read.
    """
    text = os.fspath(value)
    if not text.strip():
        raise BatchpilotError(f"{what} must name a file, got {text!r}")
    path = Path(text)
    if not path.exists():
        raise BatchpilotError(f"{what} {text!r} does not exist; expected {expected}")
    if not path.is_file():
        raise BatchpilotError(f"{what} {text!r} is not a file; expected {expected}")
    if not os.access(path, os.R_OK):
        raise BatchpilotError(f"{what} {text!r} is not readable")
    return path
