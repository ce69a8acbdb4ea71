"""Spot preemption end to end on a fake multi-node cluster (one for the module): the chaos run takes three
preemptions, a cloud notice (fake IMDS on loopback) drained by the spot agent, a SIGTERM to the node's
`relay spot-agent` process, and a node that simply goes; the first two checkpoint at once and lose no step,
and the run ends bitwise equal to an uninterrupted one. Then the pod's preStop hook, which holds until the
node's workers have left."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from orchestrator.ops import spot
from orchestrator.core.cluster import ClusterConfig
from orchestrator.run.launch import launch
from orchestrator.core.ledger import Ledger, summarize
from orchestrator.core.store import RunStorage
from support.checkpoints import result_adapter  # tests/ is on sys.path (conftest rootdir)
from support.fake_imds import FakeMetadata
from support.ledger import checkpointed_since_the_last_attempt, events
from support.polling import wait_for
from support.ranks import train_ranks

pytestmark = pytest.mark.slow
TRAINER = {"trainer": 1}


@pytest.fixture(scope="module")
def fake_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=1, resources=TRAINER) for _ in range(2)]
    ray.init(address=cluster.address)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


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


def _agent_argv(cluster, metadata: FakeMetadata, node_id: str | None) -> list[str]:
    """`relay spot-agent` as infra/ starts it on a node: IMDS watched, a SIGTERM drains with the grace left."""
    relay = str(Path(sys.executable).with_name("relay"))
    argv = [relay, "spot-agent", "--cloud", "aws", "--aws-endpoint", metadata.url, "--interval", "0.2"]
    argv += ["--ray-address", cluster.address, "--sigterm-grace", "60"]
    return argv + (["--node-id", node_id] if node_id else [])


def test_chaos_three_preemptions_end_bitwise_equal(fake_cluster, config_file, tmp_path, webhook_receiver, free_port):
    """Three preemptions of one run: an IMDS notice; an eviction that reaches the node's agent process as a
    SIGTERM, not a notice (EKS capacity rebalancing, Karpenter, a stopped unit), drained with the grace the pod
    has left; and a node that simply goes. The first two checkpoint at once and lose no step, the third goes
    back to the newest commit; the run ends bitwise equal to an uninterrupted one."""
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
    config = ClusterConfig(
        num_workers=2,
        resources_per_worker=TRAINER,
        storage_path=str(tmp_path / "runs"),
        run_name="chaos",
        max_failures=3,
        preemption_check_steps=2,
        steward_poll_seconds=0.5,
    )
    storage = RunStorage(str(tmp_path / "runs"), "chaos")
    results = []
    thread = threading.Thread(target=lambda: results.append(launch(path, {}, config)), daemon=True)
    metadata = FakeMetadata().start()  # the agent's IMDS answers, with no notice: its SIGTERM alone must do it
    agent_log = tmp_path / "agent.log"
    with agent_log.open("w") as sink:
        agent = subprocess.Popen(_agent_argv(cluster, metadata, nodes[1].node_id), stdout=sink, stderr=subprocess.STDOUT)
    try:
        thread.start()
        # Without --node-id on a machine with several Ray nodes: one line that says what to pass, no traceback.
        unsure = subprocess.run(_agent_argv(cluster, metadata, None), capture_output=True, text=True, timeout=120)
        said = unsure.stdout + unsure.stderr
        lines = [line for line in said.splitlines() if "spot agent" in line or "Traceback" in line]
        assert unsure.returncode == 1 and len(lines) == 1 and "pass --node-id" in lines[0], said
        wait_for("the agent to watch", lambda: "watching" in agent_log.read_text(), 120, every=0.2)
        for n, how in enumerate(("notice", "sigterm", "unannounced"), start=1):
            wait_for(f"attempt {n}", lambda n=n: len(events(storage, "attempt")) >= n, 300, every=0.2)
            victim = nodes[0] if n != 2 else nodes[1]
            if how == "notice":
                notice = _announce_and_drain(cluster, victim)
                assert notice is not None and notice.cloud == "aws"
            else:  # the restarted run commits once first
                wait_for("a checkpoint after the restart", lambda: checkpointed_since_the_last_attempt(storage), 300, every=0.2)
            if how == "sigterm":  # the pod is being deleted
                agent.send_signal(signal.SIGTERM)
                assert agent.wait(timeout=60) == 0, agent_log.read_text()
            if how != "unannounced":  # no warning for the third: the node simply goes
                emergencies = lambda n=n: len(events(storage, "emergency_checkpoint")) >= n  # noqa: E731
                wait_for("the emergency checkpoint", emergencies, 300, every=0.2)
            cluster.remove_node(victim)  # the cloud takes the node, or its grace runs out (main thread, as Ray requires)
            nodes[nodes.index(victim)] = cluster.add_node(num_cpus=1, resources=TRAINER)  # capacity returns
        thread.join(timeout=900)
    finally:
        if agent.poll() is None:
            agent.kill()
        metadata.close()
    assert results and results[0].error is None, results and results[0].error

    said = agent_log.read_text()
    assert "signal notice: sigterm" in said and "Traceback" not in said, said
    assert ("GET", "/latest/meta-data/spot/instance-action") in metadata.requests  # watched IMDS; no notice there
    notices, emergencies = events(storage, "preemption_notice"), events(storage, "emergency_checkpoint")
    attempts = events(storage, "attempt")
    assert len(notices) == 2 and len(emergencies) == 2 and len(attempts) == 4
    for notice, emergency, resumed in zip(notices, emergencies, attempts[1:3]):
        assert emergency["step"] == notice["step"] == resumed["step"]  # checkpointed at the notice, resumed there
        assert emergency["committed"] and resumed["steps_lost"] == 0 and resumed["reason"] == "preemption"
    assert 30 < notices[1]["deadline"] - notices[1]["time"] <= 60  # the grace the pod had left, as the deadline
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
        result_adapter(results[0]),
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
