"""Files under one root, a local folder or s3://bucket/prefix, through pyarrow.fs.

Keys are '/'-separated paths relative to the root. Writes are whole-object and atomic (locally a temp
file renamed into place; an S3 PUT is atomic already), so a killed writer never leaves a half-written
file that a later reader would trust. A missing key raises FileNotFoundError on every medium.

Every S3 client in the project is built by `s3_filesystem`; every local atomic write goes through
`write_atomic` (relay_train/safe_write.py, which never writes through a link). Nothing here imports boto3.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from relay_train.safe_write import is_temp, write_atomic

if TYPE_CHECKING:
    from pyarrow import fs as pafs
    from pydantic import SecretStr

    from relay_train.config.files import DataBackendConfig

log = logging.getLogger(__name__)


class UnreadableFolderError(ValueError):
    """A folder under a local store's root cannot be listed: what it holds is unknown, so the run stops."""


@dataclass(frozen=True)
class FileInfo:
    key: str  # relative to the store's root
    size: int
    stamp: str  # changes whenever the content may have: mtime and size


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

        if self.is_local:
            return _list_local(Path(self._root), prefix)
        with self._named_errors(prefix):
            infos = self.fs.get_file_info(fs.FileSelector(self._path(prefix), recursive=True, allow_not_found=True))
            start = len(self._root) + 1
            found = [
                FileInfo(info.path[start:], info.size, f"{info.mtime_ns}:{info.size}")
                for info in infos
                if info.type == fs.FileType.File and not is_temp(info.base_name)
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
        return sorted(info.base_name for info in infos if not is_temp(info.base_name))

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
        """Remove the file at key; nothing to do when it is absent. Locally, only a file whose real path is
        inside the root: a name reached through a link to elsewhere is never deleted (OSError)."""
        if self.is_local and not inside(Path(self._root), Path(self._path(key))):
            raise OSError(f"{self.describe(key)} leads outside {self._root} (through a symbolic link): not deleted")
        try:
            with self._named_errors(key):
                self.fs.delete_file(self._path(key))
        except FileNotFoundError:
            pass


def inside(root: Path, path: Path) -> bool:
    """Whether `path`'s real location (every link resolved) is `root` or under it."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def _list_local(root: Path, prefix: str) -> list[FileInfo]:
    """A local folder's files, recursively, sorted by key. Links are followed only to places inside the
    root, each real folder and file is listed once (a link to a folder seen already, a loop included, adds
    nothing), and each link skipped for these reasons is logged once."""
    start = root / prefix.strip("/") if prefix.strip("/") else root
    real_root = os.path.realpath(root)
    seen_dirs: set[str] = set()
    seen_files: set[str] = set()
    found: list[FileInfo] = []

    def unlistable(exc: OSError) -> None:
        if isinstance(exc, FileNotFoundError) and os.path.normpath(exc.filename or "") == os.path.normpath(start):
            return  # no such folder: nothing in it, as on S3
        raise UnreadableFolderError(
            f"{exc.filename} cannot be listed ({exc.strerror or exc.__class__.__name__}): fix its permissions, "
            "or move it out of the data folder"
        ) from exc

    for folder, dirs, files in os.walk(start, followlinks=True, onerror=unlistable):
        real = os.path.realpath(folder)
        if real in seen_dirs or not Path(real).is_relative_to(real_root):
            why = f"its real folder {real} is listed already (a loop?)" if real in seen_dirs else f"it leads outside {real_root}"
            log.warning("data: skipping the symbolic link %s: %s", folder, why)
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs.sort(key=lambda d: (os.path.islink(os.path.join(folder, d)), d))  # real folders before links to them
        for name in sorted(files):
            path = os.path.join(folder, name)
            target = os.path.realpath(path)
            if is_temp(name) or target in seen_files:
                continue
            if not Path(target).is_relative_to(real_root):
                log.warning("data: skipping the symbolic link %s: it leads outside %s", path, real_root)
                continue
            try:
                info = os.stat(path)
            except OSError:  # a dangling link, or a file removed meanwhile
                continue
            seen_files.add(target)
            key = os.path.relpath(path, root).replace(os.sep, "/")
            found.append(FileInfo(key, info.st_size, f"{info.st_mtime_ns}:{info.st_size}"))
    return sorted(found, key=lambda f: f.key)


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
