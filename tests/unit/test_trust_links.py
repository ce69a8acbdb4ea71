"""Class: following links out of what the tool owns. Every name Relay writes refuses a link at it (or
removes the link, never its target); discovery lists each real file once and never leaves the data root;
deletion only touches files whose real path is inside the data root."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from relay_train import checkpoint as ckpt
from support.checkpoints import small_payload
from relay_train.config.files import DataBackendConfig
from relay_train.data.discovery import report_problems
from relay_train.data.store import FileStore
from relay_train.safe_write import LinkRefusedError, write_atomic


@pytest.fixture
def victim(tmp_path):
    """A file and a folder outside what the tool owns, which a link will point at."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    return outside


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path, victim):
    run = tmp_path / "run"
    run.mkdir()
    (run / ckpt.RunLock.NAME).symlink_to(victim / "precious.txt")
    with pytest.raises(LinkRefusedError, match="symbolic link"):
        ckpt.RunLock(run).acquire()
    assert (victim / "precious.txt").read_text() == "keep me"


def test_a_partial_checkpoint_folder_that_is_a_link_is_never_written_through(tmp_path, victim):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-10.partial").symlink_to(victim, target_is_directory=True)
    folder = ckpt.LocalCheckpointStore(run).save(small_payload(10, ema=False))
    assert folder == run / "checkpoint-10" and not folder.is_symlink()
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]  # nothing landed on the target
    ckpt.verify_checkpoint(folder)


@pytest.mark.parametrize("name", ["sd35-run-lokr.safetensors", "problematic_images.json", "index.json"])
def test_a_file_the_tool_writes_refuses_a_link_at_its_name(tmp_path, victim, name):
    (tmp_path / name).symlink_to(victim / "precious.txt")
    with pytest.raises(LinkRefusedError):
        write_atomic(tmp_path / name, b"new")
    with pytest.raises(LinkRefusedError):
        FileStore(tmp_path).write(name, b"new")
    assert (victim / "precious.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_an_export_onto_a_link_is_refused(tmp_path, victim):
    (tmp_path / "a.safetensors").symlink_to(victim / "precious.txt")
    with pytest.raises(LinkRefusedError):
        ckpt.save_adapters({"w": torch.ones(2)}, None, {}, tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert (victim / "precious.txt").read_text() == "keep me"


def test_discovery_never_leaves_the_data_root(tmp_path, victim):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "a.png").write_bytes(b"a")
    (data / "elsewhere").symlink_to(victim, target_is_directory=True)  # a folder link out of the root
    (data / "stray.txt").symlink_to(victim / "precious.txt")  # a file link out of the root
    keys = [f.key for f in FileStore(data).list()]
    assert keys == ["sub/a.png"]


def test_a_link_loop_lists_each_real_file_once_with_one_warning(tmp_path, caplog):
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    (data / "a" / "x.png").write_bytes(b"x")
    (data / "a" / "loop").symlink_to(data, target_is_directory=True)  # a/loop/a/loop/... forever
    (data / "again").symlink_to(data / "a", target_is_directory=True)  # a second way to the same folder
    with caplog.at_level(logging.WARNING, logger="relay_train.data.store"):
        keys = [f.key for f in FileStore(data).list()]
    assert keys == ["a/x.png"]
    warnings = [r for r in caplog.records if "symbolic link" in r.getMessage()]
    assert len(warnings) == 2 and any("loop" in r.getMessage() for r in warnings)


def test_delete_problematic_images_deletes_only_inside_the_data_root(tmp_path, victim):
    data = tmp_path / "data"
    data.mkdir()
    (data / "bad.png").write_bytes(b"not an image")
    (data / "linked").symlink_to(victim, target_is_directory=True)
    (victim / "bad2.png").write_bytes(b"not an image either")
    store, cache = FileStore(data), FileStore(tmp_path / "cache")
    backend = DataBackendConfig(id="d", type="local", instance_data_dir=str(data))
    problems = [("bad.png", "unreadable (x)"), ("linked/bad2.png", "unreadable (x)")]
    deleted = report_problems(backend, store, cache, problems, delete=True)
    assert deleted == [store.describe("bad.png")]
    assert (victim / "bad2.png").exists() and not (data / "bad.png").exists()
    with pytest.raises(OSError, match="outside"):
        store.delete("linked/precious.txt")
    assert (victim / "precious.txt").exists()
    report = json.loads(cache.read("problematic_images.json"))
    assert [f["deleted"] for f in report["files"]] == [True, False]


def test_a_shared_folder_path_refuses_a_link_on_the_way(tmp_path, victim):
    from relay_train.safe_write import make_dir

    (tmp_path / "relay-staging").symlink_to(victim, target_is_directory=True)  # planted in a shared /tmp
    with pytest.raises(LinkRefusedError):
        make_dir(tmp_path / "relay-staging" / "run" / "rank-0", owned_below=tmp_path)
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]
    assert make_dir(tmp_path / "own" / "run" / "rank-0", owned_below=tmp_path).is_dir()


def test_an_output_dir_that_is_a_link_to_a_bigger_disk_is_the_users_choice(tmp_path):
    """Only the names Relay owns refuse a link: the folders above them (output_dir itself) are the user's."""
    disk = tmp_path / "bigger-disk"
    disk.mkdir()
    out = tmp_path / "out"
    out.symlink_to(disk, target_is_directory=True)
    with ckpt.RunLock(out):
        write_atomic(out / "sd35-run-lokr.safetensors", b"adapter")
        folder = ckpt.LocalCheckpointStore(out).save(small_payload(10, ema=False))
    assert (disk / "sd35-run-lokr.safetensors").read_bytes() == b"adapter"
    assert (disk / "checkpoint-10").is_dir() and folder.name == "checkpoint-10"
