"""The cluster path as a user meets it, as processes typed the way the README writes them: the demo's
configs submitted as they are, a node lost with `relay status` read during the outage, and a head
restarted under `relay supervise` (a run resubmitted after it completed, or with fewer steps: test_cluster_path)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
from support.polling import training_past
from support.ray_nodes import head_command

pytestmark = pytest.mark.slow

SUBMIT = "ray job submit --submission-id {id} --working-dir . -- python jobs/train.py --config {config} --cluster {cluster}"


def _cluster(tmp_path, name: str, **extra) -> str:
    path = tmp_path / f"cluster-{name}.json"
    storage = str(tmp_path / "runs")  # absolute: the job runs in Ray's copy of the folder
    path.write_text(
        json.dumps({"num_workers": 1, "storage_path": storage, "run_name": name, "preemption_check_steps": 5, **extra})
    )
    return str(path)


def _status(clone, run: str, tmp_path, env: dict, as_json: bool = True):
    return clone.status(run, str(tmp_path / "runs"), env, as_json=as_json)


def _hook(receiver) -> str:
    return (
        "'webhook_config="
        + json.dumps({"webhook_type": "raw", "callback_url": receiver.url("/relay"), "log_level": "info"})
        + "'"
    )


def test_the_demo_configs_submitted_as_they_are_are_refused_before_any_worker(fresh_clone, head, webhook_receiver):
    """`cp -r configs/demo configs/mine`, then the README's submit: relative storage_path and output_dir
    would live in Ray's temporary copy, and demo/ (the model, the images) is gitignored, so never uploaded."""
    address, _, _, env = head
    env = {**env, "RAY_ADDRESS": address}
    copied = fresh_clone.run("rm -rf configs/mine && cp -r configs/demo configs/mine", timeout=60)
    assert copied.returncode == 0, copied.stderr
    command = SUBMIT.format(id="mine-relative", config="configs/mine/config.json", cluster="configs/mine/cluster.json")
    start = time.monotonic()
    got = subprocess.run(
        ["bash", "-c", f"{command} --set {_hook(webhook_receiver)}"],
        cwd=fresh_clone.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    took = time.monotonic() - start
    out = got.stdout + got.stderr
    print(f"\nrefused in {took:.0f} s:\n" + "\n".join(line for line in out.splitlines() if line.startswith("  - ")))
    assert got.returncode == 1, out[-4000:]  # Ray's CLI: 1 for any failed job (README)
    assert "storage_path 'output/ray' is relative, and this job runs in Ray's temporary copy" in out, out[-4000:]
    assert "output_dir 'output/demo' is relative" in out
    assert ".gitignore lists it, so `ray job submit --working-dir` did not upload it" in out
    assert "Traceback" not in out and "RayTrainWorker" not in out and "WorkerGroupError" not in out
    assert took < 240, took  # no worker started, nothing retried (the submit's own upload included)
    status = fresh_clone.run(f"ray job status mine-relative --address {address}", timeout=120, **env)
    assert "failed with exit code 2" in status.stdout + status.stderr  # the job's own code (README)
    sent = webhook_receiver.wait_for(1, timeout=30)
    alert = sent[-1].json
    assert alert["severity"] == "error" and alert["type"] == "failure", alert
    assert "storage_path 'output/ray' is relative" in alert["message"]
    assert "/tmp/ray" not in alert["message"] and "_ray_pkg_" not in alert["message"] and "Traceback" not in alert["message"]


def test_a_node_lost_reads_as_an_outage_in_status_then_resumes(
    fresh_clone, head, user_files, webhook_receiver, background, poll, loop_hold, tmp_path
):
    address, _, start_node, env = head
    env = {**env, "RAY_ADDRESS": address}
    node = start_node({"spot": 1})
    # an outage reads as one after 15 s without a step (the cluster's stall_seconds), not the default minute
    cluster = _cluster(tmp_path, "lost", resources_per_worker={"spot": 1}, max_failures=3, stall_seconds=15)
    command = loop_hold.submitted(SUBMIT.format(id="lost-1", config=user_files, cluster=cluster))
    loop_hold.at(40)  # the node goes while the run is at step 40, however fast its steps
    job = background(
        ["bash", "-c", f"{command} --set max_train_steps=60 --set checkpointing_steps=20 --set {_hook(webhook_receiver)}"],
        cwd=fresh_clone.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    poll("training to pass step 30", training_past(job, lambda: _status(fresh_clone, "lost", tmp_path, env), 30), 600)
    os.killpg(node.pid, signal.SIGKILL)  # the node is gone without notice

    def outage():
        text = _status(fresh_clone, "lost", tmp_path, env, as_json=False)
        return text and ("[stalled: last step" in text or "[waiting for capacity: last step" in text) and text

    shown = poll("relay status to report the outage", outage, timeout=300, every=5)
    print("\nduring the outage: " + shown.splitlines()[0])
    assert " at " in shown.splitlines()[0] and "ETA -" in shown, shown
    loop_hold.release()  # only now: a worker outliving its node by a second must not run on to the end
    start_node({"spot": 1})  # capacity comes back
    out, _ = job.communicate(timeout=900)
    assert job.returncode == 0, out[-5000:]
    assert "waiting for capacity" in out and "(a node was lost" in out
    final = _status(fresh_clone, "lost", tmp_path, env)
    assert final["state"] == "completed" and final["attempts"][-1]["reason"] == "node_lost"
    alerts = [r.json for r in webhook_receiver.requests if r.json["severity"] == "error"]
    kinds = {a["type"] for a in alerts}
    assert "node_lost" in kinds, [a["message"] for a in alerts]
    back = next(a for a in alerts if a["message"].startswith("a node was lost without notice"))
    assert "step(s) lost; back at step" in back["message"] and "?" not in back["message"]


@pytest.fixture
def own_head(fresh_clone, background, free_port, loop_hold):
    """A head of this test's own, on fixed ports so that it can be lost and started again where the
    supervisor looks for it; its processes (the jobs' drivers and workers) have the test's loop_hold.
    RAY_AUTH_MODE=disabled: the README's way past the token Ray 2.60 may leave in ~/.ray/auth_token, which
    a restarted head would otherwise demand (InvalidAuthToken)."""
    import tempfile

    env = fresh_clone.env(PATH=f"{fresh_clone.root / '.venv/bin'}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled")
    temp = tempfile.mkdtemp(prefix="rh")
    dashboard = free_port()
    node_ports = [
        f"--{flag}={free_port()}"
        for flag in (
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
        )
    ]
    command = head_command(fresh_clone.ray, free_port(), dashboard, temp, node_ports)

    def start() -> subprocess.Popen:
        return background(command, env=env, cwd=fresh_clone.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    yield f"http://127.0.0.1:{dashboard}", start, env


def test_a_head_lost_under_supervise_is_resubmitted_and_reported(
    fresh_clone, own_head, loop_hold, user_files, webhook_receiver, background, poll, tmp_path
):
    address, start_head, env = own_head
    loop_hold.at(40)  # the head goes while the run is at step 40, however fast its steps
    head = start_head()
    cluster = _cluster(tmp_path, "headless")
    supervisor = background(
        [
            "bash",
            "-c",
            f".venv/bin/relay supervise --address {address} --config {user_files} --cluster {cluster} "
            f"--set max_train_steps=60 --set checkpointing_steps=20 --set {_hook(webhook_receiver)} "
            "--backoff 1 --poll 1 --head-wait 300",
        ],
        cwd=fresh_clone.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    status = lambda: _status(fresh_clone, "headless", tmp_path, env)  # noqa: E731
    poll("training to pass step 30", training_past(supervisor, status, 30), timeout=600)
    os.killpg(head.pid, signal.SIGKILL)  # the head is lost, and the job's driver with it
    time.sleep(3)
    start_head()  # a replacement on the same address
    poll("the resubmitted job's attempt", lambda: (s := status()) and len(s["attempts"]) >= 2, timeout=600)
    loop_hold.release()  # the killed head's workers are long gone: the new attempt goes on to the end
    out, _ = supervisor.communicate(timeout=900)
    assert supervisor.returncode == 0, out[-5000:]
    print("\n" + "\n".join(ln for ln in out.splitlines() if "head unreachable" in ln or "the head was lost" in ln))
    assert "head unreachable" in out and "submitted as" in out
    # the job's own lines, followed (which checkpoints the killed job's log still delivered depends on timing)
    assert "step " in out and re.search(r"checkpoint \d+ committed", out)
    assert "completed at step 60" in out  # the ended job's last lines are echoed before the supervisor says so
    assert "(the head was lost" in out and "InvalidAuthToken" not in out
    final = _status(fresh_clone, "headless", tmp_path, env)
    assert final["state"] == "completed" and final["attempts"][-1]["reason"] == "head_lost"
    alerts = [r.json for r in webhook_receiver.requests if r.json["type"] == "head_lost"]
    assert alerts and alerts[0]["severity"] == "error" and "step(s) lost; back at step" in alerts[0]["message"]
