"""One writer per output (issue 16 item 2): an exclusive lock a job holds on its output for as long as
it writes there. Take it before any work; a second job on the same output stops at once:

    with output_lock(out, rank=accelerator.process_index, flag="--out"):  # SegGenError if another job holds it

The lock is `fcntl.flock` on a small file in the output folder, `OUT/.lock.rank{N}` (for an output file,
file=True, `.NAME.lock.rank{N}` beside it). Each process of an `accelerate launch` job locks its own
rank's file, so the ranks of one job do not block each other, and any two jobs on one output meet at
rank 0 (a one-process run is rank 0). The holder writes its pid, host, command and start time into the
file, and the refusal names them.

Generation stages run as independent scheduler tasks (common/runtime/shard.py) take `task_lock` instead:
task I of N of a stage holds `.lock.rank{I}` exclusively (a task launched twice is refused) and
`.lock.{stage}.of{N}` shared (the tasks of one run hold it together), and before it starts it checks that
no other `.lock.*.of*` file is held: a run with another N or of another stage on the same folder is
refused, while the tasks of one run never block each other (see `TaskLock`).

The kernel releases a flock when the process that holds it ends, however it ends (kill -9 included),
so a lock left by a killed job never blocks a rerun; the file stays and is reused. A child forked
without exec (a DataLoader worker) shares the lock until it exits; children started with exec do not
(Python opens files non-inheritable). On NFS, Linux maps flock to POSIX byte-range locks, which
the server arbitrates between machines.

Where the filesystem has no locks (`flock` fails with ENOSYS / EOPNOTSUPP / ENOLCK: a Lustre mount without
-o flock, NFS without lockd), the error says so and what to do; SEGGEN_LOCK=off runs without any lock (a
warning says what is then unguarded). A lock held by a machine that crashed can outlive it on a network
filesystem: the refusal names the lock file, whose removal frees the output (a new file is a new lock).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
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
        self.info: dict = {}

    def acquire(self) -> OutputLock:
        if locks_off():
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a file where the folder should be, a read-only place
            raise SegGenError(f"{self.flag} {self.out}: cannot create the lock file {self.path} ({e.strerror}); "
                              f"choose a writable {self.flag}") from e
        try:
            _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, self.path, self.flag, self.out)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise SegGenError(f"{self.flag} {self.out} is in use by another job: {_describe(holder, self.path)}. Wait for it to "
                              f"finish or stop it, or pass another {self.flag} (lock file {self.path})") from None
        except BaseException:
            os.close(fd)
            raise
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


def _describe(holder: dict | None, path: Path | None = None) -> str:
    if not isinstance(holder, dict):
        return "its details are not in the lock file yet"
    pid, host = holder.get("pid"), holder.get("host")
    text = f"pid {pid} on {host}, rank {holder.get('rank')}, started {holder.get('started')}: {holder.get('command')}"
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        text += f" (pid {pid} has ended, but a process it forked still holds the lock: stop that one)"
    elif host != socket.gethostname() and path is not None:
        text += f" (if {host} crashed, its lock can outlive it on a network filesystem: remove {path} and rerun)"
    return text


NO_LOCKS = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP))
_warned_off = False


def locks_off() -> bool:
    """SEGGEN_LOCK=off (or 0/no/false): run without output locks, for filesystems that have none. Says once
    what is then unguarded."""
    global _warned_off
    off = os.environ.get("SEGGEN_LOCK", "").strip().lower() in ("off", "0", "no", "false")
    if off and not _warned_off:
        _warned_off = True
        print("warning: SEGGEN_LOCK=off: outputs are not locked; nothing stops a second job from writing the same output "
              "folder (make sure one job, or one array of tasks, writes each folder)", file=sys.stderr)
    return off


def _flock(fd: int, mode: int, path: Path, flag: str, out: Path) -> None:
    """fcntl.flock, with a filesystem without locks (ENOSYS, EOPNOTSUPP, ENOLCK) said as what to do."""
    try:
        fcntl.flock(fd, mode)
    except BlockingIOError:
        raise
    except OSError as e:
        if e.errno in NO_LOCKS:
            raise SegGenError(
                f"{flag} {out}: the filesystem of {path} has no file locks ({errno.errorcode.get(e.errno, e.errno)}: {e.strerror}). "
                f"Put {flag} on a filesystem with locks (a local disk; NFS with lockd; Lustre mounted with -o flock), or set "
                f"SEGGEN_LOCK=off to run without the lock (then nothing stops two jobs from writing {out} at once: run one job "
                f"or one task array per output yourself)") from e
        raise SegGenError(f"{flag} {out}: cannot lock {path} ({e.strerror}); put the output on a filesystem with file locks, "
                          f"or set SEGGEN_LOCK=off") from e


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- the tasks of one run (issue 26 item 1)

def group_lock_path(out: str | Path, stage: str, count: int, file: bool = False) -> Path:
    """The lock file every task of one run (stage, N tasks) holds shared."""
    out = Path(out)
    return out.parent / f".{out.name}.lock.{stage}.of{count}" if file else out / f".lock.{stage}.of{count}"


class TaskLock:
    """Task I of N of a stage on one output. Three steps, each with flock:

    1. `.lock.{stage}.of{N}` shared: the tasks of this run hold it together (no task blocks another).
    2. every other `.lock.*.of*` beside it probed exclusively without waiting: one that cannot be taken is
       held by a live run with another N or of another stage, and this task is refused (naming it). Step 1
       comes first, so of two runs starting at once at least one sees the other (both may be refused:
       never both admitted).
    3. `.lock.rank{I}` exclusive (`OutputLock`): the same task launched twice is refused, naming the holder.

    A task killed in any way releases all (the kernel drops flocks with the process), so its rerun, or a
    rerun at another N once every task of this one has ended, starts at once."""

    def __init__(self, out: str | Path, index: int, count: int, stage: str, flag: str = "--out", file: bool = False):
        self.out, self.index, self.count, self.stage, self.flag, self.file = Path(out), index, count, stage, flag, file
        self.group = group_lock_path(out, stage, count, file)
        self._fd: int | None = None
        self.rank = OutputLock(out, index, flag, file)

    def acquire(self) -> TaskLock:
        if locks_off():
            return self
        try:
            self.group.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.group, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SegGenError(f"{self.flag} {self.out}: cannot create the lock file {self.group} ({e.strerror}); "
                              f"choose a writable {self.flag}") from e
        try:
            self._shared(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        try:
            self._refuse_other_runs()
            self.rank.acquire()
        except BaseException:
            self.release()
            raise
        return self

    def _shared(self, fd: int, wait: float = 5.0) -> None:
        deadline = time.monotonic() + wait  # another run's probe (step 2) holds it exclusively for an instant
        while True:
            try:
                return _flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, self.group, self.flag, self.out)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SegGenError(f"{self.flag} {self.out}: {self.group} stays locked exclusively by another process; "
                                      f"if no job uses {self.out}, remove {self.group} and rerun") from None
                time.sleep(0.05)

    def _refuse_other_runs(self) -> None:
        pattern = f".{self.out.name}.lock.*.of*" if self.file else ".lock.*.of*"
        for other in sorted(self.group.parent.glob(pattern)):
            if other.name == self.group.name or not re.search(r"\.of\d+$", other.name):
                continue
            try:
                fd = os.open(other, os.O_RDONLY)
            except OSError:  # gone meanwhile
                continue
            try:
                _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, other, self.flag, self.out)
            except BlockingIOError:
                stage, _, n = other.name.rpartition(".lock.")[2].rpartition(".of")
                raise SegGenError(
                    f"{self.flag} {self.out} is being written by another run: {stage} in {n} task(s) (lock file {other}), and "
                    f"this is {self.stage} task {self.index} of {self.count}. The tasks of one run (one stage, one N) share a "
                    f"folder; another run may start once all of that run's tasks have ended (wait, or pass another "
                    f"{self.flag}). If they have ended and their machines crashed, remove {other} and rerun") from None
            finally:
                os.close(fd)  # an exclusive probe that succeeded is released with the descriptor

    def release(self) -> None:
        self.rank.release()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TaskLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def task_lock(out: str | Path, index: int, count: int, stage: str, flag: str = "--out", file: bool = False):
    """Hold TaskLock(out, index, count, stage) while the block runs; SegGenError if another run or the same
    task elsewhere has the output."""
    with TaskLock(out, index, count, stage, flag, file) as lock:
        yield lock
