"""Samples/s read from the caches (local disk and S3) against samples/s the training step consumes.

The caches are built once for the demo dataset (demo/tiny-sd3, demo/data: `relay demo` makes them);
then every epoch's batches are read cold (no in-memory copy), in the sampler's order, through
`EncodedDataset.batch`, exactly as the trainer calls it. S3 is moto's server in its own process on
127.0.0.1. The step rate comes from `Trainer.fit` on the demo config in this process.

    python bench/bench_data.py [--epochs 5] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from relay_train.logs import configure_logging

REPO = Path(__file__).resolve().parents[1]
MODEL, DATA = REPO / "demo/tiny-sd3", REPO / "demo/data"
CPU = torch.device("cpu")


def demo_config(out: Path, backends: list[dict], **overrides):
    from relay_train.config import load_config

    (out / "backends.json").write_text(json.dumps(backends))
    return load_config(
        REPO / "configs/demo/config.json",
        {
            "pretrained_model_name_or_path": str(MODEL),
            "data_backend_config": str(out / "backends.json"),
            "lycoris_config": str(REPO / "configs/demo/lycoris_config.json"),
            "output_dir": str(out / "run"),
            "resume_from_checkpoint": "none",
            **overrides,
        },
    )


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):  # up to 10 s
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def s3_backends(endpoint: str) -> list[dict]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="bench")
    for path in sorted(DATA.iterdir()):
        client.put_object(Bucket="bench", Key="demo/" + path.name, Body=path.read_bytes())
    where = {"type": "aws", "aws_bucket_name": "bench", "aws_region_name": "us-east-1", "aws_endpoint_url": endpoint}
    return [
        {"id": "demo-images", "aws_data_prefix": "demo/", "cache_dir_vae": "cache/vae", "resolution": 64, **where},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text", **where},
    ]


def read_rate(config, epochs: int) -> float:
    """Samples/s through EncodedDataset.batch with every entry read from the store (no RAM copy)."""
    from relay_train.data.buckets import BucketBatchSampler
    from relay_train.data.dataset import open_dataset
    from relay_train.data.encode import encode_dataset
    from relay_train.data.plan import plan_dataset

    encode_dataset(config, MODEL, CPU, torch.float32)  # build the caches (untimed)
    dataset = open_dataset(plan_dataset(config, MODEL), memory_budget=0)
    sampler = BucketBatchSampler(dataset.bucket_sizes(), config.train_batch_size, config.seed, keep_partial_batches=True)
    batches, samples = sampler.batches_per_epoch() * epochs, 0
    start = time.perf_counter()
    for _ in range(batches):
        bucket, indices = sampler.next_batch()
        samples += dataset.batch(bucket, indices).latents.shape[0]
    return samples / (time.perf_counter() - start)


def step_rate(config, steps: int) -> float:
    """Samples/s the demo's training step consumes (Trainer.fit, caches warm, RAM copy on as in training)."""
    from relay_train.trainer import build_trainer

    trainer = build_trainer(config.model_copy(update={"max_train_steps": steps, "checkpointing_steps": steps * 10}))
    start = time.perf_counter()
    trainer.fit()
    return steps * config.train_batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    configure_logging()
    logging.getLogger().setLevel(logging.WARNING)  # the bench's figures only: warnings and errors
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")  # moto accepts any
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("local", "s3"):
            (Path(tmp) / name).mkdir()
        local = demo_config(
            Path(tmp) / "local",
            [
                {"id": "demo-images", "instance_data_dir": str(DATA), "resolution": 64},
                {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": f"{tmp}/local/text"},
            ],
        )
        proc, endpoint = start_moto()
        try:
            remote = demo_config(Path(tmp) / "s3", s3_backends(endpoint))
            rates = {"read local": read_rate(local, args.epochs), "read S3": read_rate(remote, args.epochs)}
        finally:
            proc.kill()
            proc.wait(timeout=10)
        rates["train step"] = step_rate(local, args.steps)
    consume = rates["train step"]
    print("| path | samples/s | ratio to the step |\n|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {rate / consume:.1f}x |")


if __name__ == "__main__":
    main()
