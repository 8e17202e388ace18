"""The output folders of ``prosg train|eval|demo|pretrain``: one run per folder.

* A file is replaced atomically (:func:`atomic_write`): a reader, or a run killed
  mid-write, sees the old file or the new one, never a mix.
* A folder is used by one process at a time (:func:`locked`): an exclusive,
  non-blocking ``flock`` on :data:`LOCK_FILE` inside it, held for the whole run, so a
  second run on the same folder fails at once instead of interleaving its files.
* What a finished run wrote is not replaced unless asked (:func:`refuse_existing`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

LOCK_FILE = ".prosg.lock"


class OutputInUse(RuntimeError):
    """Another process holds the output folder's lock."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` on a temporary sibling of ``path``, flushed to disk, then renamed
    over ``path``; on any failure ``path`` is left as it was and the temporary removed."""
    path = Path(path)
    # the suffix stays last: writers such as matplotlib pick the format by it
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # else a crash right after the rename can leave an empty file behind it
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def refuse_existing(directory: str | Path, names: Iterable[str], what: str, hint: str = "--overwrite") -> None:
    """FileExistsError naming ``directory`` and the ``names`` in it that already exist."""
    directory = Path(directory)
    present = [n for n in names if (directory / n).exists()]
    if present:
        raise FileExistsError(f"{directory} already holds {what} ({', '.join(present)}); pass {hint} "
                              "or choose another --out")


@contextlib.contextmanager
def locked(directory: str | Path) -> Iterator[Path]:
    """Holds ``directory`` (created if missing) for this process until the block ends;
    :class:`OutputInUse` (naming the folder and the holder's pid) if another holds it.

    The lock file is never removed: unlinking it would let a process that opened the old
    file and one that creates a new one both hold "the" lock."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"--out {directory} exists and is not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield directory
        return
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise OutputInUse(f"{directory} is in use by prosg {who} (lock {directory / LOCK_FILE}); wait for "
                              "it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield directory
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock
