import json
import random

import numpy as np
import pytest
import torch

from relay_train import checkpoint as ckpt


def _payload(step: int) -> ckpt.CheckpointPayload:
    gen = torch.Generator().manual_seed(step)
    return ckpt.CheckpointPayload(
        step=step,
        adapter={"lycoris_a.lokr_w1": torch.randn(2, 2, generator=gen)},
        adapter_metadata={"step": str(step)},
        ema={"lycoris_a.lokr_w1": torch.zeros(2, 2)},
        optimizer={"state": {}, "param_groups": []},
        scheduler={"last_epoch": step},
        rng=ckpt.capture_rng(gen),
        training_state={"step": step},
        config_json="{}",
    )


def test_keep_newest_policy():
    assert ckpt.keep_newest([5, 20, 10, 15], 2) == ([20, 15], [10, 5])
    assert ckpt.keep_newest([5, 10], None) == ([10, 5], [])


def test_store_round_trip_and_prunes(tmp_path):
    store = ckpt.LocalCheckpointStore(tmp_path, keep=2)
    for step in (10, 20, 30):
        store.save(_payload(step))
    assert [p.name for p in store.checkpoints()] == ["checkpoint-30", "checkpoint-20"]
    back = ckpt.read_checkpoint(store.latest())
    assert back.step == 30 and torch.equal(back.adapter["lycoris_a.lokr_w1"], _payload(30).adapter["lycoris_a.lokr_w1"])
    manifest = json.loads((store.latest() / ckpt.MANIFEST).read_text())
    assert set(manifest["files"]) == {ckpt.ADAPTER, ckpt.ADAPTER_EMA, ckpt.OPTIMIZER, ckpt.SCHEDULER, ckpt.RNG,
                                      ckpt.TRAINING_STATE, ckpt.CONFIG}


def test_incomplete_and_corrupt_checkpoints_are_never_loaded(tmp_path):
    store = ckpt.LocalCheckpointStore(tmp_path)
    good = store.save(_payload(10))
    newer = store.save(_payload(20))
    (newer / ckpt.ADAPTER).write_bytes(b"x" * (newer / ckpt.ADAPTER).stat().st_size)  # same size, bad bytes
    assert store.latest() == good
    (tmp_path / "checkpoint-30").mkdir()  # a crash before the manifest
    assert store.latest() == good
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.read_checkpoint(newer)
    with pytest.raises(ckpt.CheckpointError, match="no manifest"):
        ckpt.verify_checkpoint(tmp_path / "checkpoint-30")


def test_partial_writes_are_swept(tmp_path):
    (tmp_path / "checkpoint-5.partial").mkdir()
    store = ckpt.LocalCheckpointStore(tmp_path)
    store.save(_payload(10))
    assert not (tmp_path / "checkpoint-5.partial").exists()


def test_rng_round_trip():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = ckpt.capture_rng(gen)
    expected = (torch.rand(3, generator=gen), torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9), gen.manual_seed(9)
    ckpt.restore_rng(state, gen)
    again = (torch.rand(3, generator=gen), torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and torch.equal(expected[1], again[1])
    assert np.array_equal(expected[2], again[2]) and expected[3] == again[3]
