"""Acceptance tests: only what a user types, as processes, in a fresh clone of this working tree.

The session's clone is made once: `git clone` of the repository, with the working tree's uncommitted
changes and untracked files laid on top (so a developer tests what they see; CI's tree is clean), then
`bash scripts/setup.sh` in it, exactly as the README's first command does (pip's cache is reused).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Clone:
    root: Path
    setup_seconds: float

    @property
    def relay(self) -> str:
        return str(self.root / ".venv/bin/relay")

    @property
    def python(self) -> str:
        return str(self.root / ".venv/bin/python")

    @property
    def ray(self) -> str:
        return str(self.root / ".venv/bin/ray")

    def env(self, **extra: str) -> dict[str, str]:
        """The user's shell: no RAY_ADDRESS unless given, nothing of pytest's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST_"))}
        env.update(extra)
        return env

    def run(self, command: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
        """A shell command line in the clone, as a person would type it."""
        return subprocess.run(
            ["bash", "-c", command], cwd=self.root, env=self.env(**env), capture_output=True, text=True, timeout=timeout
        )


def _lay_working_tree(clone: Path) -> None:
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=REPO, capture_output=True, check=True).stdout
    if diff:
        subprocess.run(["git", "apply", "--whitespace=nowarn"], cwd=clone, input=diff, check=True)
    untracked = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for rel in filter(None, untracked):
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, clone / rel)


@pytest.fixture(scope="session")
def fresh_clone(tmp_path_factory) -> Clone:
    root = tmp_path_factory.mktemp("clone") / "terminus-relay"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(root)], check=True, timeout=120)
    _lay_working_tree(root)
    start = time.monotonic()
    setup = subprocess.run(["bash", "scripts/setup.sh"], cwd=root, capture_output=True, text=True, timeout=900)
    assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
    clone = Clone(root, time.monotonic() - start)
    print(f"\nsetup.sh in a fresh clone: {clone.setup_seconds:.0f} s")
    return clone


@pytest.fixture
def background():
    """Start processes in their own process group; every one is stopped at teardown."""
    started: list[subprocess.Popen] = []

    def start(args: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(args, start_new_session=True, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)


@pytest.fixture
def head(fresh_clone, background, tmp_path_factory):
    """`ray start --head` on loopback with the clone's venv first on PATH (so a job's `python` is the
    clone's), in its own process group. Yields (dashboard address, GCS address, start_node): start_node
    adds a worker node with the given custom resources and returns its process."""
    import socket

    def free() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    gcs, dashboard = free(), free()
    temp = tempfile.mkdtemp(prefix="ra")  # short: Ray's socket paths must fit 107 characters
    env = fresh_clone.env(PATH=f"{fresh_clone.root / '.venv/bin'}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled")
    common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]

    def own_ports() -> list[str]:
        """Every per-node port Ray would otherwise take at a fixed default (the dashboard agent's 52365, the
        client server's 10001, ...): two nodes on one machine, or another cluster there, must not collide."""
        return [
            f"--{name}={free()}"
            for name in (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
                "metrics-export-port",
            )
        ]

    background(
        [
            fresh_clone.ray,
            "start",
            "--head",
            f"--port={gcs}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--temp-dir={temp}",
            f"--ray-client-server-port={free()}",
            *own_ports(),
            *common,
        ],
        env=env,
        cwd=fresh_clone.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dashboard}"

    def answers() -> bool:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    wait_for("the Ray head's job API", answers, timeout=180)

    def takes_jobs() -> bool:  # a fresh head answers "no available agent" to submissions for a while
        probe = subprocess.run(
            [fresh_clone.ray, "job", "submit", f"--address={address}", "--", "true"],
            env=env,
            cwd=tempfile.gettempdir(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        return probe.returncode == 0

    wait_for("the Ray head to take jobs", takes_jobs, timeout=240, every=3)

    def start_node(resources: dict[str, float], cpus: int = 1) -> subprocess.Popen:
        # a temp dir of its own: nodes sharing one on a machine would clear each other's job working dirs
        own = tempfile.mkdtemp(prefix="rn")
        temps.append(own)
        return background(
            [
                fresh_clone.ray,
                "start",
                f"--address=127.0.0.1:{gcs}",
                f"--num-cpus={cpus}",
                f"--resources={json.dumps(resources)}",
                f"--temp-dir={own}",
                *own_ports(),
                *common,
            ],
            env=env,
            cwd=fresh_clone.root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    temps = [temp]
    yield address, f"127.0.0.1:{gcs}", start_node, env
    for folder in temps:
        shutil.rmtree(folder, ignore_errors=True)


def wait_for(what: str, check, timeout: float, every: float = 1.0):
    """Poll `check()` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def poll():
    """wait_for, for the tests: poll(what, check, timeout)."""
    return wait_for


@pytest.fixture
def user_files(fresh_clone, tmp_path):
    """A user's own recipe for a cluster: the demo's config with the model, the data and the caches at
    absolute paths (a job's working directory is a copy), made with the user's commands where missing."""
    root = fresh_clone.root
    for command, marker in (
        (".venv/bin/relay make-tiny-model demo/tiny-sd3", "demo/tiny-sd3/model_index.json"),
        (".venv/bin/relay make-demo-data demo/data", "demo/data"),
    ):
        if not (root / marker).exists():
            made = fresh_clone.run(command, timeout=300)
            assert made.returncode == 0, made.stderr[-2000:]
    backends = json.loads((root / "configs/demo/multidatabackend.json").read_text())
    backends[0]["instance_data_dir"] = str(root / "demo/data")
    backends[0]["cache_dir_vae"] = str(tmp_path / "cache/vae")
    backends[1]["cache_dir"] = str(tmp_path / "cache/text")
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    config = json.loads((root / "configs/demo/config.json").read_text())
    config.update(
        {
            "--pretrained_model_name_or_path": str(root / "demo/tiny-sd3"),
            "--data_backend_config": str(tmp_path / "multidatabackend.json"),
            "--lycoris_config": str(root / "configs/demo/lycoris_config.json"),
            "--output_dir": str(tmp_path / "out"),
            "--validation_steps": 0,
        }
    )
    (tmp_path / "config.json").write_text(json.dumps(config, indent=1))
    return tmp_path / "config.json"
