"""Local atomic writes: a reader sees the old file or the new one, and a killed writer's temp file stays hidden."""

from __future__ import annotations

import threading

import pytest

from orchestrator.core.store import RunStorage
from relay_train.data.store import FileStore
from relay_train.safe_write import TEMP_MARK, write_atomic


def test_readers_never_see_a_half_written_file(tmp_path):
    store = FileStore(tmp_path)
    size = 4 << 20
    store.write("big.bin", b"A" * size)
    stop = threading.Event()

    def rewrite():
        for i in range(40):
            store.write("big.bin", (b"B" if i % 2 else b"A") * size)
        stop.set()

    writer = threading.Thread(target=rewrite)
    writer.start()
    while not stop.is_set():
        data = store.read("big.bin")
        assert len(data) == size and data.count(data[:1]) == size  # one whole version, never a mix or a part
        assert [f.key for f in store.list()] == ["big.bin"]  # the writer's temp file is never listed
    writer.join()
    assert not list(tmp_path.glob(f"*{TEMP_MARK}*"))


def test_a_killed_writers_temp_file_is_never_listed(tmp_path):
    store = FileStore(tmp_path)
    store.write("a.bin", b"whole")
    (tmp_path / f".a.bin{TEMP_MARK}deadbeef").write_bytes(b"wh")  # what a writer killed mid-write leaves
    assert [f.key for f in store.list()] == ["a.bin"] and store.listdir() == ["a.bin"]
    assert RunStorage(str(tmp_path), "").listdir() == ["a.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "taken"
    (target / "inside").mkdir(parents=True)  # a non-empty folder where the file should go: the rename fails
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and (target / "inside").is_dir()


def test_relative_roots_resolve_against_the_cwd_at_construction(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = FileStore("data")
    store.write("x.txt", b"1")
    assert store.describe("x.txt") == str(tmp_path / "data" / "x.txt")
    monkeypatch.chdir("/")
    assert store.read("x.txt") == b"1"  # a store handed to another process still names the same folder


def test_a_snapshot_caught_mid_rewrite_is_read_again_then_an_oserror(tmp_path):
    """Ray rewrites checkpoint_manager_snapshot.json in place: a read can find it empty. The steward's
    watch, the emergency-checkpoint wait and `relay status` all read it; none may die of a JSONDecodeError."""
    from orchestrator.core.store import SNAPSHOT

    storage = RunStorage(str(tmp_path), "run")
    (tmp_path / "run" / "checkpoint-10").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-10" / "manifest.json").write_text("{}")
    assert storage.checkpoint_steps() == []  # no snapshot yet: nothing committed

    snapshot = tmp_path / "run" / SNAPSHOT
    snapshot.write_text("")  # caught between Ray's truncate and its write
    with pytest.raises(OSError, match="did not parse"):
        storage.checkpoint_steps()

    def finish_the_write():  # Ray's write lands while we read again
        snapshot.write_text('{"checkpoint_results": [{"checkpoint_dir_name": "checkpoint-10"}]}')

    snapshot.write_text('{"checkpoint_res')
    timer = threading.Timer(0.05, finish_the_write)
    timer.start()
    try:
        assert storage.checkpoint_steps() == [10]
    finally:
        timer.join()
