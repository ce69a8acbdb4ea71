"""Data parallelism for the adapter, in plain torch.distributed (gloo on the CPU, NCCL on the GPU).

The LyCORIS network is not a submodule of the transformer, so wrapping the transformer in DDP would
sync nothing. The adapter's gradients are summed here instead, the way DDP does it: hooks launch
one asynchronous all-reduce per bucket while backward is still producing the rest, and the loop
waits for them just before clipping (`BucketedAllReduce`).

Every strategy is one `Update` object: backward, gradient reduction, clipping and the optimizer step
behind one interface (`build_update`). `ddp` is `ReplicatedUpdate` below; `deepspeed` is
relay_train.zero.ZeroStage2.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.distributed as dist

from relay_train.config import TrainConfig
from relay_train.optim import build_optimizer, clip_gradients

log = logging.getLogger(__name__)

MIB = 1 << 20


def shard_of(count: int, rank: int, world_size: int) -> slice:
    """Rank's contiguous share of a global batch of `count`; sizes differ by at most one."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class Update(Protocol):
    """Backward, gradient reduction over ranks, clipping and the optimizer step, for one strategy.

    Every rank calls every method in the same order (they may run collectives). `optimizer` is the
    torch optimizer whose `lr` the scheduler drives.
    """

    optimizer: torch.optim.Optimizer

    def backward(self, loss: torch.Tensor | None) -> None:
        """One micro-batch's backward; None when this rank's share of the batch was empty."""

    def step(self) -> torch.Tensor:
        """Reduce over ranks, clip, step; the gradient L2 norm before clipping (a tensor: no host sync)."""

    def zero_grad(self) -> None: ...

    def consolidated_state_dict(self) -> dict:
        """The whole optimizer state in torch's per-parameter layout (a collective for sharded state)."""

    def load_consolidated_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class GradientSync:
    """How `ddp` sums the adapter's gradients over ranks (the cluster's gradient_* keys)."""

    bucket_mb: float = 25.0  # MiB sent per all-reduce: small starts traffic early, large costs fewer calls
    dtype: Literal["fp32", "bf16"] = "fp32"  # bf16 halves the bytes; gradients still accumulate in fp32
    overlap: bool = True  # False: one flat, blocking all-reduce after backward (the old path; a baseline)


def build_update(
    strategy: str,
    world_size: int,
    config: TrainConfig,
    network: torch.nn.Module,
    params: list[torch.nn.Parameter],
    sync: GradientSync | None = None,
) -> Update:
    """The update for `strategy` ("ddp" or "deepspeed"). One rank syncs nothing and registers no hooks."""
    if strategy == "deepspeed":
        from relay_train.zero import ZeroStage2

        return ZeroStage2(config, network, params)
    if strategy != "ddp":
        raise ValueError(f"strategy {strategy!r}: expected 'ddp' or 'deepspeed'")
    sync = sync or GradientSync()
    if world_size <= 1:
        reducer = None
    elif sync.overlap:
        reducer = BucketedAllReduce(params, sync.bucket_mb, sync.dtype)
    else:
        reducer = BlockingAllReduce(params, sync.dtype)
    return ReplicatedUpdate(config, params, reducer)


class ReplicatedUpdate:
    """Strategy ddp (and one process): every rank holds the whole optimizer; gradients are summed over
    ranks by the reducer before clipping and the step. Each rank already weighted its loss by its
    share of the global batch, so the sum is the global batch's mean gradient."""

    def __init__(
        self, config: TrainConfig, params: list[torch.nn.Parameter], reducer: BucketedAllReduce | BlockingAllReduce | None = None
    ):
        self.params, self.reducer = params, reducer
        self.accumulation = config.gradient_accumulation_steps
        self.clip_method, self.clip_limit = config.grad_clip_method, config.max_grad_norm
        self.optimizer = build_optimizer(config, params)
        self.micro = 0  # backward calls since the last step

    def backward(self, loss: torch.Tensor | None) -> None:
        self.micro += 1
        if self.reducer is not None:  # sync only on the last micro-step of gradient accumulation
            self.reducer.arm(self.micro >= self.accumulation)
        if loss is not None:
            loss.backward()

    def step(self) -> torch.Tensor:
        """Sum over ranks, clip, step; returns the gradient norm before clipping (no host sync)."""
        if self.reducer is not None:
            self.reducer.finish()  # waits for the all-reduces backward launched: a barrier with every rank
        self.micro = 0
        norm = clip_gradients(self.params, self.clip_method, self.clip_limit)
        self.optimizer.step()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def consolidated_state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_consolidated_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def close(self) -> None:
        if self.reducer is not None:
            self.reducer.close()


@torch.no_grad()
def allreduce_gradients(params: list[torch.nn.Parameter], dtype: str = "fp32") -> None:
    """Sum gradients over ranks in one flat, blocking all-reduce after backward (each rank already
    scaled its loss by its share of the global batch). A rank whose share was empty contributes zeros."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    if dtype == "bf16":
        sent = flat.to(torch.bfloat16)
        dist.all_reduce(sent, op=dist.ReduceOp.SUM)
        flat.copy_(sent)
    else:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for param, synced in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
        if param.grad is None:
            param.grad = synced.clone()
        else:
            param.grad.copy_(synced)


class BlockingAllReduce:
    """The pre-overlap path: nothing during backward, one flat all-reduce in `finish`."""

    def __init__(self, params: list[torch.nn.Parameter], dtype: str = "fp32"):
        self.params, self.dtype = params, dtype

    def arm(self, last: bool) -> None:
        pass

    def finish(self) -> None:
        allreduce_gradients(self.params, self.dtype)

    def close(self) -> None:
        pass


class BucketedAllReduce:
    """Overlapped, bucketed gradient all-reduce, as DDP's reducer does it, over a parameter list.

    - A post-accumulate-grad hook on each parameter marks it ready. When every parameter of a bucket
      is ready, the bucket's gradients are copied into its flat buffer (cast to bf16 when asked) and
      its all-reduce is launched with async_op=True, while backward computes the earlier layers.
    - Buckets launch strictly in bucket order, so every rank issues the same collectives in the same
      order, whatever order its hooks fire in.
    - `finish` launches what backward did not (a rank with nothing to train, a parameter that got no
      gradient), waits on every bucket, and copies the sums back into `.grad` (in fp32).
    - Buckets follow the order in which backward produces gradients, recorded on the run's first
      sync: that sync waits for backward to end, takes rank 0's order (one broadcast), cuts the
      buckets and reduces them all at once. Later syncs overlap. A resumed run records the same
      order again, so its bucket layout, and with it the bits of every sum, match an unbroken run.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        bucket_mb: float = 25.0,
        dtype: str = "fp32",
        group: dist.ProcessGroup | None = None,
    ):
        if not params:
            raise ValueError("no parameters to synchronize")
        self.params, self.group = params, group
        self.wire = torch.bfloat16 if dtype == "bf16" else torch.float32
        self.bucket_bytes = max(1, int(bucket_mb * MIB))
        self.index = {id(p): i for i, p in enumerate(params)}
        self.armed = False
        self.produced: list[int] = []  # the first sync's hook order
        self.buckets: list[list[int]] | None = None  # parameter indices per bucket, in launch order
        self.bucket_of: list[int] = []
        self.flats: list[torch.Tensor] = []
        self.pending: list[int] = []  # per bucket: parameters not yet ready
        self.works: list[dist.Work | None] = []
        self.next_launch = 0
        self.timeline: list[tuple[str, int, float]] | None = None  # ("ready"/"launch"/"done", bucket, clock)
        self.handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    # -- hooks (autograd's thread, during backward) ------------------------------------------------
    def arm(self, last: bool) -> None:
        """Called before each micro-step's backward: only the last one of an accumulation syncs."""
        self.armed = last

    @torch.no_grad()
    def _on_grad(self, param: torch.nn.Parameter) -> None:
        if not self.armed:
            return
        i = self.index[id(param)]
        if self.buckets is None:
            self.produced.append(i)
            return
        b = self.bucket_of[i]
        self.pending[b] -= 1
        if self.pending[b] == 0:
            self._mark("ready", b)
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self.next_launch < len(self.buckets) and self.pending[self.next_launch] == 0:
            self._launch(self.next_launch)

    @torch.no_grad()
    def _launch(self, b: int) -> None:
        flat, offset = self.flats[b], 0
        for i in self.buckets[b]:
            param = self.params[i]
            n = param.numel()
            if param.grad is None:  # no gradient reached it on this rank: it adds zero to the sum
                flat[offset : offset + n].zero_()
            else:
                flat[offset : offset + n].copy_(param.grad.reshape(-1))  # fp32 → wire dtype
            offset += n
        self.works[b] = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self.pending[b] = 0
        self.next_launch = b + 1
        self._mark("launch", b)

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def finish(self) -> None:
        """Launch what is left, in order, wait for every bucket and write the sums into `.grad`."""
        self.armed = False
        if self.buckets is None:
            self._cut_buckets()
        for b in range(self.next_launch, len(self.buckets)):
            self._launch(b)
        started = time.monotonic()
        for b, bucket in enumerate(self.buckets):
            try:
                self.works[b].wait()  # bounded by the process group's timeout: a dead peer raises here
            except RuntimeError as exc:
                raise RuntimeError(
                    f"gradient all-reduce of bucket {b + 1}/{len(self.buckets)} failed after "
                    f"{time.monotonic() - started:.0f} s: a peer is gone or the network is cut "
                    f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                ) from exc
            self.works[b] = None
            self._mark("done", b)
            flat, offset = self.flats[b], 0
            for i in bucket:
                param = self.params[i]
                n = param.numel()
                synced = flat[offset : offset + n].view_as(param)
                if param.grad is None:
                    param.grad = synced.to(param.dtype, copy=True)
                else:
                    param.grad.copy_(synced)
                offset += n
        self.pending = [len(bucket) for bucket in self.buckets]
        self.next_launch = 0

    def _cut_buckets(self) -> None:
        """Rank 0's hook order (parameters it never saw go last, in reverse registration order),
        cut into buckets of about `bucket_bytes` on the wire. One broadcast: every rank agrees."""
        order = torch.full((len(self.params),), -1, dtype=torch.int64)
        seen = list(dict.fromkeys(self.produced))
        order[: len(seen)] = torch.tensor(seen, dtype=torch.int64)
        dist.broadcast(order, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        chosen = [i for i in order.tolist() if i >= 0]
        placed = set(chosen)
        chosen += [i for i in reversed(range(len(self.params))) if i not in placed]
        element = torch.empty((), dtype=self.wire).element_size()
        buckets: list[list[int]] = [[]]
        size = 0
        for i in chosen:
            nbytes = self.params[i].numel() * element
            if buckets[-1] and size + nbytes > self.bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(i)
            size += nbytes
        self.buckets = buckets
        self.bucket_of = [0] * len(self.params)
        for b, bucket in enumerate(buckets):
            for i in bucket:
                self.bucket_of[i] = b
        self.flats = [
            torch.empty(sum(self.params[i].numel() for i in bucket), dtype=self.wire, device=self.params[bucket[0]].device)
            for bucket in buckets
        ]
        self.works = [None] * len(buckets)
        self.pending = [len(bucket) for bucket in buckets]
        self.produced = []
        log.info(
            "gradient sync: %d bucket(s) of up to %.1f MiB (%s on the wire), %d parameters",
            len(buckets),
            self.bucket_bytes / MIB,
            "bf16" if self.wire == torch.bfloat16 else "fp32",
            len(self.params),
        )

    def _mark(self, what: str, bucket: int) -> None:
        if self.timeline is not None:
            self.timeline.append((what, bucket, time.perf_counter()))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
