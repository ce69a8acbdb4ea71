"""FileStore and RunStorage behave the same on a local folder and on S3 (moto's server on loopback), and
an S3 endpoint that refuses the keys or lacks the bucket says so instead of looking empty."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import SecretStr

from orchestrator.core.cluster import ClusterConfig, storage_filesystem
from orchestrator.core.store import RunStorage
from relay_train.config import DataBackendConfig
from relay_train.data.store import FileStore, cache_store, image_store


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """(store root, endpoint) for an empty folder or an empty bucket prefix."""
    if request.param == "local":
        return str(tmp_path / "root"), None
    _, bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/pre", request.getfixturevalue("s3_endpoint")


def test_one_contract_on_both_media(root):
    store = FileStore(*root)
    assert store.list() == [] and store.listdir() == []
    store.write("a/b.bin", b"one")
    store.write("c.bin", b"two!")
    assert [(f.key, f.size) for f in store.list()] == [("a/b.bin", 3), ("c.bin", 4)]  # sorted, relative keys
    assert [f.key for f in store.list("a")] == ["a/b.bin"] and store.list("zz") == []
    assert store.listdir() == ["a", "c.bin"]
    assert store.read("a/b.bin") == b"one" and store.exists("a/b.bin")
    assert not store.exists("a") and not store.exists("missing.bin")  # a folder is not a file
    with pytest.raises(FileNotFoundError):
        store.read("missing.bin")
    before = store.list()[0].stamp
    store.write("a/b.bin", b"three")
    assert store.read("a/b.bin") == b"three" and store.list()[0].stamp != before
    store.delete("c.bin")
    store.delete("c.bin")  # absent: nothing to do
    assert [f.key for f in store.list()] == ["a/b.bin"]
    assert store.describe("a/b.bin") == f"{root[0]}/a/b.bin"
    again = pickle.loads(pickle.dumps(store))  # what a Ray actor receives: it opens its own filesystem
    assert again.read("a/b.bin") == b"three" and again.describe() == store.describe()


def test_gz_names_are_stored_and_read_byte_for_byte(root, request):
    path, endpoint = root
    store, blob = FileStore(path, endpoint), b"\x1f\x8b" + bytes(range(256))  # a gzip magic, not a gzip stream
    store.write("entry.safetensors.gz", blob)
    assert store.read("entry.safetensors.gz") == blob
    if store.is_local:
        assert (Path(path) / "entry.safetensors.gz").read_bytes() == blob
    else:
        client, bucket = request.getfixturevalue("s3_bucket")
        assert client.get_object(Bucket=bucket, Key="pre/entry.safetensors.gz")["Body"].read() == blob


def test_run_storage_on_both_media(root):
    path, endpoint = root
    storage = RunStorage(path, "run-1", endpoint)
    assert storage.describe("relay/x.json") == f"{path}/run-1/relay/x.json" and (not storage.is_local) == path.startswith("s3://")
    assert storage.read_bytes("relay/x.json") is None and storage.read_json("relay/x.json") is None
    storage.write_json("relay/x.json", {"a": 1})
    storage.write("relay/spool/1.json", b"{}")
    storage.write("checkpoint-2/weights.bin", b"w")
    assert storage.read_json("relay/x.json") == {"a": 1} and storage.listdir("relay") == ["spool", "x.json"]
    assert RunStorage(path, "", endpoint).listdir() == ["run-1"]  # the storage folder itself
    with pytest.raises(ValueError, match="only files under relay/"):
        storage.delete("checkpoint-2")  # Ray's
    storage.delete("relay/spool")  # a folder of ours
    assert storage.listdir("relay") == ["x.json"] and storage.exists("checkpoint-2/weights.bin")
    again = RunStorage(**storage.__getstate__())  # how a Ray worker rebuilds it
    assert pickle.loads(pickle.dumps(storage)).read_json("relay/x.json") == again.read_json("relay/x.json") == {"a": 1}


def test_backend_stores_read_the_bucket_with_the_entrys_keys(s3_bucket, s3_endpoint, monkeypatch):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="images/x.png", Body=b"png")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    backend = DataBackendConfig(
        id="s3",
        type="aws",
        aws_bucket_name=bucket,
        aws_data_prefix="images/",
        aws_endpoint_url=s3_endpoint,
        aws_region_name="us-east-1",
        aws_access_key_id=SecretStr("testing"),
        aws_secret_access_key=SecretStr("testing"),
    )
    images, cache = image_store(backend), cache_store(backend, "cache/vae")
    assert [f.key for f in images.list()] == ["x.png"] and images.describe() == f"s3://{bucket}/images"
    cache.write("k.safetensors", b"t")
    assert client.get_object(Bucket=bucket, Key="cache/vae/k.safetensors")["Body"].read() == b"t"
    assert "testing" not in repr(vars(images))  # the keys stay SecretStr


def test_missing_bucket_is_an_error_not_an_empty_dataset(s3_endpoint):
    store = FileStore("s3://no-such-bucket/images", s3_endpoint)
    with pytest.raises(OSError, match="S3 bucket 'no-such-bucket' does not exist") as listed:
        store.list()
    assert not isinstance(listed.value, FileNotFoundError)  # callers treat that as "this key is absent"
    with pytest.raises(OSError, match="s3://no-such-bucket/images/k.bin.*NO_SUCH_BUCKET"):
        store.write("k.bin", b"1")
    with pytest.raises(FileNotFoundError):
        store.read("k.bin")


def test_refused_keys_name_the_store_and_what_to_check(s3_bucket, s3_endpoint, monkeypatch):
    import moto.settings

    _, bucket = s3_bucket
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the in-process server now checks keys
    store = FileStore(f"s3://{bucket}/pre", s3_endpoint, SecretStr("AKIAWRONG"), SecretStr("wrong"))
    for call in (store.list, lambda: store.write("k.bin", b"1"), lambda: store.read("k.bin")):
        with pytest.raises(OSError, match=rf"s3://{bucket}/pre.*credentials") as raised:
            call()
        assert not isinstance(raised.value, FileNotFoundError)


def test_ray_storage_filesystem_and_run_storage_see_the_same_run(s3_bucket, s3_endpoint):
    _, bucket = s3_bucket
    cluster = ClusterConfig(storage_path=f"s3://{bucket}/runs", storage_endpoint_url=s3_endpoint)
    fs, path = storage_filesystem(cluster)
    assert path == f"{bucket}/runs"
    with fs.open_output_stream(f"{path}/r/checkpoint_manager_snapshot.json") as out:
        out.write(b'{"checkpoint_results": []}')
    assert RunStorage.from_cluster(cluster, "r").read_json("checkpoint_manager_snapshot.json") == {"checkpoint_results": []}


def test_an_s3_store_loads_no_boto3(s3_bucket, s3_endpoint):
    _, bucket = s3_bucket
    script = textwrap.dedent(f"""
        import sys
        import relay_train.data.dataset, relay_train.trainer
        from relay_train.data.store import FileStore
        store = FileStore("s3://{bucket}/x", {s3_endpoint!r})
        store.write("k", b"v")
        assert store.read("k") == b"v" and [f.key for f in store.list()] == ["k"]
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("boto3", "botocore")))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
