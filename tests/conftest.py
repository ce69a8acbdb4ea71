"""Shared fixtures and the suite's time rules. Use these rather than starting your own copy:

- session: `tiny_model`, `tiny_clip`, `demo_data` (built once), `s3_endpoint` (moto on loopback; sets the
  test AWS credentials, so start any Ray that must reach S3 after it).
- per test: `config_file(**overrides)` / `make_config` (the demo recipe on this test's folders),
  `loop_hold` (hold the training loop at a step: its workers must start after it),
  `free_port()`, `webhook_receiver`, `hub_server`, `s3_bucket`, `small_disk` (a 3 MiB tmpfs).
- per module: `ray_head` (a `ray start --head` with its own ports; yields (job API address, env)).
- acceptance (tests/acceptance/conftest.py): `fresh_clone`, `cluster_head` / `head` (one head per session;
  worker nodes per test), `background`, `poll`, `user_files`.
- helpers in tests/support/: `lines.Lines` (wait for a process's line with a deadline that fires),
  `ranks.run_ranks` (torch.distributed ranks from one forkserver), `ports` (free ports, Ray node ports).

Time: every test has its tier's timeout (TIER_TIMEOUTS; `@pytest.mark.timeout(N)` overrides). Mark a test
over ~a minute `@pytest.mark.slow`. Under xdist, acceptance tests and integration modules that start Ray each
run in one group (xdist_group below, by path), so a new Ray test needs nothing more than its module's Ray calls.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support import ports  # tests/support/
from support.ray_nodes import head_command, stop_group

REPO = Path(__file__).resolve().parents[1]

# Tests never reach the real Hub: anything that tries gets a refused loopback port at once.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")
os.environ.setdefault("WANDB_MODE", "offline")

# -- time: a per-test bound by tier, and the suite's own budget ------------------------------------------

# A test that hangs fails alone, by name, after its tier's bound (pytest-timeout, signal method); a test that
# needs more says so with @pytest.mark.timeout(N). Bounds are ~4x the tier's slowest test on a loaded 2-core box.
TIER_TIMEOUTS = {"unit": 180, "integration": 600, "slow": 900, "acceptance": 1200}
TIER_SECONDS = dict.fromkeys(TIER_TIMEOUTS, 0.0)  # test seconds (setup, call, teardown) summed per tier
BUDGET_ENV = "RELAY_SUITE_BUDGET_S"  # .ci/run sets it: the run fails when pytest's wall time passes it
CI_START_ENV = "RELAY_CI_START"  # .ci/run's start (epoch seconds), so the total with setup is printed too


def tier_of(nodeid: str, slow: bool) -> str:
    """A test's tier from its node id (tests/<room>/...) and whether it is marked slow."""
    room = Path(nodeid.split("::", 1)[0]).parts[1]
    if room == "acceptance":
        return "acceptance"
    if slow:
        return "slow"
    return "integration" if room == "integration" else "unit"


def tier(item: pytest.Item) -> str:
    return tier_of(item.nodeid, item.get_closest_marker("slow") is not None)


# Under pytest-xdist (-n 2 --dist loadgroup, as .ci/run runs) a group runs on one worker, one test at a time:
# "acceptance" shares the session's fresh clone and head; "ray" holds every integration module that starts a
# Ray cluster (two at once would share 2 cores), found by what its source calls. The groups are read from
# the test's path by the scheduler below: xdist 3.8 marks a group by rewriting a node id, which pytest 9.2's
# node ids no longer take, so `xdist_group` marks would be ignored.
STARTS_RAY = re.compile(
    r"^\s*(import ray|from ray|from orchestrator(\.run)?\.launch|from orchestrator(\.run)? import launch)|"
    r"\bray\.init\(|\"launch\"|\"demo\"|"
    r"\bray_head\b|\blocal_ray\b",
    re.M,
)


# Modules whose source matches STARTS_RAY but which never start a cluster: their `relay launch` calls are
# refused before Ray is joined (a run name, a held lock). Out of the group, they fill either lane.
NEVER_STARTS_RAY = {"test_trust_cli.py"}


@functools.cache
def xdist_group(path: Path) -> str | None:
    parts = path.relative_to(REPO / "tests").parts
    if parts[0] == "acceptance":
        return "acceptance"
    if parts[0] == "integration" and path.name not in NEVER_STARTS_RAY and STARTS_RAY.search(path.read_text()):
        return "ray"
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class PathGroups(LoadScopeScheduling):
        """A group is one work unit (the two largest go to different workers first); other tests go alone."""

        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(REPO / nodeid.split("::", 1)[0]) or nodeid

    return PathGroups(config, log)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(TIER_TIMEOUTS[tier(item)]))


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # an xdist worker: one of 2 lanes on 2 cores, so one CPU thread each,
        os.environ["OMP_NUM_THREADS"] = "1"  # for the `relay train` and rank processes it starts too
        import torch

        torch.set_num_threads(1)


def pytest_sessionstart(session):
    session.config.stash[_STARTED] = time.monotonic()


def pytest_runtest_logreport(report):
    """Test seconds by tier (setup, call and teardown; under xdist the controller sees every lane's reports)."""
    if report.nodeid.startswith("tests/"):
        TIER_SECONDS[tier_of(report.nodeid, "slow" in report.keywords)] += report.duration


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller times the whole run
    wall = time.monotonic() - session.config.stash[_STARTED]
    budget = float(os.environ.get(BUDGET_ENV, "0") or 0)
    session.config.stash[_WALL] = wall
    if budget and wall > budget and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)  # after --durations' list
def pytest_terminal_summary(terminalreporter, config):
    wall = config.stash.get(_WALL, None)
    if wall is None:
        return
    terminalreporter.write_line(
        "test time by tier, all lanes together: " + ", ".join(f"{name} {s:.0f} s" for name, s in TIER_SECONDS.items())
    )
    line = f"suite wall time: {wall / 60:.1f} min ({wall:.0f} s)"
    if budget := float(os.environ.get(BUDGET_ENV, "0") or 0):
        over = wall > budget
        line += f"; budget {budget / 60:.0f} min: " + ("OVER: the run fails (see the slowest tests above)" if over else "ok")
    if started := os.environ.get(CI_START_ENV):
        line += f"; .ci/run so far {(time.time() - float(started)) / 60:.1f} min with setup and lint"
    terminalreporter.write_sep("=", line, red=bool(budget and wall > budget), bold=True)


_STARTED = pytest.StashKey[float]()
_WALL = pytest.StashKey[float]()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from relay_train.demo.tiny_model import make_pipeline

    return make_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A random tiny CLIP (model + processor) for evaluation_type clip."""
    from relay_train.demo.tiny_model import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from relay_train.demo.data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("data") / "demo", count=12)


@pytest.fixture
def config_file(tmp_path, tiny_model, demo_data):
    """Write the demo recipe pointed at this test's folders; keyword overrides use config key names."""

    from relay_train.demo.recipe import write_recipe

    def write(data_dir: Path | None = None, out: str = "out", **overrides) -> Path:
        # validation_num_gpus 0: these clusters have no GPU, so the config asks for CPU validation itself
        return write_recipe(tmp_path, tiny_model, data_dir or demo_data, out=out, **{"validation_num_gpus": 0, **overrides})

    return write


@pytest.fixture
def make_config(config_file):
    """The demo recipe as a loaded TrainConfig (see config_file)."""
    from relay_train.config import load_config

    return lambda **kwargs: load_config(config_file(**kwargs))


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (needs root and mount; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


class LoopHold:
    """The training loop's hold (relay_train.hold) for one test: `at(N)` keeps every rank from training past
    step N until `at(M)` moves it or `release()` lets the run go free."""

    def __init__(self, path: Path):
        from relay_train.hold import HOLD_ENV

        self.path = path
        self.environment = {HOLD_ENV: str(path)}  # for processes that do not inherit this one's environment

    def submitted(self, command: str) -> str:
        """A `ray job submit ... -- entrypoint` line whose job (its driver and every worker) has the hold,
        through the runtime env (the flag goes before the `--`)."""
        flag = "--runtime-env-json " + shlex.quote(json.dumps({"env_vars": self.environment}))
        head, entrypoint = command.split(" -- ", 1)
        return f"{head} {flag} -- {entrypoint}"

    def at(self, step: int) -> None:
        partial = self.path.with_suffix(".partial")
        partial.write_text(str(step))
        partial.replace(self.path)  # whole: the loop never reads half a number

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


@pytest.fixture
def loop_hold(tmp_path, monkeypatch):
    """RELAY_HOLD_FILE in this process's environment, so the Ray nodes and `relay` processes the test starts
    after it (and their workers) inherit it; released at teardown whatever happened."""
    hold = LoopHold(tmp_path / "loop-hold")
    for name, value in hold.environment.items():
        monkeypatch.setenv(name, value)
    yield hold
    hold.release()


@pytest.fixture
def free_port():
    """A function returning a free loopback TCP port (tests/support/ports.py)."""
    return ports.free_port


@pytest.fixture
def webhook_receiver():
    """A loopback webhook receiver (tests/support/webhook_receiver.py) that records requests; can be made down,
    slow or rate-limited."""
    from support.webhook_receiver import WebhookReceiver  # tests/ is on sys.path (conftest rootdir)

    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on loopback: a real HTTP endpoint for boto3 and pyarrow. Test-only credentials."""
    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    port = ports.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh, empty bucket per test; yields (boto3 client, bucket name)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    client.create_bucket(Bucket=name)
    yield client, name


@pytest.fixture
def hub_server(monkeypatch):
    """The loopback Hub (tests/support/hub_server.py) on a free port, with HF_ENDPOINT pointing at it for this test.

    Yields the HubServer: `.url`, `.repos` (repo id -> Repo: files, commits), `.state.token` (the token it
    accepts), `.fail(status, count=N | seconds=S, retry_after=...)` and `.heal()`. The server speaks LFS,
    not Xet, so the client's documented HF_HUB_DISABLE_XET switch is set too."""
    import huggingface_hub.constants as hf_constants

    from support.hub_server import HubServer  # tests/ is on sys.path (conftest rootdir)

    server = HubServer(token="hf_loopbackTestToken0123456789").start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hf_constants, "ENDPOINT", server.url)  # the client reads HF_ENDPOINT at import
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", server.state.token)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` in its own process group, so teardown stops this head and no other Ray.
    One per module: its tests submit jobs of their own names to the same head."""
    gcs, dashboard = ports.free_port(), ports.free_port()
    temp = tempfile.mkdtemp(prefix="rj")  # short: Ray's socket paths must fit 107 characters
    # A throwaway loopback head: no token auth (a machine with ~/.ray/auth_token would otherwise turn it on).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        head_command(str(Path(sys.executable).with_name("ray")), gcs, dashboard, temp),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until the job API answers
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # it answers
        except OSError:
            time.sleep(1)
    else:
        pytest.fail("the Ray head's job API never came up")
    yield address, {**env, "RAY_ADDRESS": address}
    stop_group(head, grace=5)  # the module is over: no job to let finish (a clean `ray stop` takes ~30 s)
    shutil.rmtree(temp, ignore_errors=True)
