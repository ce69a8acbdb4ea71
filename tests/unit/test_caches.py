"""Cache keys, entry encoding and the local store: pure or local-disk only."""

from __future__ import annotations

import torch

from relay_train.data.caches import TensorCache, latent_key, pack, text_key, unpack
from relay_train.data.discovery import inspect_image, problem_kind
from relay_train.data.store import FileStore


def test_keys_change_with_every_input_and_only_then():
    base = latent_key("d1", (64, 64), ("cover", "center"), "vae1")
    assert base == latent_key("d1", (64, 64), ("cover", "center"), "vae1")
    for other in (
        latent_key("d2", (64, 64), ("cover", "center"), "vae1"),
        latent_key("d1", (64, 48), ("cover", "center"), "vae1"),
        latent_key("d1", (64, 64), ("crop", "random", "preserve"), "vae1"),
        latent_key("d1", (64, 64), ("cover", "center"), "vae2"),
    ):
        assert other != base
    assert text_key("a cat", "t") == text_key("a cat", "t") != text_key("a cat.", "t") != text_key("a cat", "u")


def test_pack_round_trips_plain_and_compressed():
    tensors = {"latents": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) / 7}
    plain, small = pack(tensors, compress=False), pack(tensors, compress=True)
    assert small[:2] == b"\x1f\x8b" and pack(tensors, compress=True) == small  # deterministic bytes
    for blob in (plain, small):
        assert torch.equal(unpack(blob)["latents"], tensors["latents"])


def test_cache_reads_entries_written_with_the_other_compression(tmp_path):
    store = FileStore(tmp_path)
    TensorCache(store, compress=True).put("k1", {"x": torch.ones(3)})
    TensorCache(store, compress=False).put("k2", {"x": torch.zeros(3)})
    reader = TensorCache(store, compress=False)
    assert reader.refresh() == {"k1", "k2"}
    assert torch.equal(reader.get("k1")["x"], torch.ones(3)) and torch.equal(reader.get("k2")["x"], torch.zeros(3))


def test_local_file_store_writes_atomically_and_stamps_changes(tmp_path):
    store = FileStore(tmp_path / "root")
    store.write("a/b.bin", b"one")
    first = store.list()
    assert [f.key for f in first] == ["a/b.bin"] and store.read("a/b.bin") == b"one"
    store.write("a/b.bin", b"three")
    assert store.list()[0].stamp != first[0].stamp
    assert not list((tmp_path / "root/a").glob("*.tmp-*"))
    store.delete("a/b.bin")
    assert not store.exists("a/b.bin")


def test_inspect_image_names_each_kind_of_bad_file(demo_data):
    good = (demo_data / "0000.png").read_bytes()
    assert inspect_image(good) == ((64, 64), None)
    for data, kind in ((b"", "empty file"), (b"not an image", "unreadable"), (good[: len(good) // 2], "unreadable")):
        size, reason = inspect_image(data)
        assert size is None and problem_kind(reason) == kind
