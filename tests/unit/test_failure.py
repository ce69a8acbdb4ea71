"""The one failure decision (orchestrator/core/failure.py), per error class and per attempt outcome."""

from __future__ import annotations

import pytest
from ray.exceptions import RayActorError

from orchestrator.core.failure import Fatal, FatalError, Retries, Retry, Wait, decide, job_outcome
from orchestrator.run.preflight import StorageError
from orchestrator.run.resources import ResourceError, RunInUseError
from relay_train.checkpoint import CheckpointError, CheckpointWriteError, RunLockedError
from relay_train.config import ConfigError
from relay_train.exit_codes import Exit
from relay_train.model import ModelNotFoundError
from relay_train.nonfinite import NonFiniteError


@pytest.mark.parametrize(
    "error, code",
    [
        (ConfigError(["learning_rate: 7 is above 1"]), Exit.CONFIG),
        (ModelNotFoundError("no model folder demo/tiny"), Exit.CONFIG),
        (CheckpointError("checkpoint-4 does not belong to this run"), Exit.CONFIG),
        (NonFiniteError("loss is nan at step 3"), Exit.NONFINITE),
        (CheckpointWriteError("No space left on device"), Exit.DISK_FULL),
        (RunLockedError("output_dir in use"), Exit.IN_USE),
        (StorageError("storage_path s3://nope is not writable"), Exit.CONFIG),
        (ResourceError("no place for a training worker", retryable=False), Exit.CONFIG),
        (ResourceError("waited 600 s for the cluster to grow", retryable=True), Exit.FAILED),
        (RunInUseError("run 'held' is in use"), Exit.IN_USE),
        (FatalError(Exit.NONFINITE, "run stopped: loss is nan"), Exit.NONFINITE),
    ],
)
def test_permanent_errors_are_fatal_with_their_code_whatever_the_retry_budget(error, code):
    for attempt, retries in ((1, Retries()), (1, Retries(limit=100, base=1, cap=8)), (7, Retries(limit=3))):
        decision = decide(error, attempt, retries)
        assert isinstance(decision, Fatal) and decision.code == code, decision
        assert decision.reason and "\n" not in decision.reason


def test_a_transient_error_is_retried_with_backoff_until_the_limit():
    error = RuntimeError("NCCL timeout\nwith a long trace")
    assert decide(error) == Retry(0.0, "RuntimeError: NCCL timeout")  # no budget given: Ray's own retries count
    assert [decide(error, n, Retries(limit=3, base=2, cap=5)) for n in (1, 2, 3)] == [
        Retry(2.0, "RuntimeError: NCCL timeout"),
        Retry(4.0, "RuntimeError: NCCL timeout"),
        Retry(5.0, "RuntimeError: NCCL timeout"),
    ]
    spent = decide(error, 4, Retries(limit=3))
    assert spent == Fatal(Exit.FAILED, "RuntimeError: NCCL timeout; gave up after 4 tries")


def test_only_the_named_errors_are_retried_when_an_executor_says_so():
    validation = Retries(limit=3, only=(RayActorError,))
    assert isinstance(decide(RayActorError(), 1, validation), Retry)  # the actor died: a fresh one re-runs it
    assert decide(RayActorError(), 4, validation).code == Exit.FAILED  # the fourth death: give up on the job
    render = decide(KeyError("prompt"), 1, validation)  # the render raised: it would raise again
    assert render == Fatal(Exit.FAILED, "KeyError: 'prompt'")


def test_a_not_yet_error_is_a_bounded_wait():
    head = Retries(wait_on=(ConnectionError,), wait_for="the head at http://h:8265 to answer", wait_seconds=900)
    assert decide(ConnectionError("refused"), 1, head) == Wait("the head at http://h:8265 to answer", 900)
    assert isinstance(decide(ConfigError(["x"]), 1, head), Fatal)  # permanence wins over waiting


@pytest.mark.parametrize(
    "code, decision",
    [
        (Exit.OK, Fatal(Exit.OK, "the attempt ended with exit code 0 (OK)")),
        (Exit.STOPPED, Fatal(Exit.STOPPED, "the attempt ended with exit code 7 (STOPPED)")),
        (Exit.CONFIG, Fatal(Exit.CONFIG, "the attempt ended with exit code 2 (CONFIG)")),
        (Exit.NONFINITE, Fatal(Exit.NONFINITE, "the attempt ended with exit code 3 (NONFINITE)")),
        (Exit.DISK_FULL, Fatal(Exit.DISK_FULL, "the attempt ended with exit code 5 (DISK_FULL)")),
        (Exit.FAILED, Retry(30.0, "the attempt ended with exit code 1")),
        (Exit.IN_USE, Retry(30.0, "the attempt ended with exit code 4")),  # the holder may end
        (143, Retry(30.0, "the attempt ended with exit code 143")),
        (99, Retry(30.0, "the attempt ended with exit code 99")),
    ],
)
def test_an_attempts_outcome(code, decision):
    assert decide(code, 1, Retries(limit=20, base=30, cap=600)) == decision


def test_the_last_failed_attempt_gives_up():
    assert decide(Exit.FAILED, 20, Retries(limit=19, base=30, cap=600)).code == Exit.GAVE_UP


@pytest.mark.parametrize(
    "status, code, outcome",
    [
        ("SUCCEEDED", 0, 0),
        ("STOPPED", None, 7),  # Exit.STOPPED
        ("FAILED", 2, 2),
        ("FAILED", 3, 3),  # NaN/inf: a resubmission resumes into the same NaN
        ("FAILED", 1, 1),
        ("FAILED", None, 1),
        ("FAILED", 4, 1),  # the run was held: the holder may be gone by the next try
        ("FAILED", 143, 1),  # a driver ended by SIGTERM (a head going away): resubmit
    ],
)
def test_supervise_outcome(status: str, code: int | None, outcome: int) -> None:
    assert job_outcome(status, code) == outcome
