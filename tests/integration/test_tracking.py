"""W&B offline: the run's own .wandb file holds the metrics and the validation images, and a second
Tracker.open with the same storage continues the same W&B run id."""

from __future__ import annotations

import io
import json
import struct
import time
from pathlib import Path

from PIL import Image

from orchestrator.core.store import RunStorage
from orchestrator.services.tracking import RUN_ID, NullTracker, Tracker
from relay_train.config import TrainConfig

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of checksummed records
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """Every whole record W&B has written to run-<id>.wandb so far, parsed with W&B's own protobuf schema.
    The file may be read while W&B's service appends to it, so a record cut short at the end is left out."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # too small for a header: the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # W&B's service is still writing this record: read it next time
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def finished_records(path: Path, timeout: float = 15.0) -> list:
    """The records once W&B's service has written the run's exit record: run.finish() can return
    before the service process has flushed the file."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(path) if path.is_file() else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def history(records: list) -> list[dict[str, object]]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({"/".join(item.nested_key or [item.key]): json.loads(item.value_json) for item in record.history.item})
    return rows


def config(tmp_path: Path, **kw) -> TrainConfig:
    return TrainConfig(
        pretrained_model_name_or_path="m",
        data_backend_config=tmp_path / "d.json",
        lycoris_config=tmp_path / "l.json",
        max_train_steps=100,
        output_dir=tmp_path / "out",
        report_to="wandb",
        tracker_project_name="relay-tests",
        tracker_run_name="tiny-run",
        **kw,
    )


def png(colour: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(out, format="PNG")
    return out.getvalue()


def test_offline_run_holds_metrics_and_images_and_resumes_the_same_id(tmp_path: Path) -> None:
    storage = RunStorage(str(tmp_path / "runs"), "tiny-run")
    cfg = config(tmp_path)
    first = Tracker.open(cfg, "tiny-run", storage, wandb_dir=tmp_path / "wandb")
    assert isinstance(first, Tracker) and first.run.offline
    times = []
    for step in range(1, 21):
        start = time.perf_counter()
        first.log_step(
            step, {"loss": 1.0 / step, "lr": 5e-5, "grad_norm": 0.5, "steps_per_second": 2.0, "samples_per_second": 8.0}
        )
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    first.log_validation(20, [("a cat", png("red")), ("a dog", Image.new("RGB", (24, 16), "blue"))], {"clip_score": 0.31})
    queued_in = time.perf_counter() - start
    first.finish()
    print(
        f"\nlog_step blocking: mean {sum(times) / len(times) * 1e6:.0f} us, max {max(times) * 1e6:.0f} us; "
        f"log_validation with 2 images: {queued_in * 1e6:.0f} us"
    )
    run_id = first.run_id
    assert storage.read_bytes(RUN_ID).decode() == run_id

    records = finished_records(first.run_dir / f"run-{run_id}.wandb")
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.run_id, run.project, run.display_name) == (run_id, "relay-tests", "tiny-run")
    rows = history(records)
    losses = {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}
    assert losses == {step: 1.0 / step for step in range(1, 21)}
    assert all(row["train/samples_per_second"] == 8.0 for row in rows if "train/loss" in row)
    validation = next(row for row in rows if "validation/clip_score" in row)
    assert validation["step"] == 20 and validation["validation/clip_score"] == 0.31
    assert validation["validation/images/captions"] == ["a cat", "a dog"]
    files = [first.run_dir / "files" / name for name in validation["validation/images/filenames"]]
    assert [Image.open(f).getpixel((0, 0)) for f in files] == [(255, 0, 0), (0, 0, 255)]

    second = Tracker.open(cfg, "tiny-run", storage, wandb_dir=tmp_path / "wandb")  # a resumed job
    second.log_step(15, {"loss": 0.01})  # resumed from an earlier checkpoint: steps repeat, rows are kept
    second.finish()
    assert second.run_id == run_id and second.run_dir != first.run_dir
    again = history(finished_records(second.run_dir / f"run-{run_id}.wandb"))
    assert [(r["step"], r["train/loss"]) for r in again if "train/loss" in r] == [(15, 0.01)]


def test_report_to_none_is_a_no_op(tmp_path: Path) -> None:
    tracker = Tracker.open(config(tmp_path).model_copy(update={"report_to": "none"}), "r", None)
    assert isinstance(tracker, NullTracker)
    tracker.log_step(1, {"loss": 1.0})
    tracker.log_validation(1, [], {})
    tracker.finish()
    assert not (tmp_path / "out").exists()
