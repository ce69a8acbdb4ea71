"""One Ray run with every service of the steward on: the Hub mirror (loopback Hub), validation actors
with CLIP scores, W&B offline and a raw webhook. What each service promises, seen from outside."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from orchestrator.core.cluster import ClusterConfig
from orchestrator.run.launch import launch
from orchestrator.core.ledger import Ledger
from orchestrator.core.store import RunStorage

pytestmark = pytest.mark.slow
TOKEN = "e2e-api-key-0123456789"


def test_a_run_reaches_the_hub_wandb_and_the_webhook(config_file, tiny_clip, hub_server, webhook_receiver, tmp_path):
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False, configure_logging=False)  # after HF_* are set
    try:
        path = config_file(
            max_train_steps=16,
            checkpointing_steps=2,
            checkpoints_total_limit=5,
            validation_steps=8,
            evaluation_type="clip",
            validation_clip_model=str(tiny_clip),
            validation_num_gpus=0,
            push_to_hub=True,
            push_checkpoints_to_hub=True,
            hub_model_id="relay/e2e",
            report_to="wandb",
            tracker_project_name="relay-e2e",
            tracker_run_name="e2e",
            webhook_config={"webhook_type": "raw", "callback_url": webhook_receiver.url(), "auth_token": TOKEN},
        )
        cluster = ClusterConfig(
            num_workers=1, storage_path=str(tmp_path / "runs"), run_name="e2e", max_failures=0, steward_poll_seconds=0.5
        )
        assert launch(path, {}, cluster).error is None
    finally:
        ray.shutdown()

    storage = RunStorage(str(tmp_path / "runs"), "e2e")
    events = Ledger(storage).events
    kinds = [e["type"] for e in events]
    assert kinds[0] == "run_started" and "completed" in kinds
    # the last validation is recorded before the run's end; the Hub's final push may follow it
    assert max(i for i, k in enumerate(kinds) if k == "validation") < kinds.index("completed")

    # Hub: the newest five checkpoints, the adapters and the card; bytes equal to storage
    repo = hub_server.repos["relay/e2e"]
    held = sorted({int(p.split("/")[1].split("-")[1]) for p in repo.files if p.startswith("checkpoints/")})
    assert held == storage.checkpoint_steps() == [8, 10, 12, 14, 16]
    for name in ("adapter.safetensors", "manifest.json"):
        assert repo.files[f"checkpoints/checkpoint-16/{name}"].data == storage.read_bytes(f"checkpoint-16/{name}")
    assert {"sd35-e2e-lokr.safetensors", "sd35-e2e-lokr-ema.safetensors", "README.md"} <= set(repo.files)
    assert "hub_pushed" in kinds

    # validation: the benchmark and steps 8 and 16, scored, images in storage
    validations = [e for e in events if e["type"] == "validation"]
    assert sorted(e["step"] for e in validations) == [0, 8, 16]
    for step in (8, 16):
        scores = storage.read_json(f"relay/validation/checkpoint-{step}/scores.json")
        assert scores is not None and "clip" in json.dumps(scores).lower()
        assert storage.exists(f"relay/validation/checkpoint-{step}/grid.png")

    # the webhook: each kind of event, with images for validations, the key sent, no token in any body
    messages = [r.json for r in webhook_receiver.requests]
    seen = {m["type"] for m in messages}
    assert {"run_started", "checkpoint_committed", "hub_pushed", "validation", "completed"} <= seen, seen
    with_images = [m for m in messages if m["type"] == "validation" and m.get("images")]
    assert with_images and base64.b64decode(with_images[0]["images"][0]["png_base64"])[:4] == b"\x89PNG"
    assert all(r.headers.get("x-api-key") == TOKEN for r in webhook_receiver.requests)
    assert not any(TOKEN.encode() in r.body or hub_server.state.token.encode() in r.body for r in webhook_receiver.requests)

    # W&B offline: the run id kept in storage names a run folder with the logged history
    run_id = storage.read_bytes("relay/wandb-run-id").decode().strip()
    runs = list(Path(tmp_path / "out").rglob(f"*{run_id}*"))
    assert runs, f"no W&B run folder for {run_id} under {tmp_path / 'out'}"
