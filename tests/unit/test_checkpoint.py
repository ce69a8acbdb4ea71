import json
import random

import numpy as np
import pytest
import torch

from relay_train import checkpoint as ckpt
from support.checkpoints import small_payload


def test_keep_newest_policy():
    assert ckpt.keep_newest([5, 20, 10, 15], 2) == ([20, 15], [10, 5])
    assert ckpt.keep_newest([5, 10], None) == ([10, 5], [])


def test_store_round_trip_and_prunes(tmp_path):
    store = ckpt.LocalCheckpointStore(tmp_path, keep=2)
    for step in (10, 20, 30):
        store.save(small_payload(step))
    assert [p.name for p in store.checkpoints()] == ["checkpoint-30", "checkpoint-20"]
    back = ckpt.read_checkpoint(store.latest())
    assert back.step == 30 and torch.equal(back.adapter["lycoris_a.lokr_w1"], small_payload(30).adapter["lycoris_a.lokr_w1"])
    manifest = json.loads((store.latest() / ckpt.MANIFEST).read_text())
    assert set(manifest["files"]) == {
        ckpt.ADAPTER,
        ckpt.ADAPTER_EMA,
        ckpt.OPTIMIZER,
        ckpt.SCHEDULER,
        ckpt.RNG,
        ckpt.TRAINING_STATE,
        ckpt.CONFIG,
    }


def test_incomplete_and_corrupt_checkpoints_are_never_loaded(tmp_path):
    store = ckpt.LocalCheckpointStore(tmp_path)
    good = store.save(small_payload(10))
    newer = store.save(small_payload(20))
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
    store.save(small_payload(10))
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


# -- the manifest is a schema, cross-checked with its folder ---------------------------------------


def _manifest(folder):
    return json.loads((folder / ckpt.MANIFEST).read_text())


def _rewrite(folder, change):
    manifest = _manifest(folder)
    change(manifest)
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda m: m.update(step=20), "disagrees with the folder's name"),
        (lambda m: m.update(step="10"), "step '10'"),
        (lambda m: m.update(step=True), "step True"),
        (lambda m: m.update(files=[]), "files: expected an object"),
        (lambda m: m["files"].update({ckpt.ADAPTER: "abc"}), "expected {size, sha256}"),
        (lambda m: m["files"][ckpt.OPTIMIZER].update(size="12"), "size '12'"),
        (lambda m: m["files"][ckpt.OPTIMIZER].update(sha256="00"), "64 hex digits"),
        (lambda m: m["files"].pop(ckpt.RNG), "rng_state.pt not listed"),
        (lambda m: m["files"].update({"../escape": {"size": 1, "sha256": "0" * 64}}), "not a plain file name"),
        (lambda m: m.update(format=2), "format 2"),
    ],
)
def test_a_manifest_that_lies_is_a_checkpoint_error(tmp_path, change, fragment):
    folder = ckpt.LocalCheckpointStore(tmp_path).save(small_payload(10))
    _rewrite(folder, change)
    with pytest.raises(ckpt.CheckpointError, match="malformed manifest.json") as info:
        ckpt.read_checkpoint(folder)
    assert fragment in str(info.value)


def test_a_manifest_that_is_not_an_object_or_not_json(tmp_path):
    folder = ckpt.LocalCheckpointStore(tmp_path).save(small_payload(10))
    (folder / ckpt.MANIFEST).write_text("[1, 2]")
    with pytest.raises(ckpt.CheckpointError, match="JSON list, expected an object"):
        ckpt.verify_checkpoint(folder)
    (folder / ckpt.MANIFEST).write_bytes(b"\xff\xfe{")
    with pytest.raises(ckpt.CheckpointError, match="unreadable manifest.json"):
        ckpt.verify_checkpoint(folder)


def test_a_training_state_that_names_another_step_is_refused(tmp_path):
    folder = ckpt.LocalCheckpointStore(tmp_path).save(small_payload(10))
    state = folder / ckpt.TRAINING_STATE
    state.write_text(json.dumps({"step": 30}))
    _rewrite(
        folder, lambda m: m["files"][ckpt.TRAINING_STATE].update(size=state.stat().st_size, sha256=ckpt.sha256_file(state))
    )  # consistent hashes, inconsistent content
    with pytest.raises(ckpt.CheckpointError, match="says step 30, the manifest step 10"):
        ckpt.read_checkpoint(folder)


def test_a_file_that_matches_its_hash_but_does_not_load_is_named(tmp_path):
    folder = ckpt.LocalCheckpointStore(tmp_path).save(small_payload(10))
    rng = folder / ckpt.RNG
    rng.write_bytes(b"not a torch file")
    _rewrite(folder, lambda m: m["files"][ckpt.RNG].update(size=rng.stat().st_size, sha256=ckpt.sha256_file(rng)))
    with pytest.raises(ckpt.CheckpointError, match="rng_state.pt does not load"):
        ckpt.read_checkpoint(folder)


def test_scan_says_why_each_checkpoint_is_rejected(tmp_path):
    store = ckpt.LocalCheckpointStore(tmp_path)
    for step in (10, 20, 30):
        store.save(small_payload(step))
    (tmp_path / "checkpoint-30" / ckpt.MANIFEST).unlink()
    _rewrite(tmp_path / "checkpoint-20", lambda m: m.update(step=25))
    found = dict(store.scan())
    assert "no manifest.json" in found[tmp_path / "checkpoint-30"]
    assert "disagrees with the folder's name" in found[tmp_path / "checkpoint-20"]
    assert found[tmp_path / "checkpoint-10"] is None and store.latest() == tmp_path / "checkpoint-10"
    (tmp_path / "checkpoint-10" / ckpt.ADAPTER).write_bytes(b"")
    assert store.latest() is None and all(reason for _, reason in store.scan())


# -- one run per output_dir ------------------------------------------------------------------------


def test_a_second_lock_on_one_output_dir_is_refused_naming_the_holder(tmp_path):
    import os
    import socket

    with ckpt.RunLock(tmp_path / "run"):
        with pytest.raises(ckpt.RunLockedError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            ckpt.RunLock(tmp_path / "run").acquire()
    with ckpt.RunLock(tmp_path / "run"):  # released on exit: the next run takes it
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(ckpt.RunLockedError, match="is a file, not a folder"):
        ckpt.RunLock(tmp_path / "file").acquire()


# -- a full disk ------------------------------------------------------------------------------------


def test_a_full_disk_is_one_clear_error_and_leaves_the_earlier_checkpoints(small_disk):
    store = ckpt.LocalCheckpointStore(small_disk)
    first = store.save(small_payload(10))
    big = small_payload(20)
    big.adapter = {"lycoris_a.lokr_w1": torch.zeros(1024, 1024)}  # 4 MiB: cannot fit
    with pytest.raises(ckpt.CheckpointWriteError, match=r"no space left to write checkpoint-20.partial in .* free"):
        store.save(big)
    assert sorted(p.name for p in small_disk.iterdir()) == ["checkpoint-10"]
    assert store.latest() == first and ckpt.read_checkpoint(first).step == 10
