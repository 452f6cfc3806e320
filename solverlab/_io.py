"""Atomic writes: every file and every result set solverlab writes goes through this module.

A file is written to a temporary file beside it (``.<name>.<random>.tmp``, so that the rename
never crosses a file system), flushed, ``fsync``-ed and moved onto the target with
:func:`os.replace`: a reader sees the old file or the complete new one. The temporary file is
created with mode ``0o666`` and the kernel applies the umask, as for :func:`open`; a replaced
file keeps its mode. Nothing here reads or changes process-wide state at import.

A result set (several files that belong together) is written into a temporary folder beside
its folder (``.<name>.<random>.part``) and swapped into place in one rename
(:func:`atomic_folder`): a reader sees the old set or the new set, never a mix.

Every temporary file or folder is ``flock``-ed by its writer. A later write to the same place
removes those no live process holds (left by a killed run) and logs each one on the
``solverlab`` logger; where ``flock`` is missing they are only reported.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fnmatch
import json
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .errors import OptionError

try:
    import fcntl
except ImportError:  # Windows: leftovers are reported, never removed
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "atomic_folder",
    "atomic_open",
    "atomic_write",
    "check_output_folder",
    "clean_leftovers",
    "write_bytes",
    "write_csv",
    "write_figure",
    "write_json",
    "write_text",
]

_FILE_SUFFIX = ".tmp"
_FOLDER_SUFFIX = ".part"


def _temp_name(target: Path, suffix: str) -> Path:
    return target.parent / f".{target.name}.{secrets.token_hex(4)}{suffix}"


def _is_temp_of(entry: str, target: Path, suffix: str) -> bool:
    # [0-9a-z_]: mkstemp's names too (earlier versions)
    return re.fullmatch(rf"\.{re.escape(target.name)}\.[0-9a-z_]{{8}}{re.escape(suffix)}",
                        entry) is not None


def _lock(fd: int, block: bool = True) -> bool:
    """``flock`` ``fd`` exclusively; False if another process holds it (``block=False``)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _create_locked(target: Path, suffix: str, make: Callable[[Path], int]) -> tuple[int, Path]:
    """A new temporary file or folder for ``target``, made by ``make(path) -> fd`` and locked.
    A cleaner may remove it between its creation and the lock; then it has no links left and
    another name is tried."""
    while True:
        tmp = _temp_name(target, suffix)
        try:
            fd = make(tmp)
        except FileExistsError:
            continue
        if fd == -1:  # a folder where flock is missing: nothing to lock
            return fd, tmp
        _lock(fd)
        if os.fstat(fd).st_nlink > 0:
            return fd, tmp
        os.close(fd)


def clean_leftovers(target: Path, suffix: str) -> list[Path]:
    """Remove the temporary files (``suffix=".tmp"``) or folders (``".part"``) of ``target``
    that no live process holds: leftovers of killed runs. Returns what was removed; each one is
    logged, as is every one that could not be checked (no ``flock``)."""
    import logging

    log = logging.getLogger("solverlab")
    removed = []
    try:
        entries = os.listdir(target.parent)
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not _is_temp_of(entry, target, suffix):
            continue
        path = target.parent / entry
        if fcntl is None:
            log.warning("found %s, left by an interrupted write (or being written now)", path)
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # gone already
        try:
            if not _lock(fd, block=False):
                continue  # a live writer holds it
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        finally:
            os.close(fd)
        removed.append(path)
        log.warning("removed %s, left by an interrupted write", path)
    return removed


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
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
        raise OptionError(f"atomic_open: mode={mode!r} is not allowed; use 'w' or 'wb'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path, _FILE_SUFFIX)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd, tmp = _create_locked(path, _FILE_SUFFIX, lambda p: os.open(p, flags, 0o666))
    try:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))  # keep the replaced file's mode
        kwargs: dict[str, Any] = {} if mode == "wb" else {"encoding": encoding, "newline": newline}
        with os.fdopen(os.dup(fd), mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)  # releases the lock
    _fsync_dir(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the system or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # C library without renameat2 (glibc < 2.28, musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


_FILE_LEFTOVER = re.compile(r"\.(.+)\.[0-9a-z_]{8}" + re.escape(_FILE_SUFFIX))


def _sort_entries(folder: Path, owned: Sequence[str]) -> tuple[list[str], list[str]]:
    """The entries of ``folder`` to keep (owned names) and the foreign ones; temporary files
    of owned names (left by killed writes) are neither: the new set drops them."""
    def is_owned(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in owned)

    keep, foreign = [], []
    for entry in sorted(os.listdir(folder)):
        leftover = _FILE_LEFTOVER.fullmatch(entry)
        if is_owned(entry) and (folder / entry).is_file():
            keep.append(entry)
        elif not (leftover and is_owned(leftover.group(1))):
            foreign.append(entry)
    return keep, foreign


def check_output_folder(target: str | os.PathLike[str], owned: Iterable[str]) -> None:
    """Raise :class:`OptionError` unless ``target`` is missing or a folder that holds only
    files named like ``owned`` (:func:`atomic_folder` may then replace it)."""
    target, owned = Path(os.path.realpath(target)), list(owned)
    if not target.exists():
        return
    if not target.is_dir():
        raise OptionError(f"output folder {str(target)!r} is a file; give a folder")
    foreign = _sort_entries(target, owned)[1]
    if foreign:
        shown = ", ".join(repr(f) for f in foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OptionError(
            f"output folder {str(target)!r} holds {shown}, which solverlab did not write; "
            f"results replace the folder whole, so it may hold only "
            f"{', '.join(repr(p) for p in owned)}: give a new or empty folder"
        )


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike[str], owned: Iterable[str]) -> Iterator[Path]:
    """Write a result set into a temporary folder and swap it in as the folder ``target``::

        with atomic_folder(out, owned=["compare.*"]) as tmp:
            write_csv(tmp / "compare.csv", ...)

    ``owned`` are the name patterns (:mod:`fnmatch`) of the files such sets hold. An existing
    ``target`` may hold only such files, else :class:`OptionError` names the others (nothing
    solverlab did not write is ever deleted). Owned files the block does not write again are
    kept (hard links), so sets of several runs may share a folder (``order-<solver>.*``).
    An exception in the block leaves ``target`` as it was.

    On Linux the swap is one ``renameat2(RENAME_EXCHANGE)``; elsewhere the old folder is moved
    aside first, so that for a moment there is no ``target`` (a kill in that moment leaves
    none, and the next run removes both temporary folders).
    """
    owned = list(owned)
    target = Path(os.path.realpath(target))
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    check_output_folder(target, owned)
    clean_leftovers(target, _FOLDER_SUFFIX)

    def make(p: Path) -> int:
        os.mkdir(p, 0o777)  # the umask applies
        return -1 if fcntl is None else os.open(p, os.O_RDONLY)

    fd, tmp = _create_locked(target, _FOLDER_SUFFIX, make)
    old = tmp  # what to remove at the end: the unfinished new set, or the old set
    try:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        yield tmp
        # writers to one parent folder take turns from the carry-over to the swap
        pfd = -1 if fcntl is None else os.open(parent, os.O_RDONLY)
        try:
            _lock(pfd)
            if target.is_dir():
                check_output_folder(target, owned)
                for entry in _sort_entries(target, owned)[0]:
                    if not (tmp / entry).exists():
                        _link_or_copy(target / entry, tmp / entry)
                if not _exchange(tmp, target):
                    old = _temp_name(target, _FOLDER_SUFFIX)
                    os.rename(target, old)
                    os.rename(tmp, target)
            else:
                os.rename(tmp, target)
            _fsync_dir(parent)
        finally:
            if pfd != -1:
                os.close(pfd)
    finally:
        try:
            shutil.rmtree(old, ignore_errors=True)
        finally:
            if fd != -1:
                os.close(fd)  # releases the lock


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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


def read_safetensors(path: str | os.PathLike[str], label: str, error: type[Exception]
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, metadata)`` of a safetensors file; ``error(message)`` (the message starts
    with ``label``, e.g. ``"checkpoint file 'x'"``) when it cannot be read, is truncated or is
    not a safetensors file. The metadata is the header's ``__metadata__`` (strings)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise error(f"{label} cannot be read: {e.strerror or e}") from None
    try:
        tensors = load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8:8 + header_len]).get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a mapping")
    except (SafetensorError, ValueError, RuntimeError, UnicodeDecodeError,
            AttributeError) as e:
        raise error(f"{label} is truncated or corrupt ({len(blob)} bytes): not a complete "
                    f"safetensors file ({e})") from None
    return tensors, meta


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
