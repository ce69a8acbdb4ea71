"""The ddp update's gradient sync: overlapped buckets vs one flat all-reduce, over 2 gloo processes."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from support.ranks import run_ranks

from relay_train.parallel import BucketedAllReduce, GradientSync, ReplicatedUpdate, build_update, shard_of


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(16, 16) for _ in range(6)))  # 12 params, ~1 KiB each


def _config(accumulation: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        gradient_accumulation_steps=accumulation,
        grad_clip_method="value",
        max_grad_norm=0.0,
        optimizer="adamw",
        learning_rate=1e-3,
    )


def _micro_batches(rank: int, accumulation: int, empty_last: bool) -> list[torch.Tensor | None]:
    """Each rank's inputs: different per rank; with `empty_last` rank 1 has nothing in the last one."""
    gen = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randn(3, 16, generator=gen) for _ in range(accumulation)]
    if empty_last and rank == 1:
        batches[-1] = None
    return batches


def _grads_after(update: ReplicatedUpdate, net: torch.nn.Module, batches: list[torch.Tensor | None]) -> list[torch.Tensor]:
    for x in batches:
        update.backward(None if x is None else net(x).square().mean())
    update.reducer.finish()
    return [p.grad.clone() for p in net.parameters()]


def _rank_main(rank: int, port: int, out: str, accumulation: int, empty_last: bool, dtype: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {}
        for name, sync in (
            ("flat", GradientSync(overlap=False, dtype=dtype)),
            ("bucketed", GradientSync(bucket_mb=2 / 1024, dtype=dtype)),
        ):
            net = _net()
            update = build_update("ddp", 2, _config(accumulation), net, list(net.parameters()), sync)
            if isinstance(update.reducer, BucketedAllReduce):
                update.reducer.timeline = []
            steps = []
            for _ in range(3):  # the first step records the order; the next two overlap
                steps.append(_grads_after(update, net, _micro_batches(rank, accumulation, empty_last)))
                update.micro = 0
                update.zero_grad()
            results[name] = steps
            if isinstance(update.reducer, BucketedAllReduce):
                results["buckets"] = update.reducer.buckets
                results["timeline"] = update.reducer.timeline
            update.close()
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _run(tmp_path, free_port, accumulation=1, empty_last=False, dtype="fp32") -> list[dict]:
    out = str(tmp_path / "grads")
    run_ranks(_rank_main, (free_port(), out, accumulation, empty_last, dtype), nprocs=2)
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]


def _local_sum(accumulation: int, empty_last: bool) -> list[torch.Tensor]:
    """The reference: both ranks' gradients summed in one process."""
    net = _net()
    for rank in range(2):
        for x in _micro_batches(rank, accumulation, empty_last):
            if x is not None:
                net(x).square().mean().backward()
    return [p.grad for p in net.parameters()]


@pytest.mark.parametrize("accumulation,empty_last", [(1, False), (2, True)])
def test_bucketed_overlap_equals_one_flat_allreduce_bitwise(tmp_path, free_port, accumulation, empty_last):
    ranks = _run(tmp_path, free_port, accumulation, empty_last)
    for rank in ranks:
        for flat, bucketed in zip(rank["flat"], rank["bucketed"]):
            assert all(torch.equal(a, b) for a, b in zip(flat, bucketed))
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["bucketed"][2], ranks[1]["bucketed"][2]))
    reference = _local_sum(accumulation, empty_last)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ranks[0]["bucketed"][0], reference))

    buckets = ranks[0]["buckets"]
    assert buckets == ranks[1]["buckets"] and len(buckets) >= 4  # 2 KiB buckets of ~1 KiB parameters
    assert sorted(i for b in buckets for i in b) == list(range(12))
    assert buckets[0][0] in (10, 11)  # backward produces the last layer's gradients first
    launches = [(b, t) for what, b, t in ranks[0]["timeline"] if what == "launch"]
    assert [b for b, _ in launches] == list(range(len(buckets))) * 3  # in bucket order, every step


def test_bf16_sync_is_close_to_fp32(tmp_path, free_port):
    fp32 = _local_sum(1, False)
    rank = _run(tmp_path, free_port, dtype="bf16")[0]
    for bucketed, flat, exact in zip(rank["bucketed"][0], rank["flat"][0], fp32):
        assert bucketed.dtype == torch.float32
        assert torch.equal(bucketed, flat)  # same rounding either way
        assert (bucketed - exact).abs().max() <= 2**-7 * exact.abs().max()  # bf16: 8 significant bits
    assert any(not torch.equal(a, b) for a, b in zip(rank["bucketed"][0], fp32))  # it did round


def test_one_rank_registers_no_hooks_and_syncs_nothing():
    net = _net()
    update = build_update("ddp", 1, _config(), net, list(net.parameters()))
    assert isinstance(update, ReplicatedUpdate) and update.reducer is None
    assert all(not p._post_accumulate_grad_hooks for p in net.parameters())


def test_unknown_strategy_is_refused():
    net = _net()
    with pytest.raises(ValueError, match="expected 'ddp' or 'deepspeed'"):
        build_update("fsdp", 2, _config(), net, list(net.parameters()))


def test_shard_of_covers_the_batch_once():
    for count in range(0, 9):
        for world in (1, 2, 3, 4):
            shares = [shard_of(count, r, world) for r in range(world)]
            assert [i for s in shares for i in range(count)[s]] == list(range(count))


@pytest.mark.parametrize("bad", [0, -1, float("nan"), 1e6])
def test_gradient_bucket_mb_out_of_range_is_a_config_error(bad):
    from orchestrator.core.cluster import load_cluster_config
    from relay_train.config import ConfigError

    with pytest.raises(ConfigError, match="gradient_bucket_mb must be in"):
        load_cluster_config(None, {"gradient_bucket_mb": bad})


def test_bf16_sync_with_deepspeed_names_deepspeeds_own_options():
    from orchestrator.core.cluster import load_cluster_config
    from relay_train.config import ConfigError

    with pytest.raises(ConfigError, match="overlap_comm.*communication_data_type"):
        load_cluster_config(None, {"strategy": "deepspeed", "gradient_sync_dtype": "bf16"})
    assert load_cluster_config(None, {"gradient_sync_dtype": "bf16"}).gradient_sync_dtype == "bf16"
    assert load_cluster_config(None, {}).gradient_bucket_mb == 25
