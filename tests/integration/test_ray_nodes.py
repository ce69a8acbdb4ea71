"""A fake multi-node cluster (ray.cluster_utils.Cluster): a worker node dies mid-run, a replacement joins,
and the run ends bitwise where an uninterrupted one does."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from support.checkpoints import result_adapter  # tests/support/
from support.polling import wait_for
from support.ranks import train_ranks

from orchestrator.core.cluster import ClusterConfig
from orchestrator.core.ledger import Ledger
from orchestrator.core.store import RunStorage
from orchestrator.run.launch import launch
from relay_train import checkpoint as ckpt

pytestmark = pytest.mark.slow


@pytest.fixture
def fake_cluster(loop_hold):  # the hold first: the nodes' workers inherit it
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
    ray.init(address=cluster.address)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def _wait_until_committed(run: Path, folder: str, seconds: float) -> None:
    """Until Ray's own record names the checkpoint: only then is it what a restart resumes from."""
    snapshot = run / "checkpoint_manager_snapshot.json"
    wait_for(f"{folder} to be committed", lambda: snapshot.is_file() and folder in snapshot.read_text(), seconds, every=0.2)


def test_node_loss_and_replacement_end_bitwise_equal(fake_cluster, loop_hold, config_file, tmp_path, free_port):
    cluster, workers = fake_cluster
    recipe = dict(max_train_steps=40, checkpointing_steps=5, train_batch_size=2, optimizer="bnb-adamw8bit")
    path = config_file(**recipe)

    def cluster_config(name: str) -> ClusterConfig:
        return ClusterConfig(
            num_workers=2, resources_per_worker={"trainer": 1}, storage_path=str(tmp_path / "runs"), run_name=name, max_failures=3
        )

    results = []
    loop_hold.at(5)  # however fast the steps, the node goes while the run is at step 5
    thread = threading.Thread(target=lambda: results.append(launch(path, {}, cluster_config("lossy"))), daemon=True)
    thread.start()
    _wait_until_committed(tmp_path / "runs/lossy", "checkpoint-5", seconds=300)
    cluster.remove_node(workers[1])  # the spot node vanishes (main thread, as Ray requires)
    cluster.add_node(num_cpus=1, resources={"trainer": 1})  # capacity comes back
    storage = RunStorage(str(tmp_path / "runs"), "lossy")
    wait_for("the restart", lambda: sum(e["type"] == "attempt" for e in Ledger(storage).events) >= 2, 300, every=0.2)
    loop_hold.release()  # only now: a worker outliving its node by a second must not train on with the other
    thread.join(timeout=600)
    assert results and results[0].error is None

    with results[0].checkpoint.as_directory() as folder:
        state = ckpt.read_checkpoint(Path(folder)).training_state
    assert state["step"] == 40 and state["resumed_at"][:1] == [5]
    # the uninterrupted run: the same trainer on 2 ranks without Ray (a Ray run of it ends with the same bits)
    a, b = (
        train_ranks(config_file(out="straight", **recipe), tmp_path / "straight.pt", free_port())["adapter"],
        result_adapter(results[0]),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
