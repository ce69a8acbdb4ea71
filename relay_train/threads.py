"""One CPU thread policy for every process of a run: torch's intra-op threads and OpenMP's, sized to the
CPUs the process was given.

Why: torch starts one intra-op thread per core it sees. Two Ray workers at 0.66 CPU each and a validation
actor on 2 cores would run 6 compute threads on 2 cores, and each step waits on the slowest thread
(bench/bench_threads.py: a step beside two busy processes ran 2.6x slower with torch's default than with one
thread). Ray's own OMP_NUM_THREADS default reaches only a process that has not yet started torch's pool.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def machine_cpus(cgroup_cpu_max: Path = CGROUP_CPU_MAX) -> float:
    """The CPUs this process may run on: its affinity mask, capped by a container's CPU quota."""
    cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, int(quota) / int(period))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit readable: the affinity mask is the bound
    return cpus


def thread_count(configured: int | None = None, given_cpus: float | None = None) -> int:
    """The policy: the `cpu_threads` key when set; else the CPUs a scheduler gave this process (Ray's num_cpus
    for a worker or actor); else OMP_NUM_THREADS when the user set it; else the machine's CPUs. A fraction
    rounds down, and never below 1 thread (0.66 CPU runs 1 thread)."""
    if configured is not None:
        return max(1, configured)
    if given_cpus is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        given_cpus = float(env) if env.isdigit() and int(env) > 0 else machine_cpus()
    return max(1, math.floor(given_cpus))


def size_threads(configured: int | None = None, given_cpus: float | None = None, who: str = "this process") -> int:
    """Apply thread_count to torch (intra-op, which sets OpenMP's too) and to OMP_NUM_THREADS for the
    processes this one starts; returns the count."""
    import torch

    threads = thread_count(configured, given_cpus)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    log.debug("%s: %d CPU thread(s) (given %s CPU(s))", who, threads, given_cpus if given_cpus is not None else "no")
    return threads
