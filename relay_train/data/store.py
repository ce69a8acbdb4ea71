"""Files under one root, a local folder or s3://bucket/prefix, through pyarrow.fs.

Keys are '/'-separated paths relative to the root. Writes are whole-object and atomic (locally a temp
file renamed into place; an S3 PUT is atomic already), so a killed writer never leaves a half-written
file that a later reader would trust. A missing key raises FileNotFoundError on every medium.

Every S3 client in the project is built by `s3_filesystem`; every local atomic write goes through
`write_atomic`. Nothing here imports boto3.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from pyarrow import fs as pafs
    from pydantic import SecretStr

    from relay_train.config.files import DataBackendConfig

TEMP_MARK = ".tmp-"  # in the name of a local file still being written; listings skip it


@dataclass(frozen=True)
class FileInfo:
    key: str  # relative to the store's root
    size: int
    stamp: str  # changes whenever the content may have: mtime and size


def write_atomic(path: Path, data: bytes) -> None:
    """Write a local file so that readers see the old content or the new, never a part of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}{TEMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        temp.write_bytes(data)
        os.replace(temp, path)  # atomic on POSIX
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _is_temp(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


def s3_filesystem(
    endpoint_url: str | None = None,
    access_key: SecretStr | None = None,
    secret_key: SecretStr | None = None,
    region: str | None = None,
) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem: an S3-compatible endpoint if given (scheme and host:port are used), the keys
    if both are given, else the usual AWS chain (environment, shared files, instance role)."""
    from pyarrow import fs

    # Delayed open sends a small file as one PUT instead of a three-request multipart upload; errors
    # (a missing bucket) then surface at close, which every write here reaches.
    options: dict[str, Any] = {"retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=5), "allow_delayed_open": True}
    if endpoint_url:
        endpoint = urlparse(endpoint_url)
        options.update(endpoint_override=endpoint.netloc, scheme=endpoint.scheme or "https")
    if access_key and secret_key:
        options.update(access_key=access_key.get_secret_value(), secret_key=secret_key.get_secret_value())
    if region:
        options["region"] = region
    return fs.S3FileSystem(**options)


class FileStore:
    """A local folder or an S3 prefix, with the few operations the data pipeline and the run folder need.

    Small and picklable: each process opens its own filesystem on first use (an S3 client must not cross
    a fork or a pickle)."""

    def __init__(
        self,
        root: str | Path,
        endpoint_url: str | None = None,
        access_key: SecretStr | None = None,
        secret_key: SecretStr | None = None,
        region: str | None = None,
    ) -> None:
        root = str(root)
        self.is_local = not root.startswith("s3://")
        if self.is_local:
            self._root = str(Path(root).expanduser().resolve())  # the same folder whatever the reader's cwd
            self.bucket = ""
        else:
            parsed = urlparse(root)
            self.bucket = parsed.netloc
            self._root = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
        self.endpoint_url, self.access_key, self.secret_key, self.region = endpoint_url, access_key, secret_key, region
        self._fs: pafs.FileSystem | None = None
        self._pid = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None, "_pid": 0}

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None or self._pid != os.getpid():
            from pyarrow import fs

            self._fs = (
                fs.LocalFileSystem()
                if self.is_local
                else s3_filesystem(self.endpoint_url, self.access_key, self.secret_key, self.region)
            )
            self._pid = os.getpid()
        return self._fs

    def _path(self, key: str = "") -> str:
        return "/".join(p for p in (self._root, key.strip("/")) if p)

    def describe(self, key: str = "") -> str:
        """How a person would name it: the local path, or s3://bucket/prefix/key."""
        return self._path(key) if self.is_local else f"s3://{self._path(key)}"

    @contextmanager
    def _named_errors(self, key: str) -> Iterator[None]:
        """S3 errors name the object, the endpoint and what to check; a missing key stays FileNotFoundError."""
        try:
            yield
        except FileNotFoundError:
            raise
        except OSError as exc:
            if self.is_local:
                raise
            raise OSError(
                f"{self.describe(key)} at {self.endpoint_url or 'AWS'}: {exc} "
                "(check the bucket name, the endpoint and the credentials)"
            ) from exc

    def list(self, prefix: str = "") -> list[FileInfo]:
        """Every file under the folder `prefix` (recursively), sorted by key; [] when there is none."""
        from pyarrow import fs

        with self._named_errors(prefix):
            infos = self.fs.get_file_info(fs.FileSelector(self._path(prefix), recursive=True, allow_not_found=True))
            start = len(self._root) + 1
            found = [
                FileInfo(info.path[start:], info.size, f"{info.mtime_ns}:{info.size}")
                for info in infos
                if info.type == fs.FileType.File and not _is_temp(info.base_name)
            ]
        if not found and not self.is_local:
            self._check_bucket()
        return sorted(found, key=lambda f: f.key)

    def _check_bucket(self) -> None:
        """An absent bucket lists as empty; say so instead of reporting an empty dataset."""
        from pyarrow import fs

        with self._named_errors(""):
            missing = self.fs.get_file_info(self.bucket).type == fs.FileType.NotFound
        if missing:
            raise OSError(
                f"S3 bucket {self.bucket!r} does not exist at {self.endpoint_url or 'AWS'} (or these credentials cannot see it)"
            )

    def listdir(self, prefix: str = "") -> list[str]:
        """Names directly under the folder `prefix` (files and folders), sorted; [] when it does not exist."""
        from pyarrow import fs

        with self._named_errors(prefix):
            infos = self.fs.get_file_info(fs.FileSelector(self._path(prefix), allow_not_found=True))
        return sorted(info.base_name for info in infos if not _is_temp(info.base_name))

    def read(self, key: str) -> bytes:
        """The whole file; FileNotFoundError when it is absent."""
        # compression=None: pyarrow would otherwise gunzip a '.gz' name on the way (and gzip it on write).
        with self._named_errors(key), self.fs.open_input_stream(self._path(key), compression=None) as stream:
            return stream.read()

    def write(self, key: str, data: bytes) -> None:
        """Replace the whole file, atomically."""
        if self.is_local:
            write_atomic(Path(self._path(key)), data)
            return
        with self._named_errors(key), self.fs.open_output_stream(self._path(key), compression=None) as out:
            out.write(data)

    def exists(self, key: str) -> bool:
        """Whether a file is at key."""
        from pyarrow import fs

        with self._named_errors(key):
            return self.fs.get_file_info(self._path(key)).type == fs.FileType.File

    def delete(self, key: str) -> None:
        """Remove the file at key; nothing to do when it is absent."""
        try:
            with self._named_errors(key):
                self.fs.delete_file(self._path(key))
        except FileNotFoundError:
            pass


def _s3_root(bucket: str | None, prefix: str | None) -> str:
    return f"s3://{bucket or ''}/{(prefix or '').strip('/')}"


def _backend_store(backend: DataBackendConfig, root: str) -> FileStore:
    return FileStore(
        root, backend.aws_endpoint_url, backend.aws_access_key_id, backend.aws_secret_access_key, backend.aws_region_name
    )


def image_store(backend: DataBackendConfig) -> FileStore:
    """Where a backend's images (and caption files) live."""
    if backend.type == "aws":
        return _backend_store(backend, _s3_root(backend.aws_bucket_name, backend.aws_data_prefix))
    return FileStore(backend.instance_data_dir or ".")


def cache_store(backend: DataBackendConfig, folder: str) -> FileStore:
    """A cache folder on the backend's own medium: a key prefix in its bucket for aws, else a local folder.

    This follows SimpleTuner, where an aws backend's cache_dir_vae lives in the same bucket.
    """
    if backend.type == "aws":
        return _backend_store(backend, _s3_root(backend.aws_bucket_name, folder))
    return FileStore(folder)
