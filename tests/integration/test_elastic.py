"""Elastic training on a fake multi-node cluster: num_workers [1, 2] grows when a node joins and shrinks when
one goes, keeping the global batch, and ends where a fixed 2-worker run does."""

from __future__ import annotations

import threading

import pytest
from support.checkpoints import max_abs_diff, result_adapter  # tests/ is on sys.path (conftest rootdir)
from support.ledger import checkpointed_since_the_last_attempt, events
from support.polling import wait_for
from support.ranks import train_ranks

from orchestrator.core.cluster import ClusterConfig
from orchestrator.core.store import RunStorage
from orchestrator.run.launch import launch

pytestmark = pytest.mark.slow
TRAINER = {"trainer": 1}


def test_elastic_run_shrinks_and_grows_with_the_same_global_batch(loop_hold, config_file, tmp_path, free_port):
    """num_workers [1, 2]: the group starts on the one node there is, grows when a second joins, shrinks
    when one goes, and ends where a fixed 2-worker run does (the global batch never changes: each rank
    takes its share of train_batch_size × 2). The loop's hold keeps each size at its 20 steps
    until the test has changed the cluster, however fast the steps go."""
    import ray
    from ray.cluster_utils import Cluster

    loop_hold.at(20)  # set before the nodes start: their workers inherit it
    recipe = dict(max_train_steps=60, checkpointing_steps=10, train_batch_size=2, optimizer="adamw", validation_steps=0)
    path = config_file(**recipe)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=1, resources=TRAINER)]
    ray.init(address=cluster.address)
    try:

        def config(name: str, workers) -> ClusterConfig:
            return ClusterConfig(
                num_workers=workers,
                resources_per_worker=TRAINER,
                storage_path=str(tmp_path / "runs"),
                run_name=name,
                max_failures=3,
                elastic_resize_seconds=2,
                worker_start_seconds=15,  # after the node goes, a start at the old size gives up this soon
                steward_poll_seconds=0.5,
            )

        storage = RunStorage(str(tmp_path / "runs"), "elastic")
        results = []
        thread = threading.Thread(target=lambda: results.append(launch(path, {}, config("elastic", [1, 2]))), daemon=True)
        thread.start()
        wait_for("a 1-worker attempt", lambda: any(e["world_size"] == 1 for e in events(storage, "attempt")), 300, every=0.2)
        wait_for("1 worker's checkpoint 20", lambda: checkpointed_since_the_last_attempt(storage, 20), 300, every=0.2)
        nodes.append(cluster.add_node(num_cpus=1, resources=TRAINER))  # capacity arrives: grow
        wait_for("the group to grow", lambda: any(e["world_size"] == 2 for e in events(storage, "attempt")), 300, every=0.2)
        loop_hold.at(40)
        wait_for("2 workers' checkpoint 40", lambda: checkpointed_since_the_last_attempt(storage, 40), 300, every=0.2)
        cluster.remove_node(nodes.pop())  # and goes again: shrink
        wait_for("the group to shrink", lambda: events(storage, "attempt")[-1]["world_size"] == 1, 300, every=0.2)
        loop_hold.release()  # only now: a worker outliving its node by a second must not train on with the other
        thread.join(timeout=900)
        assert results and results[0].error is None, results and results[0].error
    finally:
        ray.shutdown()
        cluster.shutdown()

    attempts = events(storage, "attempt")
    sizes = [e["world_size"] for e in attempts]
    resizes = events(storage, "resize")
    assert sizes[0] == 1 and 2 in sizes and sizes[-1] == 1, sizes
    assert [(r["previous_world_size"], r["world_size"]) for r in resizes][:2] == [(1, 2), (2, 1)]
    assert [e["step"] for e in attempts] == [0, 20, 40], attempts  # each size trained its share
    # a fixed 2-worker run: the same trainer on 2 ranks without Ray (a Ray run of it ends with the same bits)
    fixed = train_ranks(config_file(out="fixed", **recipe), tmp_path / "fixed.pt", free_port())
    a, b = fixed["adapter"], result_adapter(results[0])
    diff = max_abs_diff(a, b)
    print(f"elastic {sizes} vs fixed 2 workers: adapter max abs diff {diff:.3e}")
    assert diff < 1e-4
