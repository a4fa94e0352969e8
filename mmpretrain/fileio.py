"""Local files: the one atomic file (a reader, or a crash, sees the old file or the new one, never
half of one; written through storage.atomic_writer / storage.write_bytes, which also serve object
storage), the one atomic directory, JSON reading with one-line errors, and a full disk as one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mmpretrain.errors import UserError

RESUME_HINT = "free space and rerun the same command to resume"
# ENOSPC, and EDQUOT (a quota is a full disk to its user); libraries outside Python (safetensors'
# Rust writer) raise their own exception type whose text carries the OS error number.
_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = tuple(f"(os error {n})" for n in _FULL)


class DiskFull(UserError):
    """A write failed because the filesystem is full: one line naming the filesystem (its mount
    point), the file, and what to do. Raised ``from None``: the cause is the message."""

    def __init__(self, path: str | os.PathLike, hint: str = RESUME_HINT):
        self.path, self.hint = Path(path), hint
        super().__init__(f"no space left on {mount_point(path)} while writing {path}; {hint}")


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, DiskFull):
        return True
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return True
    return any(text in str(exc) for text in _FULL_TEXT)


def mount_point(path: str | os.PathLike) -> str:
    """The mount point of the filesystem `path` is (or would be) on."""
    here = Path(os.path.abspath(path))
    while not os.path.ismount(here) and here != here.parent:
        here = here.parent
    return str(here)


@contextmanager
def writing(path: str | os.PathLike, hint: str | None = None) -> Iterator[None]:
    """Turns a full disk inside the block into a DiskFull naming `path` (a DiskFull from a nested
    write keeps naming its own file; `hint` replaces what it tells the user to do); other errors pass."""
    try:
        yield
    except DiskFull as full:
        if hint is None or hint == full.hint:
            raise
        raise DiskFull(full.path, hint) from None
    except Exception as exc:
        if is_disk_full(exc):
            raise DiskFull(path, hint or RESUME_HINT) from None
        raise


class AtomicFile:
    """A binary file that becomes `path` on commit() (temp file in the same folder, fsync, rename);
    discard() removes the temp file and leaves `path` untouched. `file` is the open temp file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.tmp, self.file = Path(tmp), os.fdopen(fd, "wb")

    def write(self, data: bytes) -> int:
        return self.file.write(data)

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.chmod(self.tmp, 0o644)  # mkstemp creates 0600
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass  # closing flushes; on a full disk that fails again, and the file is dropped anyway
        self.tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """A temp directory beside `path` to fill; when the block ends without error it becomes `path`
    (an existing `path` is replaced only with `replace`, and removed only after the new one is in
    place). On error the temp directory is removed and `path` is untouched; a full disk is a DiskFull."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            yield tmp
            if path.exists() and not replace:
                raise FileExistsError(f"{path} exists")
            os.chmod(tmp, 0o755)  # mkdtemp creates 0700; a run folder or an export is shared
            old = None
            if path.exists():
                old = tmp.with_name(tmp.name[:-len(".tmp")] + ".old")
                path.rename(old)
            tmp.rename(path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in `path`; a missing or malformed file is a UserError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; the folder is incomplete") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
