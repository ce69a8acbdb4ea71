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


def _train_rank(rank: int, world: int, port: int, config_path: str, out: str, options: dict) -> None:
    """One rank of `train_ranks`: build_trainer as a Ray worker does (resuming from the newest checkpoint
    in output_dir), fit, then rank 0 saves what the tests compare."""
    import os

    import torch
    import torch.distributed as dist

    from relay_train.config import load_config
    from relay_train.parallel import BucketedAllReduce, GradientSync
    from relay_train.trainer import Hooks, build_trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        stop_at, sync = options["stop_at"], options["sync"]
        trainer = build_trainer(
            load_config(config_path),
            hooks=Hooks(should_stop=(lambda step: step == stop_at) if stop_at else None),
            device=torch.device("cpu"),
            rank=rank,
            world_size=world,
            strategy=options["strategy"],
            global_workers=options["global_workers"],
            **({"gradient_sync": GradientSync(**sync)} if sync is not None else {}),
        )
        started = trainer.step
        result = trainer.fit()
        optimizer = trainer.update.consolidated_state_dict()  # every rank: ZeRO-2 gathers the slices
        reducer = getattr(trainer.update, "reducer", None)
        if rank == 0:
            torch.save(
                {
                    "started": started,
                    "step": result.step,
                    "adapter": trainer.adapter_tensors(),
                    "ema": trainer.ema.state_dict(),
                    "optimizer": optimizer,
                    "scheduler": trainer.scheduler.state_dict(),
                    "generator": trainer.generator.get_state(),
                    "last_checkpoint": str(result.last_checkpoint),
                    "buckets": len(reducer.buckets) if isinstance(reducer, BucketedAllReduce) else 0,
                },
                out,
            )
    finally:
        dist.destroy_process_group()


def train_ranks(
    config_path,
    out,
    port: int,
    world: int = 2,
    *,
    strategy: str = "ddp",
    stop_at: int = 0,
    global_workers: int = 2,
    sync: dict | None = None,
) -> dict:
    """The trainer on `world` gloo ranks, without Ray (a few seconds, where a Ray launch takes ~20): the
    global batch is sized for `global_workers`, as an elastic run keeps it. A Ray run of the same config on
    as many 1-CPU workers ends with the same bits (one CPU thread per rank in both). `sync`: GradientSync's
    options. Returns rank 0's adapter, EMA, optimizer, scheduler and generator state, and its steps."""
    import torch

    options = {"strategy": strategy, "stop_at": stop_at, "global_workers": global_workers, "sync": sync}
    run_ranks(_train_rank, (world, port, str(config_path), str(out), options), nprocs=world)
    return torch.load(out, weights_only=True)
