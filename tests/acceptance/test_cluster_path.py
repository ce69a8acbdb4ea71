"""The README's cluster command against a running head, storage on S3 (moto on loopback), and the
spot agent as its own process: what a user types, as processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from support.polling import training_past

pytestmark = pytest.mark.slow

SUBMIT = "ray job submit --working-dir . -- python jobs/train.py --config {config} --cluster {cluster}"  # as the README


def _cluster(tmp_path, name: str, bucket: str, endpoint: str, **extra) -> str:
    path = tmp_path / f"cluster-{name}.json"
    path.write_text(
        json.dumps(
            {
                "num_workers": 1,
                "storage_path": f"s3://{bucket}/runs",
                "storage_endpoint_url": endpoint,
                "run_name": name,
                "max_failures": 3,
                "preemption_check_steps": 5,
                **extra,
            }
        )
    )
    return str(path)


def _status(clone, run: str, bucket: str, endpoint: str, env: dict) -> dict | None:
    return clone.status(run, f"s3://{bucket}/runs", env, "--endpoint", endpoint)


def test_ray_job_submit_status_while_it_trains_then_resubmitted_done_shorter_refused_longer_resumes(
    fresh_clone, head, user_files, s3_bucket, s3_endpoint, background, poll, loop_hold, tmp_path
):
    """One run on S3, submitted four times: status while it trains; the same job again is done (nothing
    trained, nothing replayed); a shorter one is refused with the step to use; a longer one resumes."""
    address, _, _, env = head
    client, bucket = s3_bucket
    cluster = _cluster(tmp_path, "job", bucket, s3_endpoint)
    env = {**env, "RAY_ADDRESS": address}

    def submit(extra: str, submission_id: str | None = None) -> tuple[subprocess.CompletedProcess, float]:
        command = SUBMIT.format(config=user_files, cluster=cluster)
        if submission_id:  # named, for `ray job status` to read its own exit code
            command = command.replace(" --working-dir", f" --submission-id {submission_id} --working-dir")
        start = time.monotonic()
        got = subprocess.run(
            ["bash", "-c", f"{command} {extra}"], cwd=fresh_clone.root, env=env, capture_output=True, text=True, timeout=900
        )
        return got, time.monotonic() - start

    loop_hold.at(20)  # the job's workers wait there until status has seen them train
    job = background(
        [
            "bash",
            "-c",
            loop_hold.submitted(SUBMIT.format(config=user_files, cluster=cluster))
            + " --set max_train_steps=40 --set checkpointing_steps=20",
        ],
        cwd=fresh_clone.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    status = lambda: _status(fresh_clone, "job", bucket, s3_endpoint, env)  # noqa: E731
    seen = poll("relay status to show the run training", training_past(job, status, 0), timeout=600)
    assert seen["total_steps"] == 40 and seen["storage"] == f"s3://{bucket}/runs/job"
    loop_hold.release()
    out, _ = job.communicate(timeout=900)
    assert job.returncode == 0, out[-5000:]
    assert "succeeded" in out and "completed at step 40" in out and "checkpoint 40 committed: s3://" in out
    assert "(RayTrainWorker" not in out and "PlacementGroupCleaner" not in out  # the driver's view only

    same, took = submit("--set max_train_steps=40 --set checkpointing_steps=20")
    out = same.stdout + same.stderr
    print(f"\nresubmitted unchanged ({took:.0f} s): " + next((ln for ln in out.splitlines() if "already" in ln), ""))
    assert same.returncode == 0, out[-4000:]
    assert "run 'job' already completed at step 40; nothing to train" in out
    assert "checkpoint 20 committed" not in out and "goodput" not in out  # no replayed history (the completed line)
    report = status()
    assert report["state"] == "completed" and len(report["attempts"]) == 1  # no restart counted

    shorter, took = submit("--set max_train_steps=20 --set checkpointing_steps=20", "job-shorter")
    out = shorter.stdout + shorter.stderr
    print(f"shorter ({took:.0f} s): " + next((ln for ln in out.splitlines() if "already at step" in ln), ""))
    assert shorter.returncode == 1, out[-4000:]
    assert "run 'job' is already at step 40" in out and "set max_train_steps to 40 or more" in out
    assert "resume_from_checkpoint none" not in out and "checkpoint_tmp" not in out and "Traceback" not in out
    said = fresh_clone.run(f"ray job status job-shorter --address {address}", timeout=120, **env)
    assert "failed with exit code 2" in said.stdout + said.stderr  # the job's own code (README)
    assert status()["state"] == "completed"  # the run is as it was

    longer, _ = submit("--max_train_steps=50 --checkpointing_steps=10")  # config keys as flags too
    out = longer.stdout + longer.stderr
    assert longer.returncode == 0, out[-5000:]
    assert "resumed at step 40 (resubmitted" in out and "completed at step 50" in out
    assert "checkpoint 20 committed" not in out and "checkpoint 40 committed" not in out  # only this job's news
    final = status()
    assert final["state"] == "completed" and final["step"] == 50 and final["checkpoints"][-1] == 50
    assert [a["reason"] for a in final["attempts"]] == ["fresh", "resubmitted"]
    state = json.loads(client.get_object(Bucket=bucket, Key="runs/job/checkpoint-50/training_state.json")["Body"].read())
    assert state["resumed_at"] == [40]  # the loop itself resumed there (the checkpoint's own record)


def test_a_spot_notice_checkpoints_loses_no_step_and_resumes(
    fresh_clone, cluster_head, head, user_files, s3_bucket, s3_endpoint, background, poll, webhook_receiver, loop_hold, tmp_path
):
    from support.fake_imds import FakeMetadata  # tests/support/

    address, gcs, start_node, env = head
    _, bucket = s3_bucket
    env = {**env, "RAY_ADDRESS": address}
    node = start_node({"spot": 1})

    def spot_nodes() -> list[str]:
        return [n["NodeID"] for n in cluster_head.alive(fresh_clone.python) or [] if n["Resources"].get("spot")]

    spot_node = poll("the spot node to join", lambda: (ids := spot_nodes()) and ids[0], timeout=120)
    imds = FakeMetadata()
    imds.start()
    try:
        agent = background(
            [
                fresh_clone.relay,
                "spot-agent",
                "--cloud",
                "aws",
                "--aws-endpoint",
                imds.url,
                "--ray-address",
                gcs,
                "--node-id",
                spot_node,
                "--interval",
                "0.5",
            ],
            cwd=fresh_clone.root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        hook = json.dumps({"webhook_type": "raw", "callback_url": webhook_receiver.url("/relay"), "log_level": "info"})
        cluster = _cluster(tmp_path, "spot", bucket, s3_endpoint, resources_per_worker={"spot": 1}, max_failures=1)
        loop_hold.at(20)  # the run waits at step 20 until the notice is out
        job = background(
            [
                "bash",
                "-c",
                loop_hold.submitted(SUBMIT.format(config=user_files, cluster=cluster))
                + f" --set max_train_steps=440 --set checkpointing_steps=1000 --set 'webhook_config={hook}'",
            ],
            cwd=fresh_clone.root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        status = lambda: _status(fresh_clone, "spot", bucket, s3_endpoint, env)  # noqa: E731
        poll("training to pass step 10", training_past(job, status, 10), timeout=600)
        imds.announce(seconds=30)
        loop_hold.at(420)  # on again, for the notice to reach it; no further before it restarts

        def emergency_checkpoint():
            if job.poll() is not None:
                agent.kill()
                pytest.fail(
                    f"the job ended before its emergency checkpoint ({job.returncode}):\n"
                    f"{job.communicate()[0][-3000:]}\nagent:\n{agent.communicate()[0][-2000:]}"
                )
            return (s := status()) and s["emergency_checkpoints"] and s

        report = poll("the emergency checkpoint", emergency_checkpoint, timeout=180)
        emergency = report["emergency_checkpoints"][0]["step"]
        agent_out, _ = agent.communicate(timeout=60)
        assert agent.returncode == 0, agent_out[-2000:]  # it drained the node, and is done
        os.killpg(node.pid, signal.SIGKILL)  # the cloud takes the node...
        start_node({"spot": 1})  # ...and capacity comes back as a new one
        loop_hold.release()
        out, _ = job.communicate(timeout=900)
    finally:
        imds.close()
    assert job.returncode == 0, out[-5000:]
    assert f"preemption notice at step {emergency}" in out and f"resumed at step {emergency} (preempted" in out
    final = _status(fresh_clone, "spot", bucket, s3_endpoint, env)
    assert final["state"] == "completed" and final["step"] == 440
    resumed = final["attempts"][1]
    assert resumed["reason"] == "preemption" and resumed["start_step"] == emergency and final["attempts"][0]["steps_lost"] == 0
    kinds = [r.json["type"] for r in webhook_receiver.requests]
    assert "preemption_notice" in kinds and "resumed" in kinds and kinds[-1] == "completed", kinds
