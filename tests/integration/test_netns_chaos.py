"""A truer node loss: two Ray nodes in two network namespaces, the link between them cut mid-run.

The rank left waiting in an asynchronous gradient all-reduce does not hang: torch.distributed's timeout
(`collective_timeout_seconds`) fails the group, and Ray Train restarts it, on a replacement node, from
the last committed checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TIMEOUT_S = 15  # collective_timeout_seconds for this run
STEPS, EVERY = 40, 10  # held at the first checkpoint until the link is cut (the loop_hold fixture)


def _wait(what: str, condition, seconds: float) -> float:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.5)
    return time.monotonic()


TIMED_OUT = "gradient all-reduce of bucket"  # relay_train.parallel's error when a wait fails


def _committed(run: Path) -> list[int]:
    snapshot = run / "checkpoint_manager_snapshot.json"
    text = snapshot.read_text() if snapshot.is_file() else ""
    return sorted(int(f.name.split("-")[1]) for f in run.glob("checkpoint-*") if f.name in text)


def test_cut_link_times_out_the_allreduce_and_ray_resumes_from_the_last_commit(loop_hold, config_file, tmp_path):
    from support.netns import RayOnTwoNodes, TwoNodes, unavailable  # tests/ is on sys.path (conftest rootdir)

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    config = config_file(
        max_train_steps=STEPS, checkpointing_steps=EVERY, train_batch_size=2, optimizer="adamw", validation_steps=0
    )
    log, out, runs = tmp_path / "driver.log", tmp_path / "result.json", tmp_path / "runs"
    loop_hold.at(EVERY)  # both ranks wait after the first checkpoint, in no collective, until the cut
    with (
        TwoNodes(rate_mbit=200) as nodes,
        RayOnTwoNodes(nodes, cpus=(3, 1), resources=({"trainer": 1}, {"trainer": 1})) as cluster,
    ):
        with open(log, "w") as sink:
            driver = nodes.popen(
                0,
                [sys.executable, __file__, str(config), str(runs), str(out)],
                {**cluster.env, "RAY_ADDRESS": cluster.address},
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        _wait("a committed checkpoint", lambda: _committed(runs / "cut"), 300)
        nodes.cut()
        cut_at = time.monotonic()
        committed_at_cut = _committed(runs / "cut")[-1]
        loop_hold.release()  # the next step's gradient all-reduce now waits for a peer it cannot reach
        failed_at = _wait("the gradient all-reduce's timeout", lambda: cluster.logged(TIMED_OUT), 180)
        for pid in subprocess.run(
            ["ip", "netns", "pids", nodes.names[1]], capture_output=True, text=True, timeout=30
        ).stdout.split():  # node b is lost; a fresh one replaces it
            subprocess.run(["kill", "-9", pid], capture_output=True, timeout=30)
        nodes.restore()
        cluster.start_node(1)
        try:
            driver.wait(timeout=600)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not finish after the replacement joined:\n{log.read_text()[-4000:]}")
    result = json.loads(out.read_text())
    print(
        f"link cut at step >= {committed_at_cut}: all-reduce timed out {failed_at - cut_at:.1f} s later "
        f"(timeout {TIMEOUT_S} s); resumed at {result['resumed_at']}, finished at step {result['step']}"
    )
    assert result["error"] is None, result["error"]
    assert result["step"] == STEPS
    assert failed_at - cut_at < TIMEOUT_S + 60  # the timeout fired, not a hang
    assert result["resumed_at"] and result["resumed_at"][0] >= committed_at_cut  # from the last committed one
    assert result["resumed_at"][0] % EVERY == 0


def _driver(config: str, runs: str, out: str) -> None:
    """Runs inside node a: the run as users launch it, 2 workers, one per node."""
    import ray

    from orchestrator.core.cluster import ClusterConfig
    from orchestrator.run.launch import launch
    from relay_train import checkpoint as ckpt

    ray.init(log_to_driver=True)  # the workers' errors in this driver's log too

    cluster = ClusterConfig(
        num_workers=2,
        resources_per_worker={"trainer": 1},
        storage_path=runs,
        run_name="cut",
        max_failures=3,
        preemption_check_steps=0,
        gradient_bucket_mb=0.004,
        collective_timeout_seconds=TIMEOUT_S,
    )
    result = launch(config, {}, cluster)
    state = {}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as folder:
            state = ckpt.read_checkpoint(Path(folder)).training_state
    Path(out).write_text(
        json.dumps(
            {
                "error": None if result.error is None else str(result.error),
                "step": state.get("step"),
                "resumed_at": state.get("resumed_at"),
            }
        )
    )


if __name__ == "__main__":
    _driver(*sys.argv[1:4])
