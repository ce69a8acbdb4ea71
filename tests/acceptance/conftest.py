"""Acceptance tests: only what a user types, as processes, in a fresh clone of this working tree.

The session's clone is made once: `git clone` of the repository, with the working tree's uncommitted
changes and untracked files laid on top (so a developer tests what they see; CI's tree is clean), then
`bash scripts/setup.sh` in it, exactly as the README's first command does (pip's cache is reused).
Under CI (`RELAY_CI_VENV`, set by .ci/run, names the .venv that .ci/run's own setup.sh just built from a
fresh clone) the clone's .venv is a new venv that sees that one's packages, so setup.sh there installs
only the clone itself (seconds, not minutes): the clone still runs its own code and its own setup.sh.

Fixtures: `fresh_clone` (session), `cluster_head` (one `ray start --head` for the session), `head` (that
head for one test, with `start_node` for worker nodes that end with the test), `background`, `poll`,
`user_files`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import ports  # tests/support/
from support.polling import wait_for
from support.ray_nodes import NODE_COMMON, QUICK_NODE_DEATH, head_command, stop_group

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

    def status(self, run: str, storage: str, env: dict[str, str], *flags: str, as_json: bool = True):
        """`relay status RUN --storage S --no-hub [--json]` as typed: its JSON (or text), None if it failed."""
        got = subprocess.run(
            [self.relay, "status", run, "--storage", storage, *flags, "--no-hub", *(["--json"] if as_json else [])],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if got.returncode != 0:
            return None
        return json.loads(got.stdout) if as_json else got.stdout

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


CI_VENV_ENV = "RELAY_CI_VENV"


def _overlay_venv(root: Path, base: Path) -> None:
    """A .venv in the clone whose interpreter also sees `base`'s installed packages (a .pth line), and the
    console scripts of those packages (ray, ...) re-pointed at the clone's interpreter, as pip writes them."""
    subprocess.run([sys.executable, "-m", "venv", str(root / ".venv")], check=True, timeout=120)
    python = root / ".venv/bin/python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    base_purelib = subprocess.run(
        [str(base / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "_relay_ci_venv.pth").write_text(base_purelib + "\n")
    shebang = f"#!{base / 'bin/python'}"
    for script in (base / "bin").iterdir():
        target = root / ".venv/bin" / script.name
        if target.exists() or not script.is_file():
            continue
        with script.open("rb") as f:
            if not f.readline().decode(errors="replace").startswith(shebang):
                continue
        target.write_text(f"#!{python}\n" + script.read_text().split("\n", 1)[1])
        target.chmod(0o755)


@pytest.fixture(scope="session")
def fresh_clone(tmp_path_factory) -> Clone:
    root = tmp_path_factory.mktemp("clone") / "terminus-relay"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(root)], check=True, timeout=120)
    _lay_working_tree(root)
    start = time.monotonic()
    if base := os.environ.get(CI_VENV_ENV):
        _overlay_venv(root, Path(base))
    setup = subprocess.run(["bash", "scripts/setup.sh"], cwd=root, capture_output=True, text=True, timeout=900)
    assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
    clone = Clone(root, time.monotonic() - start)
    print(f"\nsetup.sh in a fresh clone{' over ' + CI_VENV_ENV if base else ''}: {clone.setup_seconds:.0f} s")
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


@dataclass
class Head:
    """The session's `ray start --head` on loopback; `env` has the clone's venv first on PATH."""

    address: str  # the dashboard / job API: http://127.0.0.1:PORT
    gcs: str  # 127.0.0.1:PORT, what `ray start --address` and ray.init take
    env: dict[str, str]

    ANSWER = "relay-test-answer: "

    def alive(self, python: str) -> list[dict] | None:
        """The nodes the head counts alive (NodeID, NodeManagerPort, Resources); None if it could not be asked.
        A driver's stdout also carries Ray's cluster events (a raylet's lagging heartbeats, under load), so the
        answer is read from its own tagged line, never from the last line."""
        ask = (
            f"import json, ray; ray.init(address={self.gcs!r}, logging_level='ERROR'); "
            "alive = [{k: n[k] for k in ('NodeID', 'NodeManagerPort', 'Resources')} for n in ray.nodes() if n['Alive']]; "
            f"print({self.ANSWER!r} + json.dumps(alive), flush=True)"
        )
        probe = subprocess.run([python, "-c", ask], env=self.env, capture_output=True, text=True, timeout=120)
        answers = [line.removeprefix(self.ANSWER) for line in probe.stdout.splitlines() if line.startswith(self.ANSWER)]
        return json.loads(answers[-1]) if probe.returncode == 0 and answers else None

    def alive_nodes(self, python: str, node_manager_port: int | None = None) -> int | None:
        """How many nodes the head counts alive (only the one on that node manager port, when given)."""
        nodes = self.alive(python)
        return None if nodes is None else sum(node_manager_port in (None, n["NodeManagerPort"]) for n in nodes)


@pytest.fixture(scope="session")
def cluster_head(fresh_clone, s3_endpoint):
    """One `ray start --head` (2 CPUs, loopback, its own ports and temp dir) for every acceptance test that
    needs a running cluster: started once, ready to take jobs, stopped with the session; a node killed
    outright counts as dead after ~3 s (QUICK_NODE_DEATH). Started after the
    S3 server: its processes (job drivers, workers) keep the environment of this moment, credentials included."""
    gcs, dashboard = ports.free_port(), ports.free_port()
    temp = tempfile.mkdtemp(prefix="ra")  # short: Ray's socket paths must fit 107 characters
    env = fresh_clone.env(
        PATH=f"{fresh_clone.root / '.venv/bin'}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled", **QUICK_NODE_DEATH
    )
    proc = subprocess.Popen(
        head_command(fresh_clone.ray, port=gcs, dashboard=dashboard, temp=temp),
        env=env,
        cwd=fresh_clone.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    head = Head(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", env)
    try:

        def answers() -> bool:
            try:
                urllib.request.urlopen(f"{head.address}/api/version", timeout=2)
                return True
            except urllib.error.HTTPError:
                return True
            except OSError:
                return False

        wait_for("the Ray head's job API", answers, timeout=180)

        def takes_jobs() -> bool:  # a fresh head answers "no available agent" to submissions for a while
            probe = subprocess.run(
                [fresh_clone.ray, "job", "submit", f"--address={head.address}", "--", "true"],
                env=env,
                cwd=tempfile.gettempdir(),
                capture_output=True,
                text=True,
                timeout=120,
            )
            return probe.returncode == 0

        wait_for("the Ray head to take jobs", takes_jobs, timeout=240, every=3)
        yield head
    finally:
        stop_group(proc, grace=5)  # the session is over: no job to let finish
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def head(fresh_clone, cluster_head):
    """The session's head for one test. Yields (dashboard address, GCS address, start_node, env): start_node
    adds a worker node with the given custom resources and returns its process once the head counts it alive
    (a job submitted sooner may be refused: nothing there fits it); the nodes a test added are stopped at its
    end, and the next test starts once the head counts them gone."""
    nodes: list[subprocess.Popen] = []
    temps: list[str] = []

    def start_node(resources: dict[str, float], cpus: int = 1) -> subprocess.Popen:
        # a temp dir of its own: nodes sharing one on a machine would clear each other's job working dirs
        own = tempfile.mkdtemp(prefix="rn")
        temps.append(own)
        manager = ports.free_port()  # how the head's node list names this node
        nodes.append(
            subprocess.Popen(
                [
                    fresh_clone.ray,
                    "start",
                    f"--address={cluster_head.gcs}",
                    f"--num-cpus={cpus}",
                    f"--resources={json.dumps(resources)}",
                    f"--temp-dir={own}",
                    f"--node-manager-port={manager}",
                    *ports.ray_node_ports(),
                    *NODE_COMMON,
                ],
                env=cluster_head.env,
                cwd=fresh_clone.root,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )

        def joined() -> bool:
            if nodes[-1].poll() is not None:  # not the rest of the 120 s for a node that is gone
                pytest.fail(f"`ray start` of the new node exited with {nodes[-1].returncode} before it joined")
            return cluster_head.alive_nodes(fresh_clone.python, manager) == 1

        wait_for("the new node to join", joined, timeout=120, every=1)
        return nodes[-1]

    yield cluster_head.address, cluster_head.gcs, start_node, cluster_head.env
    for node in nodes:
        stop_group(node)
    if nodes:  # a later test's job must never be placed on a node that is going away
        wait_for(
            "the head to see the test's nodes gone",
            lambda: cluster_head.alive_nodes(fresh_clone.python) == 1,
            timeout=120,
            every=2,
        )
    for folder in temps:
        shutil.rmtree(folder, ignore_errors=True)


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
    from relay_train.demo.recipe import write_recipe

    return write_recipe(
        tmp_path,
        root / "demo/tiny-sd3",
        root / "demo/data",
        text_cache=tmp_path / "cache/text",
        vae_cache=tmp_path / "cache/vae",
        demo=root / "configs/demo",
        validation_steps=0,
    )
