"""The one failure decision: what to do about an error, or about an attempt's outcome.

`decide` is a pure function (no Ray, no clock, no I/O) returning Retry (after a delay), Fatal (an exit
code from relay_train/exit_codes.py and a one-line reason) or Wait (for what, up to how long). Those who
carry it out:
- the worker (run/worker.py): Fatal goes to the steward, the driver sees it and ends the fit, so Ray
  Train never restarts a group for a permanent error. Ray 2.60's Train V2 takes no failure policy from
  a user (create_failure_policy always builds DefaultFailurePolicy, an internal class), so this side
  channel is the public way; Retry is Ray's own, within FailureConfig(max_failures) (launch.py);
- the driver (run/launch.run_job): its exit code is the decision's (Retry: FAILED, a resubmission may help);
- the validation pool (services/validation.py): a dead actor is replaced and its job re-run, a render
  that raised is not;
- the supervisor (ops/supervise.py): a finished submission's exit code, and backoff between submissions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator.core.policy import backoff, retry_delay
from relay_train.exit_codes import Exit, for_error


@dataclass(frozen=True)
class Retry:
    delay: float  # seconds before the next try
    reason: str


@dataclass(frozen=True)
class Fatal:
    code: Exit
    reason: str


@dataclass(frozen=True)
class Wait:
    what: str  # what must happen first, for a person: "the head at http://head:8265 to answer"
    seconds: float  # the longest wait before it counts as a failure


Decision = Retry | Fatal | Wait


@dataclass(frozen=True)
class Retries:
    """How one executor retries: at most `limit` retries (None: no bound), backoff(attempt, base, cap)
    between them; `only`, when given, the error types worth retrying (anything else is Fatal)."""

    limit: int | None = None
    base: float = 0.0
    cap: float = 0.0
    only: tuple[type[BaseException], ...] | None = None
    wait_on: tuple[type[BaseException], ...] = ()  # errors that mean "not yet": Wait, not Retry
    wait_for: str = ""  # what they wait for, for a person
    wait_seconds: float = 0.0  # the longest such wait
    longest_wait: float = math.inf  # the most a server's Retry-After may make us wait (HttpFailure)


PERMANENT_EXITS = (Exit.CONFIG, Exit.NONFINITE, Exit.DISK_FULL)
"""A finished attempt's exit codes that a resubmission would meet again."""


def job_outcome(status: str, driver_exit_code: int | None) -> Exit:
    """A finished submission's outcome, as an exit code for decide: OK, STOPPED (a person ran `ray job
    stop`), the driver's own code when it is permanent (jobs/train.py exited CONFIG, NONFINITE or
    DISK_FULL: no resubmission helps), else FAILED (a lost head or driver included: resubmit)."""
    if status == "SUCCEEDED":
        return Exit.OK
    if status == "STOPPED":
        return Exit.STOPPED
    if status == "FAILED" and driver_exit_code in PERMANENT_EXITS:
        return Exit(driver_exit_code)
    return Exit.FAILED


def reason_of(error: BaseException) -> str:
    text = str(error).splitlines()[0][:300] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class HttpFailure(Exception):
    """A request that did not get a 2xx: `status` None when no answer came (a connection error, a
    timeout); `retry_after` what the server asked for (policy.retry_after)."""

    def __init__(self, status: int | None, retry_after: float | None = None):
        super().__init__(f"the receiver answered {status}" if status is not None else "no answer")
        self.status, self.retry_after = status, retry_after


def decide(
    error: BaseException | Exit | int, attempt: int = 1, retries: Retries = Retries(), jitter: float | None = None
) -> Decision:
    """What to do after `attempt` failed tries ended in `error`: an exception, or an exit code (a
    submission's driver). A permanent error (relay_train.exit_codes.for_error, or a code in
    PERMANENT_EXITS) is Fatal with its code; a transient one is retried until `retries.limit`, then
    Fatal: GAVE_UP for an attempt's outcome, FAILED (a later run may still help) for an error. An
    HttpFailure is retried as policy.retry_delay says (its status, the server's Retry-After, `jitter`)."""
    if isinstance(error, int):
        code = Exit(error) if error in {int(c) for c in Exit} else Exit.FAILED
        if code in PERMANENT_EXITS or code in (Exit.OK, Exit.STOPPED):
            return Fatal(code, f"the attempt ended with exit code {int(error)} ({code.name})")
        reason, exhausted = f"the attempt ended with exit code {int(error)}", Exit.GAVE_UP
    else:
        if (code := for_error(error)) is not None:
            return Fatal(code, reason_of(error))
        if isinstance(error, FatalError):
            return Fatal(error.code, str(error))
        if isinstance(error, HttpFailure):  # policy.retry_delay: a 4xx other than 408/425/429 never passes
            delay = retry_delay(
                attempt,
                retries.base,
                retries.cap,
                status=error.status,
                retry_after=error.retry_after,
                jitter=jitter,
                longest_wait=retries.longest_wait,
            )
            return Fatal(Exit.FAILED, str(error)) if delay is None else Retry(delay, str(error))
        if retries.wait_on and isinstance(error, retries.wait_on):
            return Wait(retries.wait_for, retries.wait_seconds)
        if retries.only is not None and not isinstance(error, retries.only):
            return Fatal(Exit.FAILED, reason_of(error))
        reason, exhausted = reason_of(error), Exit.FAILED
    if retries.limit is not None and attempt > retries.limit:
        return Fatal(exhausted, f"{reason}; gave up after {attempt} tries")
    return Retry(backoff(attempt, retries.base, retries.cap) if retries.base else 0.0, reason)


class FatalError(RuntimeError):
    """An error that already carries its decision: the code it ends the command with."""

    def __init__(self, code: Exit, message: str):
        super().__init__(message)
        self.code = code
