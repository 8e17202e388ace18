"""JSON Lines reading and writing: errors that name the line, writes that never lose data."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


class JSONLError(ValueError):
    """A malformed or invalid line of a JSONL file; the message starts with ``path:line:``."""

    def __init__(self, path: str | os.PathLike, lineno: int, message: str) -> None:
        self.path = str(path)
        self.lineno = lineno
        self.reason = message
        super().__init__(f"{self.path}:{lineno}: {message}")


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line (1-based numbers).

    Raises :class:`JSONLError` naming the line on invalid UTF-8, invalid JSON, or a value
    that is not a JSON object (every record of this package is an object). Blank lines
    are skipped, so a trailing newline or an empty file is fine.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise JSONLError(path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise JSONLError(path, lineno, f"invalid JSON: {e.msg} at column {e.colno}") from None
            if not isinstance(value, dict):
                raise JSONLError(path, lineno, f"expected a JSON object, got {type(value).__name__}")
            yield lineno, value


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write one compact JSON object per line to ``path``; returns the number of records.

    The file is written to a temporary file in the same directory, fsynced and renamed
    over ``path`` (atomic on POSIX), so an existing file is either fully replaced or left
    untouched, even when serialising a record fails half-way or the process dies.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"write_jsonl: directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                if not isinstance(record, dict):
                    raise TypeError(f"write_jsonl: record {count} must be a dict, got {type(record).__name__}")
                # allow_nan=False: NaN/Infinity are not JSON and other readers reject them.
                f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the mode a plain open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return count
