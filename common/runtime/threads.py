"""Thread and worker counts that fit the machine a stage runs on (issue 17, item 9; bench/threads.py).

Why: torch's CPU kernels run on an OpenMP pool of one thread per core, and its OpenMP (GNU libgomp)
lets idle pool threads spin-wait before sleeping. On a machine that other jobs already load, every
parallel region of a small kernel then waits for a pool thread the OS has descheduled, while the
spinners burn the cores the others need: on 2 cores at load 5, a tiny trainer step took 8× longer with
torch's default 2 threads than with 1 (bench/threads.py). So:

- OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep at once. libgomp reads it when torch starts its
  pool, i.e. before `import torch`: set it in the shell (Makefile, reproduce.sh export it) or import
  this module first in a stage script; `configure()` sets it too when torch is not imported yet.
- torch threads = the cores this process may use (os.sched_getaffinity, not os.cpu_count: a cluster
  job or a container gets a share) ÷ the processes launched on this machine (LOCAL_WORLD_SIZE from
  accelerate/torchrun), and 1 when the machine is already busier than its cores (1-minute load average).
- DataLoader workers default to cores − 1, at most 4 (torch's default would start 4 on 2 cores and
  warn), and 0 on 1–2 cores, where a worker only competes with the step for a core.

Explicit settings win: OMP_NUM_THREADS / SEGGEN_THREADS in the environment, OMP_WAIT_POLICY, and a
stage's `--num-workers`.

    from common.runtime import threads   # first, before torch: OMP_WAIT_POLICY reaches the OpenMP pool
    plan = threads.configure()   # torch.set_num_threads(plan.threads)
    num_workers = plan.workers(args.num_workers)   # None: the default for this machine
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MAX_WORKERS = 4  # torch/accelerate examples' usual default; more rarely helps a single process
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede torch's OpenMP start; an explicit value wins


@dataclass(frozen=True)
class Plan:
    cores: int        # cores this process may run on
    processes: int    # processes launched on this machine (LOCAL_WORLD_SIZE)
    threads: int      # torch intra-op threads per process
    default_workers: int  # DataLoader workers when the user gave none

    def workers(self, requested: int | None) -> int:
        """DataLoader workers: the user's --num-workers when given, else the default for this machine."""
        return self.default_workers if requested is None else requested

    def workers_note(self, requested: int | None) -> str | None:
        """Our one line (in place of torch's DataLoader warning) when --num-workers asks for more workers
        than this process has cores; None otherwise."""
        if requested is None or requested <= self.cores // self.processes:
            return None
        return (f"--num-workers {requested}: more DataLoader workers than the {self.cores} core(s) this process may use; "
                f"they will compete with the training step (default here: {self.default_workers})")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; a container's or a scheduler's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def plan(cores: int | None = None, processes: int | None = None, load: float | None = None,
         env: dict | None = None) -> Plan:
    """The counts for a machine with `cores` usable cores, `processes` local processes of this run and a
    1-minute load average `load` taken before the run started (each read from this machine when None)."""
    env = os.environ if env is None else env
    cores = available_cores() if cores is None else max(1, cores)
    processes = max(1, int(env.get("LOCAL_WORLD_SIZE", 1)) if processes is None else processes)
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    share = max(1, cores // processes)
    explicit = env.get("SEGGEN_THREADS") or env.get("OMP_NUM_THREADS")
    if explicit:
        threads = max(1, int(explicit))
    elif load >= cores:  # others already fill the cores: one thread per process never waits on a sleeper
        threads = 1
    else:
        threads = share
    workers = 0 if share <= 2 else min(MAX_WORKERS, share - 1)
    return Plan(cores=cores, processes=processes, threads=threads, default_workers=workers)


def configure(processes: int | None = None) -> Plan:
    """Apply `plan()` to this process: torch's intra-op threads (and OMP_WAIT_POLICY=PASSIVE when torch is
    not imported yet). Call it at the start of a stage, before building models; returns the plan for
    `plan.workers(args.num_workers)`."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    chosen = plan(processes=processes)
    import torch

    if torch.get_num_threads() != chosen.threads:
        torch.set_num_threads(chosen.threads)
    return chosen

