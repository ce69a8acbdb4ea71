"""The deepspeed strategy (ZeRO-2 over the adapter's optimizer state) on the CPU: 2 processes over gloo.

Spawned processes run the same `build_trainer` the Ray worker runs; the Ray path itself is covered by
the slow test at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from relay_train import checkpoint as ckpt
from relay_train.config import ConfigError
from state_equal import assert_tree_equal  # tests/ is on sys.path (conftest rootdir)
from support.ranks import run_ranks  # tests/support/

STEPS, STOP = 6, 3
RECIPE = dict(
    max_train_steps=STEPS,
    checkpointing_steps=100,
    lr_warmup_steps=2,
    ema_update_interval=2,
    train_batch_size=2,
    gradient_accumulation_steps=2,
    optimizer="adamw",
    caption_dropout_probability=0.1,
)


def _rank_main(
    rank: int, world: int, port: int, config_path: str, strategy: str, stop_at: int, out: str, global_workers: int
) -> None:
    """One rank: train (resuming from the latest checkpoint in output_dir), then rank 0 saves the state."""
    import torch.distributed as dist

    from relay_train.config import load_config
    from relay_train.trainer import Hooks, build_trainer

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        hooks = Hooks(should_stop=(lambda step: step == stop_at) if stop_at else None)
        trainer = build_trainer(
            load_config(config_path),
            hooks=hooks,
            device=torch.device("cpu"),
            rank=rank,
            world_size=world,
            strategy=strategy,
            global_workers=global_workers,
        )
        started = trainer.step
        result = trainer.fit()
        optimizer = trainer.update.consolidated_state_dict()  # every rank: ZeRO-2 gathers the slices
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
                },
                out,
            )
    finally:
        dist.destroy_process_group()


def _run(config_path: Path, strategy: str, out: Path, free_port, stop_at: int = 0, world: int = 2) -> dict:
    """`world` ranks; the global batch is always sized for 2 (as an elastic run keeps it)."""
    run_ranks(_rank_main, (world, free_port(), str(config_path), strategy, stop_at, str(out), 2), nprocs=world)
    return torch.load(out, weights_only=True)


def _fill_caches(config_path: Path) -> None:
    """Encode the caches once here, so the spawned ranks only read them (as the Ray worker's rank 0 does)."""
    from relay_train.config import load_config
    from relay_train.data.plan import plan_dataset
    from relay_train.model import resolve_model_path
    from relay_train.data.encode import build_missing

    config = load_config(config_path)
    model_path = resolve_model_path(config.pretrained_model_name_or_path)
    plan = plan_dataset(config, model_path)
    if not plan.complete:
        build_missing(plan, model_path, torch.device("cpu"), torch.float32)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_zero2_resumes_bitwise_and_agrees_with_ddp(config_file, tmp_path, free_port):
    """2 ranks: stopped at STOP and resumed == straight (bitwise), checkpoint files as ddp's, and the
    adapter within float tolerance of the ddp strategy's after the same steps."""
    paths = {name: config_file(out=name, **RECIPE) for name in ("straight", "halves", "ddp")}
    _fill_caches(paths["straight"])

    straight = _run(paths["straight"], "deepspeed", tmp_path / "straight.pt", free_port)
    first = _run(paths["halves"], "deepspeed", tmp_path / "first.pt", free_port, stop_at=STOP)
    assert first["step"] == STOP and first["last_checkpoint"].endswith(f"checkpoint-{STOP}")
    resumed = _run(paths["halves"], "deepspeed", tmp_path / "resumed.pt", free_port)
    assert resumed["started"] == STOP and resumed["step"] == STEPS

    for key in ("adapter", "ema", "optimizer", "scheduler"):
        assert_tree_equal(straight[key], resumed[key], key)
    assert torch.equal(straight["generator"], resumed["generator"])

    # the same checkpoint layout as ddp, optimizer.pt in torch AdamW's per-parameter form
    folder = Path(first["last_checkpoint"])
    assert set(ckpt.verify_checkpoint(folder)["files"]) == {
        ckpt.ADAPTER,
        ckpt.ADAPTER_EMA,
        ckpt.OPTIMIZER,
        ckpt.SCHEDULER,
        ckpt.RNG,
        ckpt.TRAINING_STATE,
        ckpt.CONFIG,
    }
    assert json.loads((folder / ckpt.TRAINING_STATE).read_text())["world_size"] == 2
    saved = ckpt.read_checkpoint(folder).optimizer

    ddp = _run(paths["ddp"], "ddp", tmp_path / "ddp.pt", free_port)
    assert saved["state"].keys() == ddp["optimizer"]["state"].keys()
    for i, entry in ddp["optimizer"]["state"].items():
        assert {k: v.shape for k, v in saved["state"][i].items()} == {k: v.shape for k, v in entry.items()}
    assert saved["param_groups"][0].keys() == ddp["optimizer"]["param_groups"][0].keys()

    # a different world size re-cuts the consolidated state: 2 ranks' checkpoint-STOP finished on 1 rank
    shutil.copytree(folder, tmp_path / "one" / folder.name)
    one = _run(config_file(out="one", **RECIPE), "deepspeed", tmp_path / "one.pt", free_port, world=1)
    assert one["started"] == STOP and one["step"] == STEPS
    print(
        f"deepspeed resumed on 1 rank vs 2 ranks throughout: adapter max abs diff "
        f"{_max_diff(straight['adapter'], one['adapter']):.3e}"
    )
    assert _max_diff(straight["adapter"], one["adapter"]) < 1e-5
    diff, ema_diff = _max_diff(straight["adapter"], ddp["adapter"]), _max_diff(straight["ema"], ddp["ema"])
    moments = [
        (straight["optimizer"]["state"][i]["exp_avg"] - s["exp_avg"]).abs().max().item()
        for i, s in ddp["optimizer"]["state"].items()
    ]
    largest = max(v.abs().max().item() for k, v in ddp["adapter"].items() if not k.endswith(".alpha"))
    print(
        f"deepspeed vs ddp after {STEPS} steps on 2 ranks: adapter max abs diff {diff:.3e}, EMA {ema_diff:.3e}, "
        f"exp_avg {max(moments):.3e} (largest weight {largest:.3e})"
    )
    assert diff < 1e-5 and ema_diff < 1e-5 and max(moments) < 1e-5


def test_bnb_adamw8bit_with_deepspeed_is_a_config_error_at_launch(config_file, tmp_path):
    from orchestrator.core.cluster import ClusterConfig
    from orchestrator.run.launch import launch

    path = config_file(max_train_steps=2, optimizer="bnb-adamw8bit")
    cluster = ClusterConfig(num_workers=2, strategy="deepspeed", storage_path=str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match="bnb-adamw8bit.*deepspeed"):
        launch(path, {}, cluster)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_zero2_resubmit_resumes_bitwise(local_ray, config_file, tmp_path):
    """What users run: TorchTrainer with 2 CPU workers and strategy deepspeed. A run stopped at STOP and
    resubmitted by name ends with the same checkpoint contents as an uninterrupted run."""
    from orchestrator.core.cluster import ClusterConfig
    from orchestrator.run.launch import launch

    finals = {}
    for name, legs in (("straight", [STEPS]), ("resubmitted", [STOP, STEPS])):
        path = config_file(out=name, **RECIPE)
        cluster = ClusterConfig(
            num_workers=2, strategy="deepspeed", storage_path=str(tmp_path / "runs"), run_name=name, max_failures=0
        )
        for steps in legs:
            result = launch(path, {"max_train_steps": steps}, cluster)
            assert result.error is None
        with result.checkpoint.as_directory() as folder:
            finals[name] = ckpt.read_checkpoint(Path(folder))
    straight, resubmitted = finals["straight"], finals["resubmitted"]
    assert resubmitted.training_state["resumed_at"] == [STOP] and resubmitted.step == straight.step == STEPS
    assert_tree_equal(straight.adapter, resubmitted.adapter, "adapter")
    assert_tree_equal(straight.ema, resubmitted.ema, "ema")
    assert_tree_equal(straight.optimizer, resubmitted.optimizer, "optimizer")
    assert_tree_equal(straight.scheduler, resubmitted.scheduler, "scheduler")
    # the step's generator (numpy's and python's global RNGs are unseeded per process and unused by a step)
    assert torch.equal(straight.rng["generator"], resubmitted.rng["generator"])
