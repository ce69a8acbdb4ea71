"""File access for datasets and caches: a local folder or an S3 prefix, behind one small interface.

Keys are '/'-separated paths relative to the store's root. Writes are whole-object and atomic
(a local temp file renamed into place; S3 PUTs are atomic already), so a killed writer never
leaves a half-written cache entry that a later run would trust.

relay_train keeps boto3 out of its import path until an S3 store is actually built.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from relay_train.config.files import DataBackendConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileInfo:
    key: str  # relative to the store's root
    size: int
    stamp: str  # changes whenever the content may have: mtime+size locally, the ETag on S3


class FileStore(Protocol):
    """The few operations the data pipeline needs from where files live."""

    is_local: bool

    def describe(self, key: str = "") -> str: ...
    def list(self, prefix: str = "") -> list[FileInfo]: ...
    def read(self, key: str) -> bytes: ...  # FileNotFoundError when absent, on every store
    def write(self, key: str, data: bytes) -> None: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...


class LocalStore:
    """A folder on local disk."""

    is_local = True

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def describe(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)

    def list(self, prefix: str = "") -> list[FileInfo]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        found = []
        for path in sorted(base.rglob("*")):
            if path.is_file() and ".tmp-" not in path.name:
                stat = path.stat()
                key = path.relative_to(self.root).as_posix()
                found.append(FileInfo(key, stat.st_size, f"{stat.st_mtime_ns}:{stat.st_size}"))
        return found

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def write(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        temp.write_bytes(data)
        os.replace(temp, path)  # atomic on POSIX: readers see the old file or the new one

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)


class S3Store:
    """Objects under s3://bucket/prefix, through a boto3 client."""

    is_local = False

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self.client, self.bucket = client, bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    def describe(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def list(self, prefix: str = "") -> list[FileInfo]:
        found = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            for item in page.get("Contents", []):
                key = item["Key"][len(self.prefix):]
                found.append(FileInfo(key, item["Size"], f"{item['ETag'].strip(chr(34))}:{item['Size']}"))
        return sorted(found, key=lambda f: f.key)

    def read(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(self.describe(key)) from None
            raise

    def write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except ClientError as exc:
            if _missing(exc):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)


def _missing(exc: Exception) -> bool:
    return getattr(exc, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def s3_client(backend: DataBackendConfig) -> Any:
    """A boto3 S3 client for an aws backend: keys from the entry, else the usual AWS chain."""
    import boto3
    from botocore.config import Config

    keys = {}
    if backend.aws_access_key_id and backend.aws_secret_access_key:
        keys = {"aws_access_key_id": backend.aws_access_key_id.get_secret_value(),
                "aws_secret_access_key": backend.aws_secret_access_key.get_secret_value()}
    # Many small GETs from one process: a larger pool than boto3's 10 keeps readers from queuing.
    config = Config(max_pool_connections=32, retries={"max_attempts": 5, "mode": "standard"})
    return boto3.client("s3", region_name=backend.aws_region_name, endpoint_url=backend.aws_endpoint_url,
                        config=config, **keys)


def image_store(backend: DataBackendConfig) -> FileStore:
    """Where a backend's images (and caption files) live."""
    if backend.type == "aws":
        return S3Store(s3_client(backend), backend.aws_bucket_name or "", backend.aws_data_prefix or "")
    return LocalStore(backend.instance_data_dir or ".")


def cache_store(backend: DataBackendConfig, folder: str) -> FileStore:
    """A cache folder on the backend's own medium: a key prefix in its bucket for aws, else a local folder.

    This follows SimpleTuner, where an aws backend's cache_dir_vae lives in the same bucket.
    """
    if backend.type == "aws":
        return S3Store(s3_client(backend), backend.aws_bucket_name or "", folder)
    return LocalStore(folder)
