"""Atomic file writes: everything solverlab writes to disk goes through this module.

A write goes to a temporary file in the target's own directory (so that the final rename never
crosses a file system), is flushed and ``fsync``-ed, and then replaces the target with
:func:`os.replace`, which is atomic on POSIX and Windows. A reader therefore sees the old file
or the complete new one, never a half-written file; if writing fails midway the temporary file
is removed and the old file is left untouched. The new file gets the permissions of the file it
replaces, or ``0o666`` less the umask for a new file (``mkstemp`` alone would leave ``0o600``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_open",
    "atomic_write",
    "write_bytes",
    "write_csv",
    "write_figure",
    "write_json",
    "write_text",
]

_TMP_SUFFIX = ".tmp"


def _umask() -> int:
    # os.umask can only be read by setting it; done once, at import (single-threaded then).
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
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
def atomic_open(
    path: str | os.PathLike[str], mode: str = "w", *, encoding: str | None = "utf-8",
    newline: str | None = None,
) -> Iterator[IO[Any]]:
    """Open ``path`` for writing, atomically: ``with atomic_open(p) as f: f.write(...)``.

    ``mode`` is ``"w"`` (text, ``encoding``/``newline`` as for :func:`open`) or ``"wb"``. The
    target is replaced only when the block exits normally; an exception inside the block
    removes the temporary file, leaves the old target as it was, and propagates.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode={mode!r} is not allowed; use 'w' or 'wb'")
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=directory)
    try:
        try:
            mode_bits = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode_bits = 0o666 & ~_UMASK
        os.chmod(tmp, mode_bits)
        kwargs: dict[str, Any] = {} if mode == "wb" else {"encoding": encoding, "newline": newline}
        with os.fdopen(fd, mode, **kwargs) as f:
            fd = -1  # owned by f from here on
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd != -1:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[IO[Any]], object], *, binary: bool = False,
    encoding: str = "utf-8", newline: str | None = None,
) -> Path:
    """Call ``write(f)`` on a temporary file and move it onto ``path`` once ``write`` returns.
    If ``write`` raises, ``path`` keeps its old content and no temporary file is left."""
    with atomic_open(path, "wb" if binary else "w", encoding=None if binary else encoding,
                     newline=None if binary else newline) as f:
        write(f)
    return Path(path)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data), binary=True)


def write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (``\\n`` line endings on every platform)."""
    return atomic_write(path, lambda f: f.write(text), encoding=encoding, newline="")


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (UTF-8, strict: NaN or infinity is an error, use ``None``)."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)
    return write_text(path, text + "\n")


def write_csv(
    path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str],
) -> Path:
    """Write ``rows`` (mappings, ``None`` written as an empty cell) as CSV with a header."""

    def write(f: IO[str]) -> None:
        w = csv.DictWriter(f, fieldnames=list(fieldnames), lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})

    return atomic_write(path, write, newline="")


def write_figure(path: str | os.PathLike[str], figure: Any, **savefig: Any) -> Path:
    """Save a matplotlib ``figure`` to ``path`` atomically; the format comes from the suffix
    of ``path`` (the temporary file's own suffix would mislead matplotlib)."""
    fmt = savefig.pop("format", None) or Path(path).suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda f: figure.savefig(f, format=fmt, **savefig), binary=True)
