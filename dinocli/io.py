"""Atomic file writes: a temporary file in the same folder, fsync, then rename over the target."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dinocli.errors import DinoError, UsageError


def check_output_path(path: str | Path | None, option: str, folder: bool = False) -> None:
    """Refuse, before any work is done, an output (given as ``option``) that cannot be written: a
    folder where a file goes (a file where a ``folder`` goes), or a path under a file."""
    if path is None:
        return
    path = Path(path)
    if not folder and path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name")
    if folder and path.is_file():
        raise UsageError(f"{option} {path} is a file; give a folder")
    if blocker := _file_in_the_way(path.parent):
        raise UsageError(f"{option} {path}: {blocker} is a file, not a folder")


def make_folder(folder: str | Path) -> None:
    """Create ``folder`` and its parents; a file in the way or a refused permission is one clear error."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DinoError(f"cannot make the folder {folder}: {_why(folder, exc)}") from exc


def _file_in_the_way(folder: Path) -> Path | None:
    """The file standing where ``folder`` or one of its parents must be a folder, if any."""
    for path in (folder, *folder.parents):
        if path.exists():
            return None if path.is_dir() else path
    return None


def _why(folder: Path, exc: OSError) -> str:
    """Why ``folder`` cannot be made or written into."""
    blocker = _file_in_the_way(folder)
    return f"{blocker} is a file, not a folder" if blocker else exc.strerror or str(exc)


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target`` atomically.

    If the block raises (or the process dies), ``target`` keeps its previous content and the
    temporary file is removed (where the process survives to do so).
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise DinoError(f"cannot write {target}: {_why(target.parent, exc)}") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename
    try:
        yield tmp_path
        try:
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, target)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise DinoError(f"could not write {target} ({reason}); it was not changed") from exc
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise DinoError(f"no space left on device while writing {target}; it was not changed") from exc
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it is renamed to ``target``.

    An existing ``target`` is swapped out only when ``replace`` (and removed after the rename);
    if the block raises, ``target`` is untouched and the temporary folder is removed.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would outlive the rename
    except OSError as exc:
        raise DinoError(f"cannot write {target}: {_why(target.parent, exc)}") from exc
    old = target.with_name(f"{tmp.name}.old")
    try:
        yield tmp
        if target.exists():
            if not replace:
                raise DinoError(f"{target} appeared while it was being written; nothing was changed")
            os.replace(target, old)
        os.replace(tmp, target)
    except OSError as exc:
        if old.exists() and not target.exists():
            os.replace(old, target)  # put the previous folder back
        shutil.rmtree(tmp, ignore_errors=True)
        raise DinoError(f"could not write {target} ({exc.strerror or exc}); it was not changed") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    atomic_write_bytes(target, text.encode("utf-8"))
