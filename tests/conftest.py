"""Shared fixtures: the tiny SD3 pipeline and the demo images, built once per test session."""

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
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never reach the real Hub: anything that tries gets a refused loopback port at once.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")
os.environ.setdefault("WANDB_MODE", "offline")


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

    def write(data_dir: Path | None = None, out: str = "out", **overrides) -> Path:
        backends = json.loads((REPO / "configs/demo/multidatabackend.json").read_text())
        backends[0]["instance_data_dir"] = str(data_dir or demo_data)
        backends[1]["cache_dir"] = str(tmp_path / "cache")
        backend_file = tmp_path / f"backends-{out}.json"
        backend_file.write_text(json.dumps(backends))
        raw = json.loads((REPO / "configs/demo/config.json").read_text())
        raw.update(
            {
                "--pretrained_model_name_or_path": str(tiny_model),
                "--data_backend_config": str(backend_file),
                "--lycoris_config": str(REPO / "configs/demo/lycoris_config.json"),
                "--output_dir": str(tmp_path / out),
                "--validation_num_gpus": 0,  # these clusters have no GPU: the config asks for CPU validation itself
            }
        )
        raw.update({f"--{k}" if f"--{k}" in raw or k not in raw else k: v for k, v in overrides.items()})
        path = tmp_path / f"config-{out}.json"
        path.write_text(json.dumps(raw, indent=2))
        return path

    return write


@pytest.fixture
def make_config(config_file):
    """The demo recipe as a loaded TrainConfig (see config_file)."""
    from relay_train.config import load_config

    return lambda **kwargs: load_config(config_file(**kwargs))


def _free_port() -> int:
    """A free port between Ray's worker ports (10002-19999) and the kernel's ephemeral range (32768+): a port
    the kernel hands out for port 0 or an outgoing connection could be taken again between this check and
    the caller's bind, one below that range only by another explicit pick."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in 20000-32000")


@pytest.fixture
def free_port():
    """A function returning a free loopback TCP port."""
    return _free_port


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
    port = _free_port()
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


@pytest.fixture
def ray_head(free_port):
    """`ray start --head --block` in its own process group, so teardown stops this head and no other Ray."""
    gcs, dashboard = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="rj")  # short: Ray's socket paths must fit 107 characters
    # A throwaway loopback head: no token auth (a machine with ~/.ray/auth_token would otherwise turn it on).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
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
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)
