"""One writer per output (issue 16 item 2): an exclusive lock a job holds on its output for as long as
it writes there. Take it before any work; a second job on the same output stops at once:

    with output_lock(out, rank=accelerator.process_index, flag="--out"):  # SegGenError if another job holds it

The lock is `fcntl.flock` on a small file in the output folder, `OUT/.lock.rank{N}` (for an output file,
file=True, `.NAME.lock.rank{N}` beside it). Each process of an `accelerate launch` job locks its own
rank's file, so the ranks of one job do not block each other, and any two jobs on one output meet at
rank 0 (a one-process run is rank 0). The holder writes its pid, host, command and start time into the
file, and the refusal names them.

The kernel releases a flock when the process that holds it ends, however it ends (kill -9 included),
so a lock left by a killed job never blocks a rerun; the file stays and is reused. A child forked
without exec (a DataLoader worker) shares the lock until it exits; children started with exec do not
(Python opens files non-inheritable). On NFS, Linux maps flock to POSIX byte-range locks, which
the server arbitrates between machines.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from common import SegGenError


def lock_path(out: str | Path, rank: int = 0, file: bool = False) -> Path:
    """The lock file of an output: inside the output folder, or beside an output file (file=True). Said
    by the caller, not guessed from the disk: a folder that does not exist yet must get the same lock
    as once it does."""
    out = Path(out)
    return out.parent / f".{out.name}.lock.rank{rank}" if file else out / f".lock.rank{rank}"


class OutputLock:
    """An exclusive lock on one output for one rank (see the module doc); `acquire` / `release`, or use
    `output_lock` as a context manager."""

    def __init__(self, out: str | Path, rank: int = 0, flag: str = "--out", file: bool = False):
        self.out, self.rank, self.flag = Path(out), rank, flag
        self.path = lock_path(self.out, rank, file)
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a file where the folder should be, a read-only place
            raise SegGenError(f"{self.flag} {self.out}: cannot create the lock file {self.path} ({e.strerror}); "
                              f"choose a writable {self.flag}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise SegGenError(f"{self.flag} {self.out} is in use by another job: {_describe(holder)}. Wait for it to "
                              f"finish or stop it, or pass another {self.flag} (lock file {self.path})") from None
        except OSError as e:  # a filesystem without locks
            os.close(fd)
            raise SegGenError(f"{self.flag} {self.out}: cannot lock {self.path} ({e.strerror}); put the output on a "
                              f"filesystem with file locks") from e
        info = {"pid": os.getpid(), "host": socket.gethostname(), "rank": self.rank,
                "command": shlex.join([sys.executable, *sys.argv]),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd, self.info = fd, info
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # the holder's details go with the lock (the file stays: see module doc)
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def output_lock(out: str | Path, rank: int = 0, flag: str = "--out", file: bool = False):
    """Hold the lock on the output folder `out` (an output file with file=True) for rank `rank` while the
    block runs; SegGenError naming the holder if another job has it."""
    with OutputLock(out, rank, flag, file) as lock:
        yield lock


def _read_holder(fd: int, wait: float = 1.0) -> dict | None:
    """The holder's details; it writes them just after it locks, so an empty file is read again briefly."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return json.loads(os.pread(fd, 65536, 0))
        except ValueError:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)


def _describe(holder: dict | None) -> str:
    if not isinstance(holder, dict):
        return "its details are not in the lock file yet"
    pid, host = holder.get("pid"), holder.get("host")
    text = f"pid {pid} on {host}, rank {holder.get('rank')}, started {holder.get('started')}: {holder.get('command')}"
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        text += f" (pid {pid} has ended, but a process it forked still holds the lock: stop that one)"
    return text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
