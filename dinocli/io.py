"""Atomic file writes: a temporary file in the same folder, fsync, then rename over the target."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from dinocli.errors import DinoError, UsageError


#: what an existing output may be for a command to replace it: a description and a test of the file.
Replaceable = tuple[str, Callable[[Path], bool]]


def check_output_path(
    path: str | Path | None,
    option: str,
    folder: bool = False,
    *,
    inputs: Iterable[tuple[str, str | Path | None]] = (),
    replaces: Replaceable | None = None,
) -> None:
    """Refuse, before any work is done, an output (given as ``option``) that cannot be written or
    must not be: a folder where a file goes (a file where a ``folder`` goes), a path under a file, a
    folder this process cannot write in, one of the command's ``inputs`` (``(flag, path)`` pairs),
    or an existing file that is not what the command writes (``replaces``: its description and test).
    """
    if path is None:
        return
    path = Path(path)
    if not folder and path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name")
    if folder and path.is_file():
        raise UsageError(f"{option} {path} is a file; give a folder")
    if blocker := _file_in_the_way(path.parent):
        raise UsageError(f"{option} {path}: {blocker} is a file, not a folder")
    for flag, source in inputs:
        if source is not None and _same_path(path, Path(source)):
            raise UsageError(f"{option} {path} is also {flag}: writing it would destroy it; give another name")
    if replaces is not None and path.is_file() and path.stat().st_size > 0 and not replaces[1](path):
        raise UsageError(f"{option} {path} exists and is not {replaces[0]}; remove it or give another name")
    _require_writable(path if folder and path.is_dir() else path.parent, option, path)


def is_json_file(path: Path) -> bool:
    """Whether ``path`` holds a JSON document (an output of ``--json`` that may be replaced)."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return True


#: ``replaces`` of a ``--json`` output: an existing JSON document may be replaced, nothing else.
JSON_FILE: Replaceable = ("a JSON file", is_json_file)


def has_safetensors_metadata(key: str) -> Callable[[Path], bool]:
    """A test of whether a file is safetensors whose metadata has ``key`` (a dinocli output's kind)."""

    def test(path: Path) -> bool:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return key in (f.metadata() or {})
        except (SafetensorError, OSError, ValueError):
            return False

    return test


def _same_path(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _require_writable(folder: Path, option: str, path: Path) -> None:
    """A one-line error unless a file can be created in ``folder`` (or its nearest existing parent)."""
    existing = next((p for p in (folder, *folder.parents) if p.is_dir()), None)
    if existing is None:
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=".dinocli-write-check.", dir=existing)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write in {existing} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


class FolderLock:
    """An exclusive lock of ``folder`` (a ``.lock`` file in it, held with ``flock`` until
    :meth:`release` or the process ends, however it ends): two writers of one folder are refused."""

    def __init__(self, folder: str | Path, what: str) -> None:
        self.path = Path(folder) / ".lock"
        self._file = open(self.path, "a+")  # noqa: SIM115 - held open while locked
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "?"
            self._file.close()
            raise UsageError(
                f"{folder} is in use by another {what} (pid {holder}); wait for it to end or give another folder"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        """Unlock and remove the ``.lock`` file (one a killed process leaves holds no lock)."""
        self.path.unlink(missing_ok=True)
        self._file.close()


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
    try:
        yield tmp_path
        try:
            # after the block: mkstemp's 0600 would outlive the rename, and writers that recreate
            # the file (safetensors' save_file) drop a mode set before
            os.chmod(tmp_path, 0o666 & ~_umask())
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
