"""File utilities with crash-safe semantics: atomic writes (temp file + fsync + rename), durable
appends of JSON lines, tolerant JSON-lines readers, inter-process locks and content hashes.

Every persistent write of fag_tvm (kernel cache, packages, tuning logs) goes through here, so an
interrupted process leaves either the old file or the new one, never a torn one."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o666) -> None:
    """Write `data` to `path` atomically (readers see the old or the new content, never a mix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        os.fchmod(fd, mode & ~_umask())  # mkstemp creates 0600; the result is an ordinary file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def atomic_output(path: str | os.PathLike, suffix: str = "") -> "contextlib.AbstractContextManager[str]":
    """A temp path in the destination's folder, renamed onto `path` when the block exits cleanly
    (for writers that need a file name, e.g. TVM's export_library)."""

    @contextlib.contextmanager
    def cm() -> Iterator[str]:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=p.stem + ".", suffix=suffix + ".tmp", dir=str(p.parent))
        os.close(fd)
        try:
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    return cm()


def append_json_line(path: str | os.PathLike, obj: dict) -> None:
    """Append one JSON line durably: a single write(2) (never interleaved with another line) + fsync."""
    line = (json.dumps(obj, sort_keys=True) + "\n").encode()
    fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def is_regular_file(path: str | os.PathLike) -> bool:
    """True for an existing regular file (not a FIFO, device, socket or folder): reading anything else
    may block forever or fail oddly."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_bytes_regular(path: str | os.PathLike, limit: int = 1 << 30) -> bytes | None:
    """The content of a regular file (None if missing, not a regular file, unreadable or > limit)."""
    if not is_regular_file(path):
        return None
    try:
        if os.path.getsize(path) > limit:
            return None
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def read_json_lines(path: str | os.PathLike) -> list[Any]:
    """Parsed lines of a JSON-lines file; torn or unparseable lines (a writer killed mid-append) skipped."""
    data = read_bytes_regular(path)
    out: list[Any] = []
    for raw in (data or b"").split(b"\n"):
        if raw.strip():
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
    return out


def read_json(path: str | os.PathLike) -> Any:
    """Parsed JSON of a regular file, or None (missing, not a regular file, unreadable, not JSON)."""
    data = read_bytes_regular(path)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, timeout: float = -1) -> Iterator[None]:
    """An inter-process exclusive lock on `path` (filelock). timeout < 0 waits forever; 0 fails at once
    with TimeoutError when another process holds it."""
    lock = FileLock(str(path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise TimeoutError(f"lock {path} is held by another process") from None
    try:
        yield
    finally:
        lock.release()
