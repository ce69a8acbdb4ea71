"""One run's folder in storage (`<storage_path>/<run name>/`), as every orchestrator service sees it.

Ray owns the `checkpoint-N/` folders and `checkpoint_manager_snapshot.json`: we read them and never
delete them. Our own files live beside them under `relay/` (ledger events, W&B id, validation images,
the webhook spool). A RunStorage is a FileStore rooted at the run folder; like every FileStore it is small
and picklable, so it can be handed to Ray actors and tasks, and each process opens its own filesystem.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from relay_train import checkpoint as ckpt
from relay_train.artifacts import OURS, SNAPSHOT, checkpoint_name, is_committed, step_of
from relay_train.config.names import path_part_problem
from relay_train.safe_write import make_dir, write_atomic
from relay_train.data.store import FileStore

__all__ = ["OURS", "SNAPSHOT", "RunStorage"]


class RunStorage(FileStore):
    def __init__(self, storage_path: str, run_name: str, endpoint_url: str | None = None):
        if not storage_path.startswith("s3://"):
            storage_path = str(Path(storage_path).expanduser().resolve())  # the same folder whatever the cwd
        if run_name and (problem := path_part_problem(run_name)):  # every command checked it already; the last guard
            raise ValueError(f"run name {run_name!r} {problem}")
        self.storage_path, self.run_name = storage_path, run_name
        super().__init__("/".join(p for p in (storage_path.rstrip("/"), run_name) if p), endpoint_url)

    @classmethod
    def from_cluster(cls, cluster, run_name: str) -> RunStorage:
        return cls(cluster.storage_path, run_name, cluster.storage_endpoint_url)

    def __getstate__(self):
        return {"storage_path": self.storage_path, "run_name": self.run_name, "endpoint_url": self.endpoint_url}

    def __setstate__(self, state):
        self.__init__(**state)

    # -- small files: reads give None when the file is absent ------------------------------------------
    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return self.read(rel)
        except FileNotFoundError:
            return None

    def read_json(self, rel: str):
        data = self.read_bytes(rel)
        return None if data is None else json.loads(data)

    def write_json(self, rel: str, value) -> None:
        self.write(rel, json.dumps(value, indent=1, sort_keys=True).encode())

    def delete(self, rel: str) -> None:
        """Delete one of OUR files or folders. Ray's checkpoint folders are refused."""
        if not rel.strip("/").startswith(OURS + "/"):
            raise ValueError(f"refusing to delete {rel!r}: only files under {OURS}/ are ours to delete")
        from pyarrow import fs

        path = self._path(rel)
        with self._named_errors(rel):
            kind = self.fs.get_file_info(path).type
            if kind == fs.FileType.Directory:
                self.fs.delete_dir(path)
            elif kind == fs.FileType.File:
                self.fs.delete_file(path)

    def upload_dir(self, local: Path, rel: str) -> None:
        """Copy a local folder's files to rel/ (overwriting)."""
        for file in sorted(Path(local).rglob("*")):
            if file.is_file():
                self.write(f"{rel}/{file.relative_to(local).as_posix()}", file.read_bytes())

    # -- checkpoints (Ray's; read only) ---------------------------------------------------------------
    def checkpoint_steps(self) -> list[int]:
        """Steps of the committed checkpoints, oldest first: named in Ray's snapshot (written once an
        upload finished) and with our manifest present. A folder whose upload died part-way is never listed."""
        snapshot = self._snapshot()
        steps = []
        for result in snapshot.get("checkpoint_results", []):
            name = result.get("checkpoint_dir_name", "")
            if (step := step_of(name)) is not None and is_committed(self.exists, name):
                steps.append(step)
        return sorted(steps)

    def _snapshot(self, reads: int = 5) -> dict:
        """Ray's snapshot, {} before its first checkpoint. Ray rewrites the file in place, so a read can
        catch it empty or cut short: read again, and after `reads` torn reads raise OSError, which every
        caller already treats as storage that cannot be read right now."""
        for attempt in range(reads):
            data = self.read_bytes(SNAPSHOT)
            if data is None:
                return {}
            try:
                return json.loads(data)
            except ValueError:
                time.sleep(0.05 * (attempt + 1))
        raise OSError(f"{self.describe(SNAPSHOT)} did not parse in {reads} reads: it is being rewritten")

    def download_checkpoint(self, step: int, dest: Path, files: list[str] | None = None) -> Path:
        """Copy checkpoint-<step> (or only `files` from it) into dest/checkpoint-<step>, verified against
        its manifest when whole. Returns the local folder."""
        name = checkpoint_name(step)
        folder = Path(dest) / name
        make_dir(folder)
        manifest = self.read_json(f"{name}/{ckpt.MANIFEST}")
        if manifest is None:
            raise ckpt.CheckpointError(f"{self.describe(name)} has no {ckpt.MANIFEST}: it is not a complete checkpoint")
        wanted = files or [*manifest["files"], ckpt.MANIFEST]
        for rel in wanted:
            data = self.read_bytes(f"{name}/{rel}")
            if data is None:
                raise ckpt.CheckpointError(f"{self.describe(name)} lacks {rel}")
            write_atomic(folder / rel, data)
        if files is None:
            ckpt.verify_checkpoint(folder)
        return folder
