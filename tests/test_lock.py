"""One writer per output (common/runtime/lock.py): a real second process is refused with the holder named, a
lock left by a killed process does not block, the ranks of one job do not block each other."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import SegGenError
from common.runtime.lock import lock_path, output_lock

ROOT = Path(__file__).resolve().parents[1]

# A holder in its own process: locks OUT for RANK, says so, then waits until killed or told to go.
HOLDER = """
import sys
sys.path.insert(0, sys.argv[1])
from common.runtime.lock import output_lock
with output_lock(sys.argv[2], rank=int(sys.argv[3])):
    print("locked", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def holders():
    """spawn(SCRIPT, ARG...): a lock holder in its own process, started once it says "locked"; all killed at the end."""
    procs = []

    def spawn(script, *args):
        p = subprocess.Popen([sys.executable, "-c", script, str(ROOT), *map(str, args)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "locked"
        return p

    yield spawn
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


@pytest.fixture
def holder(holders):
    return lambda out, rank=0: holders(HOLDER, out, rank, "holder-marker")


def test_second_job_stops_at_once_naming_the_holder(tmp_path, holder):
    out = tmp_path / "synth"
    p = holder(out)
    info = json.loads(lock_path(out).read_text())
    assert info["pid"] == p.pid and info["host"] == socket.gethostname() and "holder-marker" in info["command"]
    with pytest.raises(SegGenError) as e:
        with output_lock(out, flag="--out"):
            pytest.fail("got a lock another process holds")
    msg = str(e.value)
    assert f"--out {out} is in use by another job: pid {p.pid} on {socket.gethostname()}, rank 0, started {info['started']}" in msg
    assert "holder-marker" in msg and "pass another --out" in msg
    p.stdin.write("done\n"), p.stdin.flush(), p.wait()  # the holder finishes: the output is free again
    with output_lock(out) as lock:
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid() == lock.info["pid"]
    assert lock_path(out).read_text() == ""  # released: the details go with it


def test_a_lock_left_by_a_killed_job_does_not_block(tmp_path, holder):
    out = tmp_path / "run"
    p = holder(out)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert json.loads(lock_path(out).read_text())["pid"] == p.pid  # its details are still in the file
    with output_lock(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()


def test_ranks_of_one_job_do_not_block_each_other_but_two_jobs_meet_at_rank_0(tmp_path, holder):
    out = tmp_path / "synth"
    p = holder(out, rank=1)
    with output_lock(out, rank=0):  # rank 0 of the same job
        pass
    with pytest.raises(SegGenError, match=rf"pid {p.pid} on .*, rank 1,"):
        with output_lock(out, rank=1):
            pass
    holder(out, rank=0)  # a one-process job (rank 0) on an output a launched job writes
    with pytest.raises(SegGenError, match=r"rank 0,"):
        with output_lock(out, rank=0):
            pass


def test_file_outputs_lock_beside_the_file_and_one_process_cannot_lock_twice(tmp_path):
    out = tmp_path / "captions" / "ade20k_val.jsonl"
    assert lock_path(out, file=True) == tmp_path / "captions" / ".ade20k_val.jsonl.lock.rank0"
    with output_lock(out, flag="--out", file=True):
        assert lock_path(out, file=True).is_file() and not out.exists()
        with pytest.raises(SegGenError, match=r"--out .*ade20k_val.jsonl is in use by another job: pid "):
            with output_lock(out, flag="--out", file=True):
                pass
    folder = tmp_path / "synth" / "imgsyn-coco.v2"  # a folder with a dot: the same lock before and after it exists
    with output_lock(folder):
        assert folder.is_dir()
        with pytest.raises(SegGenError, match=r"imgsyn-coco.v2 is in use"):
            with output_lock(folder):
                pass
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.raises(SegGenError, match=r"--out .*a_file/x: cannot create the lock file"):
        with output_lock(blocked / "x"):
            pass


FORKER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from common.runtime.lock import OutputLock
OutputLock(sys.argv[2]).acquire()
child = os.fork()
if child == 0:  # a forked worker: shares the lock, outlives its parent
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
os._exit(0)  # the parent ends without releasing
"""


def test_a_forked_child_that_outlives_the_holder_is_named(tmp_path):
    out = tmp_path / "synth"
    p = subprocess.Popen([sys.executable, "-c", FORKER, str(ROOT), str(out)], stdout=subprocess.PIPE, text=True)
    child = int(p.stdout.readline())  # (the child keeps the pipe open: read one line, not to the end)
    p.wait()
    try:
        with pytest.raises(SegGenError, match=r"has ended, but a process it forked still holds the lock"):
            with output_lock(out):
                pass
    finally:
        os.kill(child, signal.SIGKILL)
    for _ in range(100):  # the child is reaped by init; its lock goes with it
        try:
            with output_lock(out):
                break
        except SegGenError:
            time.sleep(0.05)
    else:
        pytest.fail("the lock outlived the child")


# ---------------------------------------------------------------- the tasks of one run (common/runtime/lock.py TaskLock)

TASK_HOLDER = """
import sys
sys.path.insert(0, sys.argv[1])
from common.runtime.lock import task_lock
with task_lock(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]):
    print("locked", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def task_holder(holders):
    return lambda out, index, count, stage="imgsyn": holders(TASK_HOLDER, out, index, count, stage)


def test_tasks_of_one_run_share_a_folder_and_a_second_run_is_refused(tmp_path, task_holder):
    from common.runtime.lock import task_lock

    out = tmp_path / "synth"
    first = task_holder(out, 0, 4)
    with task_lock(out, 1, 4, "imgsyn"):  # another task of the same run: side by side
        pass
    with pytest.raises(SegGenError, match=rf"in use by another job: pid {first.pid} .*rank 0"):  # the same task twice
        with task_lock(out, 0, 4, "imgsyn"):
            pass
    for index, count, stage in ((1, 3, "imgsyn"), (0, 1, "imgsyn"), (1, 4, "quality")):  # another N, another stage
        with pytest.raises(SegGenError, match=r"is being written by another run: imgsyn in 4 task\(s\) \(lock file .*\.lock\.imgsyn\.of4\)"):
            with task_lock(out, index, count, stage):
                pass
    first.kill(), first.wait()  # a killed task: the rerun at another N starts at once
    with task_lock(out, 2, 3, "imgsyn"):
        with pytest.raises(SegGenError, match=r"imgsyn in 3 task\(s\)"):
            with task_lock(out, 0, 4, "imgsyn"):
                pass


def test_a_filesystem_without_locks_says_what_to_do(tmp_path, monkeypatch):
    import errno
    import fcntl

    from common.runtime import lock as lock_module

    def no_flock(fd, mode):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(SegGenError) as e:
        with lock_module.task_lock(tmp_path / "o", 0, 2, "masksyn"):
            pass
    msg = str(e.value)
    assert "has no file locks (ENOSYS" in msg and "SEGGEN_LOCK=off" in msg and "-o flock" in msg and str(tmp_path / "o") in msg
    monkeypatch.setenv("SEGGEN_LOCK", "off")  # the user's choice: no lock, said once on stderr
    with lock_module.task_lock(tmp_path / "o", 0, 2, "masksyn"), output_lock(tmp_path / "p"):
        pass


def test_temporary_names_are_unique_across_hosts_and_stay_short():
    import re
    import socket

    from common.data.manifest import temporary_name

    a, b = temporary_name(Path("x") / "s.png"), temporary_name(Path("x") / "s.png")
    assert a != b and a.name.startswith(".s.tmp-") and a.suffix == ".png" and str(os.getpid()) in a.name
    assert re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:8] in a.name
    assert len(temporary_name(Path("é" * 100 + "_000.jpg")).name.encode()) < 255
