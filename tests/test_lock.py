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
def holder():
    procs = []

    def start(out, rank=0):
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(ROOT), str(out), str(rank), "holder-marker"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "locked"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


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
