"""The preemption path, in one place: every `check_steps` steps all ranks ask Ray whether a node of this
group is draining (a cloud notice turned into a drain by `relay spot-agent`, orchestrator/spot.py), or
whether the driver asked the run to stop (Ctrl-C, SIGTERM); on either the trainer checkpoints at that
step, uploaded before `report` returns. After a notice the ranks then park until Ray tears the group
down and restarts it from that checkpoint (zero steps lost); after a stop request they return.

The watch is the Trainer's `should_stop` hook (relay_train.trainer.Hooks); CheckpointReporter
(orchestrator/run/worker.py) does the upload it switches to synchronous, through its `emergency` flag
(EmergencySwitch: the worker imports this module, never the other way round).
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import ray
import ray.train

from orchestrator.core.ledger import EventType
from orchestrator.core.store import RunStorage

log = logging.getLogger(__name__)


class EmergencySwitch(Protocol):
    """What the watch needs of the checkpoint reporter: a flag that makes the next upload synchronous."""

    emergency: bool


class PreemptionWatch:
    """should_stop hook: every `every` steps, all ranks ask Ray whether a node of this group is draining
    (`get_preemption_info` is a barrier, hence not every step). On a notice the trainer checkpoints at
    once, uploaded before the report returns, and the workers then wait for Ray to restart the group.
    Rank 0 also sends its progress to the steward at every step (fire-and-forget)."""

    def __init__(self, every: int, reporter: EmergencySwitch, steward=None, rank: int = 0):
        self.every, self.reporter, self.steward, self.rank = every, reporter, steward, rank
        self.notice = None  # PreemptionInfo once seen
        self.noticed_at = self.noticed_step = None
        self.stopped = False  # the driver asked the run to stop (Ctrl-C, SIGTERM)
        self._asking = None  # rank 0's pending steward.should_stop() call

    def _stop_agreed(self) -> bool:
        """Whether the driver asked to stop, agreed by every rank at this step. Rank 0 asks the steward
        without waiting (the answer is picked up at a later check); one tiny all-reduce then makes every
        rank stop at the same step (a few microseconds on NCCL, well under a millisecond on gloo)."""
        import torch
        import torch.distributed as dist

        asked = False
        if self.rank == 0 and self.steward is not None:
            if self._asking is None:
                self._asking = self.steward.should_stop.remote()
            ready, _ = ray.wait([self._asking], timeout=0)
            if ready:
                self._asking = None
                try:
                    asked = bool(ray.get(ready[0]))
                except ray.exceptions.RayError:  # the steward is gone: it cannot have asked
                    asked = False
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1.0 if asked else 0.0], device=ray.train.torch.get_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            asked = bool(flag.item())
        return asked

    def __call__(self, step: int) -> bool:
        if self.steward is not None and self.rank == 0:
            self.steward.tick.remote(step)
        if self.every <= 0 or step % self.every:
            return False
        if self._stop_agreed():
            log.warning("stop requested at the driver: checkpointing at step %d, then returning", step)
            self.reporter.emergency = True  # uploaded before report returns: committed when the run ends
            self.stopped = True
            return True
        info = ray.train.get_preemption_info()
        if info is None:
            return False
        self.notice, self.noticed_at, self.noticed_step = info, time.time(), step
        self.reporter.emergency = True
        deadline = info.deadline_ms / 1000 if info.deadline_ms else None
        log.warning(
            "preemption notice at step %d: node(s) %s (ranks %s) go%s; checkpointing now",
            step,
            ", ".join(n[:12] for n in info.preempted_node_ids),
            info.preempted_ranks,
            f" in {deadline - time.time():.0f} s" if deadline else " soon",
        )
        if self.steward is not None and self.rank == 0:
            self.steward.record.remote(
                EventType.PREEMPTION_NOTICE, step, nodes=info.preempted_node_ids, ranks=info.preempted_ranks, deadline=deadline
            )
        return True

    def after_emergency_checkpoint(self, storage: RunStorage) -> None:
        """Rank 0 waits until the checkpoint is committed (a step that had just checkpointed may still be
        uploading asynchronously) and records it; then every rank waits to be torn down: returning
        would end the run as finished."""
        deadline = self.notice.deadline_ms / 1000 if self.notice.deadline_ms else time.time() + PARK_FALLBACK_SECONDS
        if self.rank == 0:
            while not _committed(storage, self.noticed_step) and time.time() < deadline:
                time.sleep(0.2)
            seconds = time.time() - self.noticed_at
            committed = _committed(storage, self.noticed_step)
            log.warning(
                "emergency checkpoint at step %d %s %.1f s after the notice; waiting for the restart",
                self.noticed_step,
                "committed" if committed else "NOT committed by the deadline",
                seconds,
            )
            if self.steward is not None:
                self.steward.reported.remote(
                    self.noticed_step, emergency=True, committed=committed, seconds_from_notice=round(seconds, 3)
                )
        while time.time() < deadline + PARK_GRACE_SECONDS:  # Ray tears the group down at the deadline
            time.sleep(1.0)
        raise RuntimeError(f"the preemption announced at step {self.noticed_step} never came; restarting from its checkpoint")


PARK_FALLBACK_SECONDS = 120  # a notice without a deadline (Ray's own default wait is similar)
PARK_GRACE_SECONDS = 120


def _committed(storage: RunStorage, step: int) -> bool:
    """Whether checkpoint-<step> is committed; storage that cannot be read this moment says not yet."""
    try:
        return step in storage.checkpoint_steps()
    except OSError as exc:
        log.warning("emergency checkpoint: could not read %s: %s", storage.describe(), exc)
        return False
