"""Small file helpers: atomic writes, so a crash never leaves a half-written file behind.

The pattern everywhere: write to a temp name in the same folder, fsync, then `os.replace` (and fsync
the folder, so the rename is durable too). For whole folders (checkpoints, token shards, fetched
sources) build `NAME.tmp-XXXX/`, fsync every file in it, and rename it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give a file the mode a plain open() would (0666 minus the umask); for writers that make 0600
    files, such as safetensors' save_file."""
    os.chmod(path, 0o666 & ~_umask())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would honour the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself survives a power loss


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temp folder beside `final`; on success it replaces `final`, on error it is removed.

    >>> with atomic_dir("out/step-100") as tmp:   # write files into tmp
    ...     (tmp / "a.txt").write_text("x")        # out/step-100/ appears only now, complete
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
        _fsync_tree(tmp)  # contents on disk before the name: never a complete-looking folder of empty files
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a plain mkdir would honour the umask
        if final.exists():
            old = _aside(final)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)  # the second rename failed (disk full, Ctrl-C): the old one back
                raise
            _drop(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)


@contextmanager
def replacing(path: str | Path, keep_failed: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """Rebuild the folder `path` in place, with the old one kept until the new one is complete.

    A non-empty `path` is first renamed aside to `.NAME.old-PID`; on success that copy is deleted. On any
    error (Ctrl-C too) what the body made is removed and `path` is back as it was (the old folder, an
    empty one, or none), unless `keep_failed()` says what it made is worth keeping: then the old folder
    goes, as on success. An aside left by a process killed outright is never deleted: a note names it.
    """
    from lmforge.errors import ConfigError

    path = Path(os.path.abspath(path))
    existed = path.exists()
    moved = existed and not (path.is_dir() and not any(path.iterdir()))  # an empty folder just stays
    here = Path.cwd()
    if moved and (here == path.resolve() or path.resolve() in here.parents):  # we would work in the old one
        raise ConfigError(f"{path} holds the current folder, so it cannot be replaced; run from outside it")
    old = _aside(path)
    if moved:
        os.replace(path, old)
    try:
        yield
    except BaseException:
        if keep_failed():
            if moved:
                _remove(old)
            raise
        if existed and not moved:
            for p in path.iterdir() if path.is_dir() else ():
                _remove(p)
        else:
            _remove(path)
        if moved:
            os.replace(old, path)
        raise
    if moved:
        _drop(old)


def _drop(old: Path) -> None:
    """Delete an aside copy once the new contents are in place; a Ctrl-C midway still finishes it (a
    half-deleted copy left behind would look like the earlier contents a killed run could not put back)."""
    try:
        _remove(old)
    except BaseException:
        _remove(old)
        raise


def _aside(path: Path) -> Path:
    """A free name `.NAME.old-PID` beside `path` to move its old contents to while the new ones are made
    (after a note on any such copy a killed process left, which is kept, also when its pid is ours now)."""
    _note_stale_asides(path)
    old, n = path.with_name(f".{path.name}.old-{os.getpid()}"), 0
    while old.exists() or old.is_symlink():
        n += 1
        old = path.with_name(f".{path.name}.old-{os.getpid()}-{n}")
    return old


def _note_stale_asides(path: Path) -> None:
    """Say so (stderr) when a process killed outright (SIGKILL, power loss) while replacing `path` left
    the old contents aside: nothing could put them back then, and nothing deletes them now."""
    for aside in sorted(path.parent.glob(f".{glob.escape(path.name)}.old-*")):
        pid = re.fullmatch(r"(\d+)(-\d+)?", aside.name[len(path.name) + 6:])
        if pid and (int(pid[1]) == os.getpid() or not _alive(int(pid[1]))):
            print(f"note: {aside} holds what {path} held before a run (pid {pid[1]}) that was killed while "
                  f"replacing it; if {path} is missing or incomplete move it back over it, else delete it",
                  file=sys.stderr)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # there os.kill(pid, 0) would terminate the process: assume it lives
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (new names, renames); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
