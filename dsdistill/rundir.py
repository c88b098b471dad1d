"""The run directory's own files: written without following links, one training at a time, and checked.

- Links: a run directory may itself be a link (runs/ on a scratch disk), but inside it dsdistill writes,
  replaces and deletes only its own files. A symbolic link where one of them is expected (`metrics.jsonl`,
  `config.yaml`, `checkpoints/`, a `stepN`, a temp file) is refused in one line naming it, and nothing is
  ever written or deleted through one (`O_NOFOLLOW`, `O_EXCL` temp files, `os.replace` of the link itself).
- Lock: rank 0 holds an exclusive `flock` on `RUN_DIR/.lock` for the whole run. The kernel drops it when
  the process ends, however it ends, so a dead run never leaves a stale lock; the file names the holder
  (pid, host, start) for the message a second training gets.
- Checksums: every file of a checkpoint is hashed (SHA-256) into its `checksums.json` before the
  checkpoint is published; resume and export verify them first and name the first damaged file.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from dsdistill.errors import DistillError

LOCK_FILE = ".lock"
CHECKSUMS = "checksums.json"


class RunDirError(DistillError):
    """A run directory holds something dsdistill will not write through, or another run is using it."""


def refuse_link(path: Path, *, field: str = "output.run_dir") -> None:
    """A one-line error when `path` is a symbolic link (dsdistill never writes or deletes through one)."""
    if os.path.islink(path):
        raise RunDirError(
            f"{field}: '{path}' is a symbolic link; dsdistill writes and deletes only its own files in a run "
            "directory, never through a link; remove the link (or use another output.run_dir)"
        )


def ensure_dir(path: Path, *, field: str = "output.run_dir") -> None:
    """`path` as a real directory (created if missing), not a link to one."""
    refuse_link(path, field=field)
    path.mkdir(parents=True, exist_ok=True)
    refuse_link(path, field=field)  # nothing swapped one in between


def write_atomic(path: Path, data: bytes, *, field: str = "output.run_dir") -> None:
    """`path` replaced by `data` whole or not at all: an exclusive, no-follow temp file, synced, then
    renamed over `path` (a rename replaces a link itself, never its target)."""
    refuse_link(path, field=field)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    if os.path.lexists(tmp):
        os.unlink(tmp)  # a leftover of a dead process with this pid: unlink removes a link, not its target
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def open_append(path: Path, *, field: str = "output.run_dir"):
    """A text file opened for appending, refused if it is a link (created if missing)."""
    refuse_link(path, field=field)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_link(path, field=field)  # swapped for a link just now
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


class RunLock:
    """Rank 0's exclusive hold on a run directory (see the module docstring)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        ensure_dir(self.path.parent)
        refuse_link(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise RunDirError(
                f"output.run_dir: '{self.path.parent}' is in use by another training ({holder}); wait for it to "
                "end, or choose another output.run_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f"pid {int(info['pid'])} on {str(info['host'])[:64]}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid and host unreadable"


def write_failure(err: BaseException, where: Path) -> str:
    """Why a write under `where` failed, in words: a full disk or quota says so with the space left (torch's
    own "enforce fail at inline_container.cc" is how a full disk looks from inside torch.save)."""
    import shutil

    from dsdistill.errors import first_sentence

    try:
        free = shutil.disk_usage(next(p for p in (where, *where.parents) if p.exists())).free
    except (OSError, StopIteration):
        free = None
    full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    looks_full = "inline_container" in str(err) or "PytorchStreamWriter" in str(err)
    if full or (looks_full and free is not None and free < (64 << 20)):
        left = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
        return f"no space left on the file system of '{where}' ({left})"
    return first_sentence(err)


# ---------------------------------------------------------------------------------------------- checksums


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)  # hashlib releases the GIL: the files hash in parallel threads
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> list[str]:
    """Each file's SHA-256, hashed in parallel threads (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256_file, paths))


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and not p.is_symlink() and p.name != CHECKSUMS)


def record_checksums(directory: Path) -> None:
    """Write `directory/checksums.json`: the SHA-256 and size of every file in it."""
    files = _files(directory)
    digests = sha256_files(files)
    table = {str(p.relative_to(directory)): {"sha256": d, "bytes": p.stat().st_size} for p, d in zip(files, digests)}
    write_atomic(directory / CHECKSUMS, json.dumps(table, indent=1, sort_keys=True).encode(), field="checkpoint")


def damaged_file(directory: Path) -> Optional[str]:
    """None if every file `checksums.json` lists is present and unchanged (or the checkpoint predates
    checksums); else the first that is missing, truncated or changed, and how."""
    listing = directory / CHECKSUMS
    if not listing.is_file():
        return None
    try:
        table = json.loads(listing.read_text(encoding="utf-8"))
        entries = [(directory / name, str(v["sha256"]), int(v["bytes"])) for name, v in sorted(table.items())]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"'{listing}' is unreadable"
    for path, _, size in entries:
        if os.path.islink(path) or not path.is_file():
            return f"'{path}' is missing"
        if path.stat().st_size != size:
            return f"'{path}' has {path.stat().st_size} bytes, {size} at save"
    digests = sha256_files([p for p, _, _ in entries])
    for (path, want, _), got in zip(entries, digests):
        if got != want:
            return f"'{path}' does not match the checksum recorded at save"
    return None
