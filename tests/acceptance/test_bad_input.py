"""Bad input at the front door gets one clear message and a documented exit code, never a traceback or
an endless wait: a request the cluster can never hold, a cluster that does not answer, a run that is not
there."""

from __future__ import annotations

import subprocess
import time

import pytest

pytestmark = pytest.mark.slow


def test_a_request_that_can_never_fit_a_local_cluster_fails_at_once(fresh_clone, user_files, tmp_path) -> None:
    start = time.monotonic()
    got = fresh_clone.run(
        f".venv/bin/relay launch --config {user_files} --cluster-set num_workers=2 "
        f"--cluster-set cpus_per_worker=4 --cluster-set storage_path={tmp_path / 'runs'}",
        timeout=300,
    )
    assert got.returncode == 2, got.stderr[-3000:]
    err = got.stderr
    assert "cannot start: the run asks for 2 training worker(s) × {4 CPU}" in err, err[-2000:]
    assert "cpus_per_worker" in err and "Traceback" not in err
    assert time.monotonic() - start < 120  # seconds, not Ray Train's start-up retries without end


def test_a_cluster_that_does_not_grow_in_time_fails_with_what_it_waited_for(fresh_clone, user_files, tmp_path) -> None:
    got = fresh_clone.run(
        f".venv/bin/relay launch --config {user_files} --cluster-set autoscaling=true "
        "--cluster-set resource_wait_seconds=6 --cluster-set 'resources_per_worker={\"gpu_node\": 1}' "
        f"--cluster-set storage_path={tmp_path / 'runs'}",
        timeout=300,
    )
    assert got.returncode == 1, got.stderr[-3000:]  # a retry may help: the cluster may grow later
    assert "waiting up to 6 s for the cluster to grow" in got.stderr and "waited 6 s" in got.stderr
    assert "1 gpu_node" in got.stderr and "Traceback" not in got.stderr


def test_an_unreachable_ray_address_is_one_line(fresh_clone, user_files, free_port) -> None:
    port = free_port()
    got = subprocess.run(
        [fresh_clone.relay, "launch", "--config", str(user_files)],
        cwd=fresh_clone.root,
        env=fresh_clone.env(RAY_ADDRESS=f"127.0.0.1:{port}"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert got.returncode == 1, got.stderr[-3000:]
    assert f"cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:{port}" in got.stderr
    assert "Traceback" not in got.stderr


def test_a_second_launch_of_a_running_run_is_refused_naming_the_holder(fresh_clone, user_files, tmp_path) -> None:
    """Another `relay launch` holds the run (here a process holding its lock, as a launch does for its life)."""
    lock = tmp_path / "runs/held/relay/.relay-train.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            fresh_clone.python,
            "-c",
            (
                "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
                "f.write('pid 4242 on elsewhere\\n'); f.flush(); print('held', flush=True); time.sleep(600)"
            ),
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        got = fresh_clone.run(
            f".venv/bin/relay launch --config {user_files} --cluster-set run_name=held "
            f"--cluster-set storage_path={tmp_path / 'runs'}",
            timeout=300,
        )
    finally:
        holder.kill()
    assert got.returncode == 4, got.stderr[-3000:]  # IN_USE, as relay train's output_dir lock
    assert "run 'held'" in got.stderr and "in use by another `relay launch` (pid 4242 on elsewhere)" in got.stderr
    assert "Traceback" not in got.stderr
