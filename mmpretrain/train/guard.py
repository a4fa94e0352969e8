"""Who may write into a run folder: exactly one trainer, and only while its launcher lives.

- `hold_run_folder(run_dir, is_main)`: the main process takes `RUN/.lock` before anything reads or
  writes the folder; a second trainer on the same folder stops with one line naming the holder. The
  outcome is broadcast, so every process of a refused run ends (none waits in a collective).
- `exit_with_launcher()`: a process started by a launcher (torchrun, `accelerate launch`) ends
  within a second of the launcher's death, without writing anything more. torch elastic starts each
  rank as the launcher's direct child in a session of its own (`start_new_session=True` in
  torch/distributed/elastic/multiprocessing/subprocess_handler), so `kill -9 -- -PGID` of the
  launcher's group leaves the ranks running, orphaned, writing into the run folder.

The lock file holds `{"pid", "host", "started", "proc_start"}` (proc_start: the process's start time
in clock ticks since boot, Linux only, so a reused pid is not taken for the holder). A POSIX record
lock (fcntl.lockf) on it says whether the holder lives: the kernel drops it when the holder ends,
even by kill -9, and forked DataLoader workers do not inherit it. A lock file left by a process that
is gone (same host) is taken over with a note on stderr; one from another host cannot be checked
and is refused, telling the user to delete it if that run is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from mmpretrain import runtime
from mmpretrain.errors import UserError

LOCK_FILE = ".lock"
HOST = socket.gethostname()

# -- one writer per run folder ---------------------------------------------------------------------
_HELD: dict[str, RunLock] = {}  # realpath of the lock file -> this process's lock on it


class RunLock:
    """This process holds `RUN/.lock` until `release()`."""

    def __init__(self, path: Path, fd: int, info: dict[str, Any]):
        self.path, self.fd, self.info = path, fd, info

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        """The lock of `run_dir` (created if missing), or a UserError naming the process that holds it."""
        run_dir = Path(run_dir)
        path = run_dir / LOCK_FILE
        held = _HELD.get(os.path.realpath(path))
        if held is not None:  # record locks never conflict within one process: asked here instead
            raise UserError(in_use_message(run_dir, held.info))
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(path)
        try:
            holder = _read(fd)
            if holder is not None and (holder.get("host") != HOST or _alive(holder)):
                raise UserError(in_use_message(run_dir, holder))
            if holder is not None:
                print(f"note: {path} was left by pid {holder.get('pid')} on host {HOST} "
                      f"(since {holder.get('started')}), which is no longer running; taking the run folder over",
                      file=sys.stderr)
            info = {"pid": os.getpid(), "host": HOST, "started": datetime.now().astimezone().isoformat(timespec="seconds"),
                    "proc_start": _proc_stat(os.getpid())[1]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        lock = _HELD[os.path.realpath(path)] = cls(path, fd, info)
        return lock

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if _same_file(self.fd, self.path):
                self.path.unlink()  # before the close that drops the record lock
        finally:
            os.close(self.fd)
            self.fd = None
            _HELD.pop(os.path.realpath(self.path), None)


@contextlib.contextmanager
def hold_run_folder(run_dir: str | Path, is_main: bool) -> Iterator[None]:
    """Collective: the main process holds the run folder's lock for the block; when it cannot take
    it, every process raises (the main one its own error, the others a UserError with its text)."""
    lock, failure = None, None
    if is_main:
        try:
            lock = RunLock.acquire(run_dir)
        except Exception as e:  # noqa: BLE001 — re-raised below, after the other processes heard of it
            failure = e
    problem = runtime.broadcast_from_main(None if failure is None else str(failure) or type(failure).__name__)
    if failure is not None:
        raise failure
    if problem is not None:
        raise UserError(problem)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def in_use_message(run_dir: Path, holder: dict[str, Any] | None) -> str:
    what = "use another train.output_dir"
    if holder is None:  # locked, not yet written: the holder started a moment ago
        return f"run folder {run_dir} is in use by a trainer that is just starting; wait for it to end or {what}"
    who = f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}"
    if holder.get("host") == HOST:
        return f"run folder {run_dir} is in use by {who}; wait for it to end or {what}"
    return (f"run folder {run_dir} is in use by {who} (another host: whether it still runs cannot be checked from "
            f"here); wait for it to end or {what}, or delete {run_dir / LOCK_FILE} if that run is gone")


def _open_locked(path: Path) -> int:
    """A descriptor of `path` holding its record lock; UserError when a live process holds it."""
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                return fd  # a filesystem without record locks: the file's content alone decides
            holder = _read(fd)
            os.close(fd)
            raise UserError(in_use_message(path.parent, holder)) from None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # its holder removed it between our open and lock: lock the new file
    raise RuntimeError(f"{path}: replaced 5 times while taking it")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read(fd: int) -> dict[str, Any] | None:
    """The holder the lock file names; None when empty or cut short (its writer died mid-write)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"null")
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the process a same-host lock file names still runs (the check for filesystems without
    record locks, and for a pid that a dead holder shares with a living process)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():  # our pid: an earlier process (a restarted container)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    state, start = _proc_stat(pid)
    return state != "Z" and (start is None or holder.get("proc_start") in (None, start))


def _proc_stat(pid: int) -> tuple[str | None, int | None]:
    """(state, start time in clock ticks since boot) from /proc (Linux); (None, None) elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None, None
    return fields[0], int(fields[19])


# -- no orphans --------------------------------------------------------------------------------------
LAUNCHER_GONE_EXIT = 75  # EX_TEMPFAIL: nothing is wrong with the run; resume it
POLL_S = 0.2
# The parent-death signal: a real-time signal nobody else sends, so that its handler can ignore the
# spurious one Linux sends when the launcher's *thread* that started us ends while the launcher lives.
PDEATH_SIGNAL = signal.SIGRTMAX - 2 if hasattr(signal, "SIGRTMAX") else None
PR_SET_PDEATHSIG = 1

_PARENT_AT_IMPORT = os.getppid()  # as early as we can: a launcher that dies before this is not seen
_watching: list[int] = []
_stopping = threading.Lock()


def launched() -> bool:
    """Whether a launcher that waits on this process started it: torch elastic (torchrun,
    `accelerate launch --multi_gpu`, ...) or accelerate's one-process launcher."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_USE_CPU" in os.environ


def exit_with_launcher() -> None:
    """Under a launcher: end this process when the launcher dies. Otherwise nothing (a plain
    `mmpretrain train` under nohup must outlive its shell)."""
    if launched():
        watch_parent(_PARENT_AT_IMPORT)


def watch_parent(parent: int) -> None:
    """End this process (one line on stderr, exit code 75, nothing written) within about POLL_S of
    `parent`'s death. Linux: a parent-death signal (prctl) handled at once when the main thread runs
    Python. Everywhere (macOS; Linux while the main thread waits in C, e.g. in a collective): a
    thread comparing os.getppid() with `parent`, which changes when the parent dies (we are
    re-parented to init or a subreaper). Once per process."""
    if _watching:
        return
    _watching.append(parent)
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        _set_parent_death_signal(parent)
    if os.getppid() != parent:  # it died before we watched
        _launcher_gone(parent)
    threading.Thread(target=_poll_parent, args=(parent,), name="mmpretrain-launcher-watch", daemon=True).start()


def _set_parent_death_signal(parent: int) -> None:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return  # the watching thread alone

    def on_signal(*_):
        if os.getppid() != parent:  # else the launcher's thread that started us ended, not the launcher
            _launcher_gone(parent)

    signal.signal(PDEATH_SIGNAL, on_signal)
    if libc.prctl(PR_SET_PDEATHSIG, PDEATH_SIGNAL, 0, 0, 0) != 0:
        signal.signal(PDEATH_SIGNAL, signal.SIG_DFL)


def _poll_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    _launcher_gone(parent)


def _launcher_gone(parent: int) -> None:
    """One line on stderr and out: no exception handler, finally block or atexit hook runs, so nothing
    more reaches the run folder (checkpoints are renamed into place whole; a cut metrics line is
    skipped on reading). Raw writes: another thread may hold sys.stderr's lock."""
    with _stopping:  # the signal and the thread may both notice; the second waits for the end here
        threading.Timer(2.0, os._exit, (LAUNCHER_GONE_EXIT,)).start()  # a stuck stderr must not keep us
        rank = os.environ.get("RANK", "0")
        line = (f"mmpretrain train: error: rank {rank} (pid {os.getpid()}): the launcher (pid {parent}) is gone; "
                "stopping without writing more to the run folder (continue with train.resume=latest)\n")
        with contextlib.suppress(OSError):
            os.write(2, line.encode())
        for child in multiprocessing.active_children():  # DataLoader workers: else up to 5 s more (their own check)
            with contextlib.suppress(Exception):
                child.kill()
        os._exit(LAUNCHER_GONE_EXIT)
