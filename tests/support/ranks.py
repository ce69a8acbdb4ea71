"""Start torch.distributed ranks for a test from one forkserver.

spawn starts every rank as a new interpreter that imports torch, diffusers and the trainer again (10-20 s
a rank on 2 loaded cores). A forkserver imports them once for the session and forks each rank from that
process, which never ran torch's thread pool, so the fork is safe. Its children see the environment and
working directory of the moment the server started: a rank sets what it needs itself (MASTER_ADDR, ...).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.multiprocessing as mp

PRELOAD = ["torch", "torch.distributed", "relay_train.parallel", "relay_train.trainer", "relay_train.config"]


def run_ranks(fn: Callable, args: tuple, nprocs: int) -> None:
    """fn(rank, *args) in `nprocs` processes; raises if any rank fails (as mp.spawn does)."""
    mp.set_forkserver_preload([*PRELOAD, fn.__module__])  # read once, when the server starts
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")
