"""Spot preemption end to end on a fake multi-node cluster: a cloud notice (fake IMDS on loopback) →
the spot agent drains the Ray node → the loop checkpoints at once → the node goes, a replacement joins
→ the run resumes with zero steps lost. Then the chaos run: three preemptions, two announced and one
not, finishing bitwise equal to an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.ops import spot
from orchestrator.core.cluster import ClusterConfig
from orchestrator.run.launch import launch
from orchestrator.core.ledger import Ledger, summarize
from orchestrator.core.store import RunStorage
from relay_train import checkpoint as ckpt
from support.fake_imds import FakeMetadata  # tests/ is on sys.path (conftest rootdir)
from support.ranks import train_ranks

pytestmark = pytest.mark.slow
TRAINER = {"trainer": 1}


@pytest.fixture
def fake_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=1, resources=TRAINER) for _ in range(2)]
    ray.init(address=cluster.address)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def _events(storage: RunStorage, kind: str) -> list[dict]:
    return [e for e in Ledger(storage).events if e["type"] == kind]


def _wait_for(what: str, predicate, seconds: float = 300):
    deadline = time.monotonic() + seconds
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def _adapter(result) -> dict[str, torch.Tensor]:
    with result.checkpoint.as_directory() as folder:
        return load_file(str(Path(folder) / ckpt.ADAPTER))


def _announce_and_drain(cluster, node, seconds: float = 90) -> spot.Notice:
    """The node's own agent, as `relay spot-agent` runs it, against a fake metadata service."""
    metadata = FakeMetadata().start()
    try:
        source = spot.detect_cloud(aws_endpoint=metadata.url, gcp_endpoint="http://127.0.0.1:9")
        assert spot.run_agent(source, cluster.address, node.node_id, interval=0.1, max_polls=2) is None  # 404s
        metadata.announce(seconds)
        return spot.run_agent(source, cluster.address, node.node_id, interval=0.1, max_polls=50)
    finally:
        metadata.close()


def _in_order(seen: list[str], expected: list[str]) -> bool:
    it = iter(seen)
    return all(kind in it for kind in expected)


def test_chaos_three_preemptions_end_bitwise_equal(fake_cluster, config_file, tmp_path, webhook_receiver, free_port):
    cluster, nodes = fake_cluster
    recipe = dict(max_train_steps=120, checkpointing_steps=10, train_batch_size=2, optimizer="bnb-adamw8bit")
    path = config_file(
        **recipe,
        webhook_config={
            "webhook_type": "raw",
            "callback_url": webhook_receiver.url(),
            "auth_token": "chaos-token-123456",
            "log_level": "info",
        },
    )

    def cluster_config(name: str) -> ClusterConfig:
        return ClusterConfig(
            num_workers=2,
            resources_per_worker=TRAINER,
            storage_path=str(tmp_path / "runs"),
            run_name=name,
            max_failures=3,
            preemption_check_steps=2,
            steward_poll_seconds=0.5,
        )

    storage = RunStorage(str(tmp_path / "runs"), "chaos")
    results = []
    thread = threading.Thread(target=lambda: results.append(launch(path, {}, cluster_config("chaos"))), daemon=True)
    thread.start()
    timings = []
    for n, announced in enumerate((True, True, False), start=1):
        _wait_for(f"attempt {n}", lambda n=n: len(_events(storage, "attempt")) >= n)
        victim = nodes[0] if n != 2 else nodes[1]
        lost_at = time.time()
        if announced:
            notice = _announce_and_drain(cluster, victim)
            assert notice is not None and notice.cloud == "aws"
            _wait_for("the emergency checkpoint", lambda n=n: len(_events(storage, "emergency_checkpoint")) >= n)
        else:  # no warning: a checkpoint commits, then the node simply goes
            _wait_for(
                "a checkpoint after the restart",
                lambda: any(e["time"] > _events(storage, "attempt")[-1]["time"] for e in _events(storage, "checkpoint")),
            )
        cluster.remove_node(victim)  # the cloud takes the node (main thread, as Ray requires)
        nodes[nodes.index(victim)] = cluster.add_node(num_cpus=1, resources=TRAINER)  # capacity returns
        timings.append(lost_at)
    thread.join(timeout=900)
    assert results and results[0].error is None, results and results[0].error

    notices, emergencies = _events(storage, "preemption_notice"), _events(storage, "emergency_checkpoint")
    attempts = _events(storage, "attempt")
    assert len(notices) == 2 and len(emergencies) == 2 and len(attempts) == 4
    for notice, emergency, resumed in zip(notices, emergencies, attempts[1:3]):
        assert emergency["step"] == notice["step"] == resumed["step"]  # checkpointed at the notice, resumed there
        assert emergency["committed"] and resumed["steps_lost"] == 0 and resumed["reason"] == "preemption"
    # Unannounced: back to the newest committed checkpoint. With async uploads that is up to one interval,
    # plus the steps trained while the newest checkpoint was still uploading (seconds, on a real run).
    assert attempts[3]["reason"] == "node_lost" and 0 <= attempts[3]["steps_lost"] <= 2 * 10

    summary = summarize("chaos", Ledger(storage).events)
    assert summary.state == "completed" and summary.step == 120
    assert [a.steps_lost for a in summary.attempts[:3]] == [0, 0, attempts[3]["steps_lost"]]
    print(
        f"chaos: notice→commit {[round(e['seconds_from_notice'], 2) for e in emergencies]} s; "
        f"loss→first step {[round(a.time_to_resume, 1) for a in summary.attempts[1:]]} s; "
        f"steps lost {[a.steps_lost for a in summary.attempts[:3]]}; goodput {summary.goodput:.3f}"
    )

    # the uninterrupted run: the same trainer on 2 ranks without Ray (a Ray run of it ends with the same bits)
    a, b = (
        train_ranks(config_file(out="straight", **recipe), tmp_path / "straight.pt", free_port())["adapter"],
        _adapter(results[0]),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The webhook heard it all, in order, from the steward.
    chaos = [r.json for r in webhook_receiver.requests if r.json.get("run") == "chaos"]
    kinds = [m["type"] for m in chaos]
    assert _in_order(
        kinds, ["run_started", "preemption_notice", "resumed", "preemption_notice", "resumed", "node_lost", "completed"]
    ), " ".join(kinds)
    alert = next(m for m in chaos if m["type"] == "node_lost")  # a loss without notice is an alert
    assert alert["severity"] == "error" and "step(s) lost" in alert["message"], alert
    assert {"checkpoint_committed", "validation"} <= set(kinds), " ".join(kinds)
    assert chaos[-1]["type"] == "completed" and "goodput" in chaos[-1]["message"]
    assert all(r.headers.get("x-api-key") == "chaos-token-123456" for r in webhook_receiver.requests)


def test_sigterm_to_the_agent_process_drains_and_loses_no_steps(fake_cluster, config_file, tmp_path):
    """An eviction (EKS capacity rebalancing, Karpenter, a stopped unit) reaches the node as a SIGTERM, not an
    IMDS notice. The agent, started as infra/ starts it, drains its node with the grace it has left; the run
    takes its emergency checkpoint exactly as on an IMDS notice and resumes there."""
    cluster, nodes = fake_cluster
    path = config_file(max_train_steps=80, checkpointing_steps=10, train_batch_size=2, optimizer="adamw", validation_steps=0)
    storage = RunStorage(str(tmp_path / "runs"), "sigterm")
    config = ClusterConfig(
        num_workers=2,
        resources_per_worker=TRAINER,
        storage_path=str(tmp_path / "runs"),
        run_name="sigterm",
        max_failures=3,
        preemption_check_steps=2,
        steward_poll_seconds=0.5,
    )
    metadata = FakeMetadata().start()  # IMDS answers, with no notice: the SIGTERM alone must do it
    log = (tmp_path / "agent.log").open("w")
    relay = str(Path(sys.executable).with_name("relay"))
    victim = nodes[0]
    argv = [relay, "spot-agent", "--cloud", "aws", "--aws-endpoint", metadata.url, "--interval", "0.2"]
    argv += ["--ray-address", cluster.address, "--node-id", victim.node_id, "--sigterm-grace", "60"]
    # Without --node-id on a machine with several Ray nodes: one line that says what to pass, no traceback.
    unsure = subprocess.run(argv[: argv.index("--node-id")], capture_output=True, text=True, timeout=120)
    lines = [line for line in (unsure.stdout + unsure.stderr).splitlines() if "spot agent" in line or "Traceback" in line]
    assert unsure.returncode == 1 and len(lines) == 1 and "pass --node-id" in lines[0], unsure.stdout + unsure.stderr
    agent = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    results = []
    thread = threading.Thread(target=lambda: results.append(launch(path, {}, config)), daemon=True)
    try:
        _wait_for("the agent to watch", lambda: "watching" in (tmp_path / "agent.log").read_text(), 120)
        thread.start()
        _wait_for("a committed checkpoint", lambda: _events(storage, "checkpoint"))
        agent.send_signal(signal.SIGTERM)  # the pod is being deleted
        assert agent.wait(timeout=60) == 0, (tmp_path / "agent.log").read_text()
        _wait_for("the emergency checkpoint", lambda: _events(storage, "emergency_checkpoint"))
        cluster.remove_node(victim)  # the grace runs out
        nodes[0] = cluster.add_node(num_cpus=1, resources=TRAINER)
        thread.join(timeout=600)
    finally:
        if agent.poll() is None:
            agent.kill()
        metadata.close()
        log.close()
    assert results and results[0].error is None, results and results[0].error
    agent_log = (tmp_path / "agent.log").read_text()
    assert "signal notice: sigterm" in agent_log and "Traceback" not in agent_log, agent_log
    assert ("GET", "/latest/meta-data/spot/instance-action") in metadata.requests  # watched IMDS; no notice there
    notice, emergency = _events(storage, "preemption_notice"), _events(storage, "emergency_checkpoint")
    attempts = _events(storage, "attempt")
    assert len(notice) == 1 and len(emergency) == 1 and len(attempts) == 2
    assert emergency[0]["step"] == notice[0]["step"] == attempts[1]["step"] and emergency[0]["committed"]
    assert attempts[1]["steps_lost"] == 0 and attempts[1]["reason"] == "preemption"
    assert 30 < notice[0]["deadline"] - notice[0]["time"] <= 60  # the grace the pod had left, as the deadline
    assert summarize("sigterm", Ledger(storage).events).state == "completed"


def test_prestop_drain_now_holds_the_pod_until_its_workers_leave(fake_cluster):
    """The Ray container's preStop hook (infra/k8s/rayjob.yaml): drain now, then hold (the container's SIGTERM
    waits for the hook) while Ray work still runs on the node; return once it has left."""
    import ray

    cluster, nodes = fake_cluster
    node = nodes[0]

    @ray.remote(num_cpus=0, resources=TRAINER)
    class Worker:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    workers = [Worker.remote() for _ in nodes]
    assert node.node_id in ray.get([w.node.remote() for w in workers])
    mine = next(w for w in workers if ray.get(w.node.remote()) == node.node_id)
    relay = str(Path(sys.executable).with_name("relay"))
    argv = [relay, "spot-agent", "--drain-now", "--sigterm-grace", "90", "--ray-address", cluster.address]
    hook = subprocess.Popen([*argv, "--node-id", node.node_id], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(6)  # three of the hook's 2 s looks at the node, each finding the worker there
        assert hook.poll() is None, "the hook returned while the node's worker was still running: " + hook.stdout.read()
        ray.kill(mine)  # Ray Train tears the group down
        start = time.monotonic()
        assert hook.wait(timeout=60) == 0
        assert time.monotonic() - start < 30, "the hook held on after the workers left"
        assert "its workers left" in hook.stdout.read()
    finally:
        if hook.poll() is None:
            hook.kill()
    # Drained: the node's free train slot takes no new work.
    ready, _ = ray.wait([Worker.remote().node.remote()], timeout=10)
    assert not ready, "a drained node accepted a new worker"


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

        def committed_since_the_last_attempt(step: int) -> bool:
            since = _events(storage, "attempt")[-1]["time"]
            return any(e["time"] > since and e["step"] == step for e in _events(storage, "checkpoint"))

        storage = RunStorage(str(tmp_path / "runs"), "elastic")
        results = []
        thread = threading.Thread(target=lambda: results.append(launch(path, {}, config("elastic", [1, 2]))), daemon=True)
        thread.start()
        _wait_for("a 1-worker attempt", lambda: any(e["world_size"] == 1 for e in _events(storage, "attempt")))
        _wait_for("1 worker's checkpoint 20", lambda: committed_since_the_last_attempt(20))
        nodes.append(cluster.add_node(num_cpus=1, resources=TRAINER))  # capacity arrives: grow
        _wait_for("the group to grow", lambda: any(e["world_size"] == 2 for e in _events(storage, "attempt")))
        loop_hold.at(40)
        _wait_for("2 workers' checkpoint 40", lambda: committed_since_the_last_attempt(40))
        cluster.remove_node(nodes.pop())  # and goes again: shrink
        _wait_for("the group to shrink", lambda: _events(storage, "attempt")[-1]["world_size"] == 1)
        loop_hold.release()  # only now: a worker outliving its node by a second must not train on with the other
        thread.join(timeout=900)
        assert results and results[0].error is None, results and results[0].error
    finally:
        ray.shutdown()
        cluster.shutdown()

    attempts = _events(storage, "attempt")
    sizes = [e["world_size"] for e in attempts]
    resizes = _events(storage, "resize")
    assert sizes[0] == 1 and 2 in sizes and sizes[-1] == 1, sizes
    assert [(r["previous_world_size"], r["world_size"]) for r in resizes][:2] == [(1, 2), (2, 1)]
    assert [e["step"] for e in attempts] == [0, 20, 40], attempts  # each size trained its share
    # a fixed 2-worker run: the same trainer on 2 ranks without Ray (a Ray run of it ends with the same bits)
    fixed = train_ranks(config_file(out="fixed", **recipe), tmp_path / "fixed.pt", free_port())
    a, b = fixed["adapter"], _adapter(results[0])
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"elastic {sizes} vs fixed 2 workers: adapter max abs diff {diff:.3e}")
    assert diff < 1e-4
