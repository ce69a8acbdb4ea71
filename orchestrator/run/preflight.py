"""What the driver checks before any worker starts: whatever a restart cannot cure is refused here, in
seconds, with one line that says what to write instead (exit 2), rather than on every rank after Ray
Train has placed the workers.

- Paths: under `ray job submit --working-dir`, the job runs in Ray's temporary copy of the submitted
  folder (`.../runtime_resources/working_dir_files/_ray_pkg_<hash>/`), deleted at `ray stop` and made
  anew for a changed folder. A relative storage_path or output_dir there would put the run where nothing
  resumes it: refused. The model and the local data must exist; one that .gitignore (or .rayignore)
  kept out of the upload is named as such.
- Resubmission: a run already at its last step is done (exit 0, no workers); a max_train_steps below the
  run's newest checkpoint is refused, and nothing is written to the run.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from relay_train.config import ConfigError, TrainConfig
from relay_train.safe_write import write_atomic
from relay_train.exit_codes import Exit

from orchestrator.core.cluster import ClusterConfig, storage_filesystem
from orchestrator.core.failure import FatalError
from orchestrator.core.ledger import ENDINGS, EventType, Ledger
from orchestrator.core.store import SNAPSHOT, RunStorage

log = logging.getLogger(__name__)

RAY_COPY = "working_dir_files"  # Ray's runtime_resources/working_dir_files/_ray_pkg_<hash>/


def in_ray_working_dir_copy(cwd: Path | None = None) -> bool:
    """Whether this process runs in Ray's temporary copy of a `--working-dir` upload."""
    parts = (cwd or Path.cwd()).resolve().parts
    return RAY_COPY in parts or any(p.startswith("_ray_pkg_") for p in parts)


def _ignored_by_upload(rel: Path, root: Path) -> str | None:
    """The ignore file (.gitignore, .rayignore) that kept `rel` out of the upload, as Ray itself decides it."""
    try:
        from ray._private.runtime_env.packaging import _get_ignore_file
    except ImportError:  # another Ray: no hint, the missing path is still named
        return None
    for name in (".gitignore", ".rayignore"):
        match = _get_ignore_file(root, name)
        if match is not None and any(match(root / p) for p in (rel, *rel.parents) if str(p) != "."):
            return name
    return None


def _missing(key: str, value: str | Path, what: str, copy: bool, root: Path, elsewhere: str = "S3") -> str:
    rel = Path(value)
    text = f"{key}: no {what} at {value}"
    if copy and not rel.is_absolute():
        ignore = _ignored_by_upload(rel, root)
        if ignore:
            return (
                f"{text}: {ignore} lists it, so `ray job submit --working-dir` did not upload it. Point {key} "
                f"at an absolute path every node can read (or {elsewhere})"
            )
        return f"{text} in the submitted folder: it was not uploaded; use an absolute path every node can read"
    return text


def path_problems(config: TrainConfig, cluster: ClusterConfig, cwd: Path | None = None) -> list[str]:
    """Every path problem of the recipe and the cluster config, as ConfigError lines (empty: none)."""
    from relay_train.model import looks_local

    root = (cwd or Path.cwd()).resolve()
    copy = in_ray_working_dir_copy(root)
    problems = []
    if copy:
        where = (
            "is relative, and this job runs in Ray's temporary copy of the submitted folder, which `ray stop` "
            "deletes (a changed folder gets a new copy, so nothing would resume from it): write an absolute"
        )
        if not cluster.is_s3 and not Path(cluster.storage_path).expanduser().is_absolute():
            problems.append(
                f"storage_path {cluster.storage_path!r} {where} folder every node can write (e.g. "
                "/data/relay/ray) or s3://bucket/prefix"
            )
        if not Path(config.output_dir).expanduser().is_absolute():
            problems.append(f"output_dir '{config.output_dir}' {where} folder (e.g. /data/relay/{config.output_dir})")
    model = str(config.pretrained_model_name_or_path or "")
    if model and not (root / Path(model).expanduser()).is_dir():
        # owner/name is a Hub id (the workers fetch it) unless the upload's ignore file names that path
        if looks_local(model) or (copy and _ignored_by_upload(Path(model), root)):
            problems.append(_missing("pretrained_model_name_or_path", model, "model folder", copy, root, "a Hub id"))
    for backend in config.data_backends:
        folder = backend.instance_data_dir
        if backend.type == "local" and backend.dataset_type == "image" and folder:
            if not (root / Path(folder).expanduser()).is_dir():
                problems.append(_missing(f"{backend.id}.instance_data_dir", folder, "image folder", copy, root))
    return problems


def run_exists(cluster: ClusterConfig, name: str) -> bool:
    return RunStorage.from_cluster(cluster, name).exists(SNAPSHOT)


class StorageError(FatalError):
    """storage_path cannot be written: a missing bucket, wrong credentials, a read-only folder."""

    def __init__(self, message: str):
        super().__init__(Exit.CONFIG, message)


def check_storage(cluster: ClusterConfig) -> None:
    """Write and delete a probe before any worker starts: a bad bucket should fail in seconds, not at
    the first checkpoint hours in."""
    fs, root = storage_filesystem(cluster)
    try:
        if fs is None:
            probe = Path(root) / ".relay-write-probe"
            write_atomic(probe, b"ok")  # makes the folder; never through a link
            probe.unlink()
            return
        probe = f"{root}/.relay-write-probe"
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
    except OSError as exc:
        raise StorageError(
            f"storage_path {cluster.storage_path} is not writable: {str(exc).splitlines()[0][:300]}. "
            "Check the bucket exists, the credentials (AWS_* environment or instance role) and storage_endpoint_url."
        ) from exc


def check_resume_policy(config: TrainConfig, cluster: ClusterConfig, name: str) -> None:
    """resume_from_checkpoint none on an existing run would silently continue it: refuse instead."""
    if config.resume_from_checkpoint == "none" and run_exists(cluster, name):
        raise ConfigError(
            [
                f"--resume_from_checkpoint none, but run {name!r} already exists in {cluster.storage_path}: "
                "set resume_from_checkpoint latest to continue it, or a new run_name (cluster config) to start over"
            ]
        )


def _as_written(path: Path | None) -> str | None:
    """A path inside this job's folder as the user wrote it (relative), not inside Ray's copy of it."""
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def check_all(config: TrainConfig, cluster: ClusterConfig, storage: RunStorage) -> ResumeDecision:
    """Every driver-side check, in the order that writes nothing before a refusal could (the storage
    probe comes after the paths: a relative storage_path is never created in Ray's copy). Raises
    ConfigError or StorageError; returns what this submission does with the run."""
    problems = path_problems(config, cluster)
    if cluster.strategy == "deepspeed":  # a recipe ZeRO-2 cannot run fails here, not on every rank
        from relay_train.zero import check_config

        problems += check_config(config)
    if problems:
        raise ConfigError(problems, source=_as_written(config.source_path) or "the training config")
    check_storage(cluster)
    check_resume_policy(config, cluster, storage.run_name)
    decision = decide_resume(config, storage)
    if decision.action == "refuse":
        raise ConfigError([decision.message], source=storage.describe())
    return decision


# -- resubmission ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumeDecision:
    action: str  # "train" (fresh or resume), "done" (already completed: exit 0), "refuse" (exit 2)
    message: str = ""


def resume_decision(run: str, newest_step: int | None, total_steps: int | None, completed_at: int | None) -> ResumeDecision:
    """What a (re)submission of `run` does, from the newest committed checkpoint's step, the steps this
    submission asks for (None: counted in epochs, left to the workers) and the step of the run's last
    `completed` ending (None: it has none, or a later job began after it). Pure."""
    if newest_step is None or total_steps is None:
        return ResumeDecision("train")
    if total_steps < newest_step:
        return ResumeDecision(
            "refuse",
            f"run {run!r} is already at step {newest_step} (its newest checkpoint), past max_train_steps "
            f"{total_steps}: set max_train_steps to {newest_step} or more to continue it, or choose a new "
            "run_name (--cluster-set run_name=NEW) to train a new run",
        )
    if total_steps == newest_step and completed_at == newest_step:
        return ResumeDecision("done", f"run {run!r} already completed at step {newest_step}; nothing to train")
    return ResumeDecision("train")


def completed_at(events: list[dict]) -> int | None:
    """The step of the ledger's last ending when it is a completion, else None."""
    ending = next((e for e in reversed(events) if e["type"] in ENDINGS), None)
    return ending.get("step") if ending and ending["type"] == EventType.COMPLETED else None


def decide_resume(config: TrainConfig, storage: RunStorage) -> ResumeDecision:
    """resume_decision from the run's storage (one snapshot read and one ledger read)."""
    if config.resume_from_checkpoint == "none":
        return ResumeDecision("train")  # launch.check_resume_policy refuses an existing run
    steps = storage.checkpoint_steps()
    total = config.max_train_steps if config.max_train_steps > 0 else None
    return resume_decision(storage.run_name, steps[-1] if steps else None, total, completed_at(Ledger(storage).events))


_RAY_TEMP = re.compile(r"[^\s'\"(]*/(?:_ray_pkg_[0-9a-f]+|checkpoint_tmp_[0-9a-f]+|session_[\w-]+)(?:/[^\s'\")]*)?")


def _without_ray_temp(match: re.Match) -> str:
    """A path inside Ray's temporary folders, as the user knows it: what follows the working-dir copy, or
    the checkpoint's own name; Ray's session folder otherwise."""
    path = match.group(0)
    if (pkg := re.search(r"/_ray_pkg_[0-9a-f]+/?", path)) is not None:
        return path[pkg.end() :] or "the submitted folder"
    if "checkpoint_tmp_" in path:
        return path.rstrip("/").rsplit("/", 1)[-1]
    return "(Ray's session folder)"


def refusal_line(exc: BaseException | str) -> str:
    """One line for a person (a webhook, a chat, the ledger's failed event): the problems joined, no
    traceback, no path inside Ray's temporary folders."""
    problems = getattr(exc, "problems", None) or [str(exc).split("Traceback (most recent call last)")[0]]
    text = "; ".join(" ".join(p.split()) for p in problems if p.strip())
    return _RAY_TEMP.sub(_without_ray_temp, text)[:1500]


def notify_refusal(config: TrainConfig, run: str, exc: BaseException) -> None:
    """A refusal reaches the run's webhooks as one error-level message (the run never started, so no
    steward sends it); delivery is bounded by the notifier's own close."""
    if not config.webhook:
        return
    from orchestrator.services.notify import Notifier, WebhookType

    with Notifier(config.webhook, run, project=config.tracker_project_name) as notifier:
        notifier.event(WebhookType.FAILURE, "error", None, f"run {run} not started: {refusal_line(exc)}")


__all__ = [
    "RAY_COPY",
    "ResumeDecision",
    "StorageError",
    "check_all",
    "check_resume_policy",
    "check_storage",
    "completed_at",
    "decide_resume",
    "in_ray_working_dir_copy",
    "notify_refusal",
    "path_problems",
    "refusal_line",
    "resume_decision",
]
