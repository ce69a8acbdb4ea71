"""The run ledger and what `relay status` makes of it: steps lost, time to resume, goodput, cost."""

from __future__ import annotations

import json
import time

from orchestrator.core.ledger import Ledger, summarize
from orchestrator.ops.status import gather, render
from orchestrator.run.steward import Steward
from orchestrator.core.store import RunStorage


def _chaos_events() -> list[dict]:
    """A run: 100 s to step 100; a notice at 100 (nothing lost, back 20 s later); an unannounced loss at
    step 180 back to checkpoint 150 (30 lost); completion at 300."""
    return [
        {"time": 0, "type": "run_started", "hourly_cost": 3.6},
        {"time": 0, "type": "attempt", "step": 0, "reason": "fresh", "world_size": 2, "steps_lost": 0},
        {"time": 50, "type": "checkpoint", "step": 50},
        {"time": 100, "type": "preemption_notice", "step": 100},
        {"time": 101, "type": "emergency_checkpoint", "step": 100, "seconds_from_notice": 1.0},
        {"time": 101, "type": "progress", "step": 100},
        {"time": 121, "type": "attempt", "step": 100, "reason": "preemption", "world_size": 2, "steps_lost": 0},
        {"time": 171, "type": "checkpoint", "step": 150},
        {"time": 201, "type": "progress", "step": 180},
        {"time": 231, "type": "attempt", "step": 150, "reason": "failure", "world_size": 2, "steps_lost": 30},
        {"time": 381, "type": "completed", "step": 300},
    ]


def test_steps_lost_time_to_resume_and_goodput():
    s = summarize("r", _chaos_events())
    assert s.state == "completed" and s.step == 300
    assert [a.steps_lost for a in s.attempts] == [0, 30, None]
    assert [a.time_to_resume for a in s.attempts] == [None, 20, 30]
    # productive: 101 s (0→100) + 50 of the 80 s spent on 100→180 (30 of 80 steps redone) + 150 s (150→300)
    assert abs(s.productive_seconds - (101 + 50 + 150)) < 1e-9
    assert abs(s.goodput - 301 / 381) < 1e-9
    assert s.preemption_notices == 1 and len(s.emergency_checkpoints) == 1


def test_status_reads_storage_alone(tmp_path):
    storage = RunStorage(str(tmp_path), "r")
    ledger = Ledger(storage)
    for event in _chaos_events():
        ledger.events.append(event)
    ledger.flush()
    (tmp_path / "r/checkpoint-300").mkdir(parents=True)
    (tmp_path / "r/checkpoint-300/manifest.json").write_text("{}")
    storage.write_json("checkpoint_manager_snapshot.json", {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint-300"}]})
    storage.write_json(
        "relay/validation/checkpoint-300/scores.json", {"variants": {"ema": {"mean": 25.0, "min": 20.0, "max": 30.0, "std": 3.0}}}
    )
    report = gather(storage, hub=False, now=381)
    assert report["checkpoints"] == [300] and report["state"] == "completed"
    assert report["estimated_cost"] == round(3.6 * 381 / 3600, 2)
    text = render(report)
    for fragment in (
        "step       300 / ?",
        "checkpoints 300",
        "ema CLIP 25.00",
        "goodput    79.0%",
        "steps lost 0, 30",
        "1 emergency checkpoint(s) (notice to commit: 1.0 s)",
    ):
        assert fragment in text, (fragment, text)
    json.dumps(report, default=str)  # --json works


def test_the_steward_records_commits_once_and_counts_lost_steps(tmp_path):
    storage = RunStorage(str(tmp_path), "r")
    steward = Steward(storage, poll_seconds=3600)  # polled by hand here
    try:
        steward.run_started(total_steps=40)
        steward.attempt(0, world_size=1, total_steps=40, resumed=False)
        for step in (10, 20, 27):
            steward.tick(step, 5.0)
        (tmp_path / "r/checkpoint-20").mkdir(parents=True)
        (tmp_path / "r/checkpoint-20/manifest.json").write_text("{}")
        assert steward.poll() == []  # not in Ray's snapshot yet: not committed
        storage.write_json("checkpoint_manager_snapshot.json", {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint-20"}]})
        assert steward.poll() == [20] and steward.poll() == []
        steward.attempt(20, world_size=1, total_steps=40, resumed=True)  # a worker died at 27
    finally:
        steward.close({"type": "completed", "step": 40})
    events = Ledger(storage).events
    assert [e["type"] for e in events] == ["run_started", "attempt", "checkpoint", "progress", "attempt", "completed"]
    assert events[4]["reason"] == "failure" and events[4]["steps_lost"] == 7
    assert "goodput" in events[5] and Steward(storage, poll_seconds=3600).committed == {20}  # a new steward knows


def test_the_steward_records_a_wait_for_capacity_once_when_a_node_is_gone_and_no_step_came(tmp_path) -> None:
    import time

    storage = RunStorage(str(tmp_path), "r")
    steward = Steward(storage, poll_seconds=3600)
    steward.attempt(0, 2, 300, resumed=False)
    steward._nodes = {"head", "worker"}  # the attempt's nodes (outside Ray there are none)
    steward.tick(40, steps_per_second=2.0)
    assert not steward.check_capacity(alive={"head"})  # a node gone, but steps are recent
    steward.progress["time"] = time.time() - 61
    assert not steward.check_capacity(alive={"head", "worker"})  # quiet, but every node is there
    assert not steward.check_capacity(alive=set())  # the GCS did not answer: not an outage
    assert steward.check_capacity(alive={"head"}) and not steward.check_capacity(alive={"head"})  # once
    waiting = [e for e in steward.ledger.events if e["type"] == "waiting_for_capacity"]
    assert len(waiting) == 1 and waiting[0]["step"] == 40 and waiting[0]["nodes_lost"] == ["worker"]
    assert gather(storage, hub=False)["state"] == "waiting for capacity"
    steward.attempt(30, 1, 300, resumed=True)  # Ray restarted the group: the run goes on
    assert gather(storage, hub=False)["state"] == "running"


def test_a_stall_threshold_set_for_the_run_is_what_the_steward_waits(tmp_path) -> None:
    import time

    storage = RunStorage(str(tmp_path), "r")
    steward = Steward(storage, poll_seconds=3600)
    steward.run_started(world_size=2, stall_seconds=15)  # cluster.stall_seconds, as launch records it
    steward.attempt(0, 2, 300, resumed=False)
    steward._nodes = {"head", "worker"}
    steward.tick(40, steps_per_second=2.0)
    steward.progress["time"] = time.time() - 10
    assert not steward.check_capacity(alive={"head"})  # 10 s: within the run's 15
    steward.progress["time"] = time.time() - 16
    assert steward.check_capacity(alive={"head"})  # not the default minute


def test_a_tick_the_throttle_held_back_is_written_once_the_loop_goes_quiet(tmp_path) -> None:
    """A loop that stops ticking (a hang, a held step) still leaves its last step for `relay status`."""
    from orchestrator.core.ledger import PROGRESS

    storage = RunStorage(str(tmp_path / "runs"), "quiet")
    steward = Steward(storage, total_steps=100, poll_seconds=3600, progress_every=0.2)
    steward.tick(10)  # the first tick is written at once
    steward.tick(20)  # within progress_every: held back
    assert storage.read_json(PROGRESS)["step"] == 10
    steward.flush_progress()  # the watcher, too soon: still held back
    assert storage.read_json(PROGRESS)["step"] == 10
    time.sleep(0.25)
    steward.flush_progress()  # the watcher, once progress_every has passed, with no tick since
    assert storage.read_json(PROGRESS)["step"] == 20
