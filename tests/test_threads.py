"""common/runtime/threads.py: thread and worker counts from the cores a process may use (no timing here: bench/threads.py)."""

import pytest

from common.runtime import threads


@pytest.mark.parametrize("cores, processes, load, want_threads, want_workers", [
    (2, 1, 0.5, 2, 0),    # this machine, idle: both cores, data in the main process
    (2, 1, 5.0, 1, 0),    # this machine beside other jobs: one thread (bench/threads.py)
    (1, 1, 0.0, 1, 0),
    (16, 1, 1.0, 16, 4),  # a workstation: workers capped at 4
    (16, 8, 1.0, 2, 0),   # 8 local processes (accelerate/torchrun) share 16 cores
    (16, 2, 1.0, 8, 4),
    (4, 1, 0.0, 4, 3),    # cores - 1 workers
    (4, 8, 0.0, 1, 0),    # more processes than cores: never 0 threads
])
def test_plan_fits_the_cores_processes_and_load(cores, processes, load, want_threads, want_workers):
    plan = threads.plan(cores=cores, processes=processes, load=load, env={})
    assert (plan.threads, plan.default_workers) == (want_threads, want_workers)


def test_processes_come_from_the_launcher_and_explicit_settings_win():
    assert threads.plan(cores=16, load=0, env={"LOCAL_WORLD_SIZE": "4"}).threads == 4
    assert threads.plan(cores=2, load=9, env={"OMP_NUM_THREADS": "2"}).threads == 2
    assert threads.plan(cores=16, load=0, env={"SEGGEN_THREADS": "3", "OMP_NUM_THREADS": "8"}).threads == 3
    plan = threads.plan(cores=2, load=0, env={})
    assert plan.workers(None) == 0 and plan.workers(4) == 4  # --num-workers given: the user's
    assert plan.workers_note(2) is None
    assert plan.workers_note(4) == ("--num-workers 4: more DataLoader workers than the 2 core(s) this process may use; "
                                    "they will compete with the training step (default here: 0)")


def test_available_cores_is_the_affinity_not_the_machine(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 64)
    assert threads.available_cores() == 3
    assert threads.plan(load=0, env={}).cores == 3


def test_configure_sets_torch_threads_and_the_wait_policy(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("SEGGEN_THREADS", "1")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    try:
        plan = threads.configure()
        assert plan.threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
        assert threads.os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # for the processes it starts (workers, launchers)
