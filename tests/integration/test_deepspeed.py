"""The deepspeed strategy (ZeRO-2 over the adapter's optimizer state) on the CPU: 2 processes over gloo.

Spawned processes run the same `build_trainer` the Ray worker runs; the Ray path itself is covered by
the slow test at the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from relay_train import checkpoint as ckpt
from relay_train.config import ConfigError
from state_equal import assert_tree_equal  # tests/ is on sys.path (conftest rootdir)
from support.checkpoints import max_abs_diff  # tests/support/
from support.ranks import train_ranks

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


def _run(config_path: Path, strategy: str, out: Path, free_port, stop_at: int = 0, world: int = 2) -> dict:
    """`world` ranks; the global batch is always sized for 2 (as an elastic run keeps it)."""
    return train_ranks(config_path, out, free_port(), world, strategy=strategy, stop_at=stop_at)


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


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model, demo_data) -> dict:
    """ZeRO-2 on 2 ranks, STEPS steps uninterrupted: the reference both resume tests compare against."""
    from relay_train.demo.recipe import write_recipe
    from support.ports import free_port

    folder = tmp_path_factory.mktemp("straight")
    path = write_recipe(folder, tiny_model, demo_data, out="straight", validation_num_gpus=0, **RECIPE)
    _fill_caches(path)
    return train_ranks(path, folder / "straight.pt", free_port(), 2, strategy="deepspeed")


@pytest.mark.slow
def test_zero2_resumes_bitwise_and_agrees_with_ddp(straight, config_file, tmp_path, free_port):
    """2 ranks: stopped at STOP and resumed == straight (bitwise), checkpoint files as ddp's, and the
    adapter within float tolerance of the ddp strategy's after the same steps."""
    paths = {name: config_file(out=name, **RECIPE) for name in ("halves", "ddp")}
    _fill_caches(paths["halves"])

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
        f"{max_abs_diff(straight['adapter'], one['adapter']):.3e}"
    )
    assert max_abs_diff(straight["adapter"], one["adapter"]) < 1e-5
    diff, ema_diff = max_abs_diff(straight["adapter"], ddp["adapter"]), max_abs_diff(straight["ema"], ddp["ema"])
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
def test_ray_zero2_resubmit_resumes_bitwise(local_ray, straight, config_file, tmp_path):
    """What users run: TorchTrainer with 2 CPU workers and strategy deepspeed. A run stopped at STOP and
    resubmitted by name ends with the same checkpoint contents as an uninterrupted run (the same trainer
    on 2 ranks without Ray: a Ray run of it ends with the same bits)."""
    from orchestrator.core.cluster import ClusterConfig
    from orchestrator.run.launch import launch

    path = config_file(out="resubmitted", **RECIPE)
    cluster = ClusterConfig(
        num_workers=2, strategy="deepspeed", storage_path=str(tmp_path / "runs"), run_name="resubmitted", max_failures=0
    )
    for steps in (STOP, STEPS):
        result = launch(path, {"max_train_steps": steps}, cluster)
        assert result.error is None
    with result.checkpoint.as_directory() as folder:
        resubmitted = ckpt.read_checkpoint(Path(folder))
    reference = ckpt.read_checkpoint(Path(straight["last_checkpoint"]))
    assert resubmitted.training_state["resumed_at"] == [STOP] and resubmitted.step == reference.step == STEPS
    assert_tree_equal(reference.adapter, resubmitted.adapter, "adapter")
    assert_tree_equal(reference.ema, resubmitted.ema, "ema")
    assert_tree_equal(reference.optimizer, resubmitted.optimizer, "optimizer")
    assert_tree_equal(reference.scheduler, resubmitted.scheduler, "scheduler")
    # the step's generator (numpy's and python's global RNGs are unseeded per process and unused by a step)
    assert torch.equal(reference.rng["generator"], resubmitted.rng["generator"])
