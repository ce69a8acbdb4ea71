"""Validation on separate Ray actors, off the training path.

`ValidationPool` (in the steward's process) keeps a bounded queue of checkpoint steps and a few
`ValidatorActor`s. Each actor loads the pipeline once, then per step downloads only checkpoint-N's
adapter files from the run's storage, renders and scores them (relay_train.validate.render), and writes
`relay/validation/checkpoint-N/` (PNGs, grid.png, then scores.json last: its presence means done).
A background thread dispatches work and collects results; `submit` only touches the queue.

Placement: actors ask for `validation_num_gpus` GPUs plus any custom `resources`. Give validation nodes
a custom resource (e.g. {"validation": 1}) so an actor can never take a GPU the training workers need.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError

from orchestrator.core.cluster import assigned_cpus
from orchestrator.core.failure import Retries, Retry, decide
from orchestrator.core.ledger import EventType
from orchestrator.core.store import RunStorage
from relay_train import checkpoint as ckpt
from relay_train.artifacts import BENCHMARK, VALIDATION_DIR, checkpoint_name, validation_folder

__all__ = ["BENCHMARK", "VALIDATION_DIR"]  # and the names below
from relay_train.config import TrainConfig, load_config
from relay_train.logs import configure_logging
from relay_train.threads import size_threads

log = logging.getLogger(__name__)

Job = int | str  # a checkpoint step, or BENCHMARK (the base model, rendered once: every later step's reference)
OnResult = Callable[[int, dict, list[tuple[str, bytes]]], None]


# ---------------------------------------------------------------- policies (pure)


result_folder = validation_folder  # where a job's images and scores.json go, relative to the run folder


def is_validation_step(step: int, every: int) -> bool:
    return every > 0 and step > 0 and step % every == 0


def enqueue(queue: list[Job], job: Job, limit: int) -> list[Job]:
    """Add `job` to `queue` in place; past `limit` waiting steps the oldest are dropped (the newest wins).
    The benchmark goes first and neither counts nor is dropped: every later score is read against it.
    Returns the dropped steps."""
    if job in queue:
        return []
    if job == BENCHMARK:
        queue.insert(0, job)
        return []
    queue.append(job)
    steps = [j for j in queue if j != BENCHMARK]
    dropped = steps[: max(len(steps) - max(limit, 1), 0)]
    for old in dropped:
        queue.remove(old)
    return dropped


def load(config: TrainConfig | str | Path, overrides: dict | None) -> TrainConfig:
    """A TrainConfig as given, or loaded from its file with overrides."""
    return config if isinstance(config, TrainConfig) else load_config(config, overrides)


def flat_scores(summary: dict) -> dict[str, float]:
    """scores.json's per-variant aggregates as flat scalars for a tracker: {'adapter/clip_mean': ...}."""
    return {
        f"{variant}/clip_{stat}": value
        for variant, agg in summary.get("scores", {}).items()
        for stat, value in agg.items()
        if stat != "count"
    }


def pending_validations(steps: Iterable[int], every: int, done: Callable[[int], bool]) -> list[int]:
    """Validation steps among `steps` whose results are not in storage (e.g. cut short by a preemption)."""
    return [s for s in sorted(set(steps)) if is_validation_step(s, every) and not done(s)]


# ---------------------------------------------------------------- the actor


class ValidatorActor:
    """One pipeline, loaded once in __init__; `validate` swaps adapters in and out of it."""

    def __init__(self, config: TrainConfig | str, overrides: dict, storage: RunStorage, working_dir: str | None = None):
        from relay_train.model import pick_device, resolve_model_path
        from relay_train.validate.render import Validator

        configure_logging()
        if working_dir and Path(working_dir).is_dir():
            os.chdir(working_dir)  # relative model and prompt-file paths mean the job's directory
        self.config = load(config, overrides)
        size_threads(self.config.cpu_threads, assigned_cpus(), who="validation actor")
        self.storage = storage
        self.validator = Validator(self.config, resolve_model_path(self.config.pretrained_model_name_or_path), pick_device())

    def loads(self) -> int:
        """How many times this actor loaded the pipeline (1 for its whole life)."""
        return self.validator.loads

    def progress(self) -> int:
        """Images finished in the validation now running (answered while it runs: the actor has 2 threads)."""
        return self.validator.rendered

    def validate(self, job: Job) -> tuple[dict, list[tuple[str, bytes]]]:
        """Render job (a step, or BENCHMARK), write the results to storage; returns (summary, images)."""
        from relay_train.validate.render import checkpoint_variants
        from relay_train.validate.results import BASE, SCORES

        with tempfile.TemporaryDirectory(prefix="relay-validate-") as tmp:
            if job == BENCHMARK:
                step, adapters = 0, {BASE: None}
            else:
                step = int(job)
                folder = self._download_adapters(step, Path(tmp))
                adapters = checkpoint_variants(self.config, folder)
            result = self.validator.render(adapters, step)
        files = result.files()
        where = result_folder(job)
        for name, data in files:
            self.storage.write(f"{where}/{name}", data)
        summary = {
            **result.summary(),
            "kind": "benchmark" if job == BENCHMARK else "checkpoint",
            "location": self.storage.describe(where),
        }
        self.storage.write_json(f"{where}/{SCORES}", summary)  # last: marks the validation complete
        return summary, files

    def _download_adapters(self, step: int, dest: Path) -> Path:
        """Only the adapter files of checkpoint-N (not the optimizer state), checked against its manifest."""
        name = checkpoint_name(step)
        manifest = self.storage.read_json(f"{name}/{ckpt.MANIFEST}")
        if manifest is None:
            raise ckpt.CheckpointError(f"{self.storage.describe(name)} has no {ckpt.MANIFEST}: not a complete checkpoint")
        wanted = [ckpt.ADAPTER]
        if self.config.use_ema and self.config.ema_validation != "none" and ckpt.ADAPTER_EMA in manifest["files"]:
            wanted.append(ckpt.ADAPTER_EMA)
        folder = self.storage.download_checkpoint(step, dest, files=wanted)
        for file in wanted:
            entry = manifest["files"][file]
            if ckpt.sha256_file(folder / file) != entry["sha256"]:
                raise ckpt.CheckpointError(f"{self.storage.describe(name)}/{file} does not match its manifest sha256")
        return folder


# ---------------------------------------------------------------- the pool


class ValidationPool:
    """Bounded queue + Ray actors. `submit` never blocks; results reach `on_result` in this process.

    Life: construct (actors start loading at once), `start()` (the dispatch thread), `benchmark()`,
    `reconcile()` on a resume, `submit(step)` per committed checkpoint, `close(timeout)`.
    `on_result(step, summary, images)` runs on the pool's thread: step 0 is the benchmark; summary is
    scores.json's content; images are (file name, PNG bytes), each image then grid.png. Relative paths
    in the config resolve from `working_dir` (default: this cwd)."""

    def __init__(
        self,
        config: TrainConfig | str | Path,
        overrides: dict | None,
        storage: RunStorage,
        on_result: OnResult | None = None,
        num_actors: int | None = None,
        num_gpus: float | None = None,
        resources: dict[str, float] | None = None,
        queue_size: int | None = None,
        working_dir: str | None = None,
        num_cpus: float = 1.0,
        max_retries: int = 3,
    ):
        self.config = load(config, overrides)
        self.storage, self.on_result, self.max_retries = storage, on_result, max_retries
        self.queue_size = queue_size or self.config.validation_queue_size
        gpus = self.config.validation_num_gpus if num_gpus is None else num_gpus
        if num_gpus is None and gpus > 0 and not ray.cluster_resources().get("GPU"):
            # only when the caller left it to the config (in-process use, tests); a run's launch decides it
            # up front from the cluster config's validation_cpu_fallback
            log.warning("validation_num_gpus=%g but the cluster has no GPU: validation actors run on the CPU", gpus)
            gpus = 0
        self._options = {
            "num_cpus": num_cpus,
            "num_gpus": gpus,
            "resources": dict(resources or {}),
            "max_restarts": 0,
            "max_concurrency": 2,
        }  # 2: progress() answers during validate()
        source = config if isinstance(config, TrainConfig) else str(Path(config).resolve())
        self._args = (source, dict(overrides or {}), storage, working_dir or os.getcwd())
        self._actor_class = ray.remote(ValidatorActor)
        self.actors = [self._new_actor() for _ in range(num_actors or self.config.validation_actors)]
        self._lock = threading.Condition()
        self._queue: list[Job] = []
        self._idle = set(range(len(self.actors)))
        self._running: dict[Any, tuple[int, Job]] = {}  # ObjectRef -> (actor slot, job)
        self._tries: dict[Job, int] = {}
        self.completed: list[Job] = []
        self.skipped: list[Job] = []
        self.failed: dict[Job, str] = {}
        self.restarts = 0
        self._closing = self._stopped = False
        self._thread = threading.Thread(target=self._dispatch, name="validation-pool", daemon=True)

    def start(self) -> ValidationPool:
        """Start the thread that hands queued jobs to idle actors and collects results (once)."""
        with self._lock:
            if self._thread.ident is None and not self._stopped:
                self._thread.start()
        return self

    def _new_actor(self):
        return self._actor_class.options(**self._options).remote(*self._args)

    # -- what the steward calls --------------------------------------------------------------------
    def submit(self, step: int, force: bool = False) -> bool:
        """Queue checkpoint `step` when it is a validation step (or `force`); returns whether it was queued."""
        if not force and not is_validation_step(step, self.config.validation_every):
            return False
        return self._enqueue(step)

    def benchmark(self) -> bool:
        """Queue the base model's render (ahead of any step), unless disabled or already in storage."""
        from relay_train.validate.results import SCORES

        if self.config.disable_benchmark or self.storage.exists(f"{result_folder(BENCHMARK)}/{SCORES}"):
            return False
        return self._enqueue(BENCHMARK)

    def pending_after_resume(self, steps: Iterable[int]) -> list[int]:
        """Validation steps among committed `steps` that have no scores.json in storage."""
        from relay_train.validate.results import SCORES

        return pending_validations(
            steps, self.config.validation_every, lambda s: self.storage.exists(f"{result_folder(s)}/{SCORES}")
        )

    def reconcile(self, committed_steps: Iterable[int] | None = None) -> list[int]:
        """Re-queue what storage shows unfinished (a validation a preemption cut short); oldest first, so with
        more than queue_size pending the newest win. Defaults to the checkpoints storage holds."""
        steps = self.storage.checkpoint_steps() if committed_steps is None else committed_steps
        pending = self.pending_after_resume(steps)
        for step in pending:
            self._enqueue(step)
        if pending:
            log.info("validation: re-running %s (no scores in storage)", ", ".join(map(str, pending)))
        return pending

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is queued or running (tests, benchmarks and close)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._queue or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.5))
        return True

    def close(self, timeout: float = 60.0) -> bool:
        """Stop taking work, finish what is queued or running within `timeout`, then end the actors.
        Returns False when work was left (storage shows it unfinished; `reconcile` re-runs it next time)."""
        with self._lock:
            self._closing = True
            started = self._thread.ident is not None
        drained = self.wait_idle(timeout) if started else not (self._queue or self._running)
        with self._lock:
            self._stopped = True
            left = list(self._queue) + [job for _, job in self._running.values()]
            self._lock.notify_all()
        if started:
            self._thread.join(timeout=5)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if left:
            log.warning("validation pool closed with %s unfinished", ", ".join(map(str, left)))
        return drained

    def loads(self) -> list[int]:
        """Pipeline loads per live actor (each should say 1)."""
        return ray.get([actor.loads.remote() for actor in self.actors])

    def in_flight(self) -> list[Job]:
        with self._lock:
            return [job for _, job in self._running.values()]

    # -- the dispatcher thread ---------------------------------------------------------------------
    def _enqueue(self, job: Job) -> bool:
        with self._lock:
            if self._closing or job in self._jobs_locked() or job in self.completed:
                return False
            dropped = enqueue(self._queue, job, self.queue_size)
            self.skipped += dropped
            self._lock.notify_all()
        for old in dropped:
            log.warning(
                "validation of checkpoint-%s skipped: %d already waiting, the newest (%s) wins", old, self.queue_size, job
            )
        return True

    def _jobs_locked(self) -> list[Job]:
        return list(self._queue) + [job for _, job in self._running.values()]

    def _dispatch(self) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    return
                while self._queue and self._idle:
                    slot, job = self._idle.pop(), self._queue.pop(0)
                    self._running[self.actors[slot].validate.remote(job)] = (slot, job)
                refs = list(self._running)
                if not refs:
                    self._lock.wait(0.5)
                    continue
            done, _ = ray.wait(refs, num_returns=1, timeout=0.5)
            for ref in done:
                self._collect(ref)

    def _collect(self, ref) -> None:
        slot, job = self._running[ref]
        try:
            summary, images = ray.get(ref)
        except Exception as exc:
            # only a dead actor (node lost, OOM, killed) is retried; a render that raised (bad checkpoint,
            # bad prompt file) would raise again
            retries = Retries(limit=self.max_retries, only=(RayActorError,))
            decision = decide(exc, self._tries.get(job, 0) + 1, retries)
            if isinstance(exc, RayActorError):
                self._replace(slot, job, exc, retry=isinstance(decision, Retry))
                return
            with self._lock:
                self._running.pop(ref)
                self._idle.add(slot)
                self.failed[job] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                self._lock.notify_all()
            log.error("validation of %s failed: %s", result_folder(job), self.failed[job])
            return
        with self._lock:
            self._running.pop(ref)
            self._idle.add(slot)
            self.completed.append(job)
            self._lock.notify_all()
        if self.on_result is not None:
            try:
                self.on_result(0 if job == BENCHMARK else int(job), summary, images)
            except Exception:  # a failing consumer must not stop validations
                log.exception("validation on_result failed for %s", result_folder(job))

    def _replace(self, slot: int, job: Job, exc: Exception, retry: bool) -> None:
        """The actor died mid-validation (node lost, OOM, killed): a fresh actor takes its slot, and the job
        goes back to the front of the queue when the failure decision says retry (up to max_retries times)."""
        ray.kill(self.actors[slot], no_restart=True)
        with self._lock:
            self._running = {r: v for r, v in self._running.items() if v[0] != slot}
            self._tries[job] = self._tries.get(job, 0) + 1
            retry = retry and not self._stopped
            if retry:
                self.actors[slot] = self._new_actor()
                self.restarts += 1
                self._queue.insert(0, job)
                self._idle.add(slot)
            else:
                self.failed[job] = f"actor died {self._tries[job]} time(s): {type(exc).__name__}"
                if not self._stopped:
                    self.actors[slot] = self._new_actor()
                    self._idle.add(slot)
            self._lock.notify_all()
        log.warning(
            "validation actor %d died during %s (%s): restarted it; %s",
            slot,
            result_folder(job),
            type(exc).__name__,
            "re-running the job" if retry else "giving up on the job",
        )


class ValidationService:
    """The pool as one of the steward's services (`on_event`, `close`).

    The run's first event (run_started or attempt) queues the benchmark and re-queues validations storage
    shows unfinished; each `checkpoint` event submits that step. Each result is recorded in the ledger as
    a `validation` event (scores and where the images are) and handed to `forward(step, summary, images)`,
    e.g. to the tracker's log_validation, the Hub mirror's note_validation and the webhook's images."""

    makes_news = True  # the steward closes it before recording the run's end: its last results still count

    def __init__(
        self, pool_factory: Callable[[OnResult], ValidationPool], record: Callable[..., Any], forward: OnResult | None = None
    ):
        self.record, self.forward, self._started = record, forward, False
        self.pool = pool_factory(self._on_result)

    def start(self) -> ValidationService:
        self.pool.start()
        return self

    @classmethod
    def for_run(
        cls,
        config: TrainConfig | str | Path,
        storage: RunStorage,
        record: Callable[..., Any],
        forward: OnResult | None = None,
        overrides: dict | None = None,
        **pool_kwargs,
    ) -> ValidationService | None:
        """None when the config asks for no validation (validation_every 0)."""
        if load(config, overrides).validation_every <= 0:
            return None
        return cls(
            lambda on_result: ValidationPool(config, overrides, storage, on_result=on_result, **pool_kwargs), record, forward
        )

    def on_event(self, event: dict) -> None:
        kind = event.get("type")
        if kind in (EventType.RUN_STARTED, EventType.ATTEMPT) and not self._started:
            self._started = True
            self.pool.benchmark()
            self.pool.reconcile()
        elif kind == EventType.CHECKPOINT and event.get("step") is not None:
            self.pool.submit(int(event["step"]))

    def _on_result(self, step: int, summary: dict, images: list[tuple[str, bytes]]) -> None:
        self.record(
            EventType.VALIDATION,
            step,
            benchmark=summary.get("kind") == "benchmark",
            location=summary.get("location"),
            scores=summary.get("scores", {}),
            images=len(images),
            seconds=summary.get("seconds"),
        )
        if self.forward is not None:
            self.forward(step, summary, images)

    def close(self, timeout: float = 60.0) -> bool:
        return self.pool.close(timeout)
