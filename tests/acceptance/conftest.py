"""Acceptance tests: only what a user types, as processes, in a fresh clone of this working tree.

The session's clone is made once: `git clone` of the repository, with the working tree's uncommitted
changes and untracked files laid on top (so a developer tests what they see; CI's tree is clean), then
`bash scripts/setup.sh` in it, exactly as the README's first command does (pip's cache is reused).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
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
        return subprocess.run(["bash", "-c", command], cwd=self.root, env=self.env(**env), capture_output=True,
                              text=True, timeout=timeout)


def _lay_working_tree(clone: Path) -> None:
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=REPO, capture_output=True, check=True).stdout
    if diff:
        subprocess.run(["git", "apply", "--whitespace=nowarn"], cwd=clone, input=diff, check=True)
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "-z"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split("\0")
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


def wait_for(what: str, check, timeout: float, every: float = 1.0):
    """Poll `check()` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
