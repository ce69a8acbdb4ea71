"""One run's folder in storage (`<storage_path>/<run name>/`), as every orchestrator service sees it.

Ray owns the `checkpoint-N/` folders and `checkpoint_manager_snapshot.json`: we read them and never
delete them. Our own files live beside them under `relay/` (ledger events, W&B id, validation images,
the webhook spool). The object is small and picklable, so it can be handed to Ray actors and tasks;
each process opens its own filesystem on first use.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path
from urllib.parse import urlparse

from relay_train import checkpoint as ckpt

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2 writes it beside the run's checkpoints
OURS = "relay"  # everything of ours under the run folder
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class RunStorage:
    def __init__(self, storage_path: str, run_name: str, endpoint_url: str | None = None):
        self.storage_path, self.run_name, self.endpoint_url = storage_path, run_name, endpoint_url
        self._fs = None

    @classmethod
    def from_cluster(cls, cluster, run_name: str) -> RunStorage:
        path = cluster.storage_path
        if not path.startswith("s3://"):
            path = str(Path(path).expanduser().resolve())  # the same folder whatever the reader's cwd
        return cls(path, run_name, cluster.storage_endpoint_url)

    def __getstate__(self):
        return {"storage_path": self.storage_path, "run_name": self.run_name, "endpoint_url": self.endpoint_url}

    def __setstate__(self, state):
        self.__init__(**state)

    # -- where things are ---------------------------------------------------------------------------
    @property
    def is_s3(self) -> bool:
        return self.storage_path.startswith("s3://")

    def filesystem(self):
        """(pyarrow filesystem or None for a local folder, root path as that filesystem names it)."""
        if not self.is_s3:
            return None, str(Path(self.storage_path).expanduser().resolve())
        if self._fs is None:
            from pyarrow import fs

            if self.endpoint_url:
                endpoint = urlparse(self.endpoint_url)
                self._fs = fs.S3FileSystem(endpoint_override=endpoint.netloc, scheme=endpoint.scheme or "https")
            else:
                self._fs = fs.S3FileSystem()
        parsed = urlparse(self.storage_path)
        return self._fs, f"{parsed.netloc}{parsed.path}".rstrip("/")

    def _path(self, rel: str = "") -> str:
        _, root = self.filesystem()
        return "/".join(p for p in (root, self.run_name, rel.strip("/")) if p)

    def uri(self, rel: str = "") -> str:
        """How a person would name it: s3://bucket/prefix/run/rel or the local path."""
        base = self.storage_path.rstrip("/") if self.is_s3 else self._path()
        if self.is_s3:
            base = f"{base}/{self.run_name}"
        return f"{base}/{rel.strip('/')}" if rel else base

    # -- small files --------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        fs, _ = self.filesystem()
        if fs is None:
            return Path(self._path(rel)).exists()
        from pyarrow import fs as pafs

        return fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        fs, _ = self.filesystem()
        try:
            if fs is None:
                return Path(self._path(rel)).read_bytes()
            with fs.open_input_stream(self._path(rel)) as fh:
                return fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            if fs is not None and ("NoSuchKey" in str(exc) or "not found" in str(exc).lower()):
                return None
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Whole-object write: on S3 a PUT is atomic; locally, write a temp file and rename."""
        fs, _ = self.filesystem()
        if fs is None:
            path = Path(self._path(rel))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            return
        with fs.open_output_stream(self._path(rel)) as out:
            out.write(data)

    def read_json(self, rel: str):
        data = self.read_bytes(rel)
        return None if data is None else json.loads(data)

    def write_json(self, rel: str, value) -> None:
        self.write_bytes(rel, json.dumps(value, indent=1, sort_keys=True).encode())

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under rel (files and folders), sorted; [] when it does not exist."""
        fs, _ = self.filesystem()
        if fs is None:
            folder = Path(self._path(rel))
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        from pyarrow import fs as pafs

        try:
            infos = fs.get_file_info(pafs.FileSelector(self._path(rel), allow_not_found=True))
        except FileNotFoundError:
            return []
        return sorted(info.base_name for info in infos)

    def delete(self, rel: str) -> None:
        """Delete one of OUR files or folders. Ray's checkpoint folders are refused."""
        if not rel.strip("/").startswith(OURS + "/"):
            raise ValueError(f"refusing to delete {rel!r}: only files under {OURS}/ are ours to delete")
        fs, _ = self.filesystem()
        path = self._path(rel)
        if fs is None:
            p = Path(path)
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            return
        from pyarrow import fs as pafs

        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)

    def upload_dir(self, local: Path, rel: str) -> None:
        """Copy a local folder's files to rel/ (overwriting)."""
        for file in sorted(Path(local).rglob("*")):
            if file.is_file():
                self.write_bytes(f"{rel}/{file.relative_to(local).as_posix()}", file.read_bytes())

    # -- checkpoints (Ray's; read only) ---------------------------------------------------------------
    def checkpoint_steps(self) -> list[int]:
        """Steps of the committed checkpoints, oldest first: named in Ray's snapshot (written once an
        upload finished) and with our manifest present. A folder whose upload died part-way is never listed."""
        snapshot = self.read_json(SNAPSHOT) or {}
        steps = []
        for result in snapshot.get("checkpoint_results", []):
            match = _CHECKPOINT.match(result.get("checkpoint_dir_name", ""))
            if match and self.exists(f"{match.group(0)}/{ckpt.MANIFEST}"):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def download_checkpoint(self, step: int, dest: Path, files: list[str] | None = None) -> Path:
        """Copy checkpoint-<step> (or only `files` from it) into dest/checkpoint-<step>, verified against
        its manifest when whole. Returns the local folder."""
        name = f"checkpoint-{step}"
        folder = Path(dest) / name
        folder.mkdir(parents=True, exist_ok=True)
        manifest = self.read_json(f"{name}/{ckpt.MANIFEST}")
        if manifest is None:
            raise ckpt.CheckpointError(f"{self.uri(name)} has no {ckpt.MANIFEST}: it is not a complete checkpoint")
        wanted = files or [*manifest["files"], ckpt.MANIFEST]
        for rel in wanted:
            data = self.read_bytes(f"{name}/{rel}")
            if data is None:
                raise ckpt.CheckpointError(f"{self.uri(name)} lacks {rel}")
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
        if files is None:
            ckpt.verify_checkpoint(folder)
        return folder
