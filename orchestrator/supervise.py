"""Job-level autoresume. The head node's loss ends a Ray job; Ray Train's own retries only cover the
worker group. The supervisor runs outside the cluster, submits `jobs/train.py` through Ray's job API,
and resubmits it (with backoff, up to a number of tries) whenever it fails or the head is replaced.
The run resumes from storage by its name.

Exit codes (also the KubeRay mode's, see infra/k8s/README.md):
  0  the run completed
  1  a retryable failure (KubeRay mode only: its RayJob backoffLimit retries)
  2  a configuration or storage error: no retry can help
  3  gave up after --max-tries submissions
  4  a person stopped the job (`ray job stop`)
"""

from __future__ import annotations

import logging
import shlex
import time
import uuid
from dataclasses import dataclass

from orchestrator.policy import COMPLETED, CONFIG_ERROR, GAVE_UP, RETRYABLE, STOPPED, backoff, supervise_outcome
from relay_train.config.overrides import add_set_flag

log = logging.getLogger(__name__)


@dataclass
class SuperviseOptions:
    address: str  # the head's dashboard, e.g. http://head:8265
    config: str
    cluster: str | None = None
    sets: tuple[str, ...] = ()
    cluster_sets: tuple[str, ...] = ()
    max_tries: int = 20
    backoff: float = 30.0  # seconds before the 2nd try; doubles each time, capped at max_backoff
    max_backoff: float = 600.0
    poll: float = 5.0
    head_wait: float = 900.0  # how long an unreachable head may take to come back, per try
    working_dir: str = "."
    python: str = "python"

    def entrypoint(self) -> str:
        parts = [self.python, "jobs/train.py", "--config", self.config]
        if self.cluster:
            parts += ["--cluster", self.cluster]
        for item in self.sets:
            parts += ["--set", item]
        for item in self.cluster_sets:
            parts += ["--cluster-set", item]
        return shlex.join(parts)


def supervise(opts: SuperviseOptions, sleep=time.sleep) -> int:
    """Submit, watch, resubmit. Returns one of the exit codes above."""
    for attempt in range(1, opts.max_tries + 1):
        outcome, detail = run_once(opts, attempt)
        if outcome in (COMPLETED, CONFIG_ERROR, STOPPED):
            log.info("supervisor: %s", detail)
            return outcome
        if attempt == opts.max_tries:
            break
        wait = backoff(attempt, opts.backoff, opts.max_backoff)
        log.warning("supervisor: try %d/%d ended: %s; resubmitting in %.0f s", attempt, opts.max_tries, detail, wait)
        sleep(wait)
    log.error("supervisor: gave up after %d tries", opts.max_tries)
    return GAVE_UP


def run_once(opts: SuperviseOptions, attempt: int) -> tuple[int, str]:
    """One submission, watched to its end. The head may vanish meanwhile: wait for a head to answer
    again (a replaced head knows nothing of our job, which then counts as failed)."""
    client = connect(opts)
    if client is None:
        return RETRYABLE, f"no head answered at {opts.address} for {opts.head_wait:.0f} s"
    submission = f"relay-{time.strftime('%Y%m%d-%H%M%S')}-{attempt}-{uuid.uuid4().hex[:6]}"
    deadline = time.monotonic() + opts.head_wait
    while True:  # a head that just started answers "no available agent" for a while
        try:
            client.submit_job(
                entrypoint=opts.entrypoint(), submission_id=submission, runtime_env={"working_dir": opts.working_dir}
            )
            break
        except Exception as exc:
            if time.monotonic() >= deadline:
                return RETRYABLE, f"submit failed: {type(exc).__name__}: {str(exc)[:300]}"
            log.info("supervisor: submit not accepted yet (%s); retrying", str(exc).splitlines()[0][:120])
            time.sleep(min(opts.poll, 5))
    log.info("supervisor: try %d submitted as %s", attempt, submission)
    while True:
        time.sleep(opts.poll)
        try:
            info = client.get_job_info(submission)
        except Exception as exc:  # connection refused: the head is gone, perhaps being replaced
            log.warning("supervisor: head unreachable (%s); waiting for it", type(exc).__name__)
            client = connect(opts)
            if client is None:
                return RETRYABLE, "the head did not come back"
            try:
                info = client.get_job_info(submission)
            except Exception:
                return RETRYABLE, "the head was replaced and the job with it"
        if not info.status.is_terminal():
            continue
        code = getattr(info, "driver_exit_code", None)
        outcome = supervise_outcome(str(info.status.value), code)
        detail = {
            COMPLETED: f"job {submission} completed",
            STOPPED: f"job {submission} was stopped",
            CONFIG_ERROR: f"job {submission} failed on its configuration: see `ray job logs {submission}`",
        }
        return outcome, detail.get(
            outcome, f"job {submission} ended {info.status.value} (exit code {code}): {(info.message or '')[:200]}"
        )


def connect(opts: SuperviseOptions):
    """A JobSubmissionClient once the head answers, or None after head_wait seconds."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + opts.head_wait
    while True:
        try:
            return JobSubmissionClient(opts.address)
        except Exception as exc:
            if time.monotonic() >= deadline:
                log.error("supervisor: %s did not answer: %s", opts.address, str(exc).splitlines()[0][:200])
                return None
            time.sleep(min(opts.poll, 10))


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="SimpleTuner-style config.json (path inside the working dir)")
    parser.add_argument("--cluster", help="cluster.json (workers, storage_path, failure limits)")
    add_set_flag(parser)
    add_set_flag(parser, "--cluster-set", "cluster")
    parser.add_argument("--address", default="http://127.0.0.1:8265", help="the head's dashboard address")
    parser.add_argument("--max-tries", type=int, default=20, help="submissions before giving up (exit 3)")
    parser.add_argument("--backoff", type=float, default=30.0, help="seconds before a resubmission; doubles each try")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between job status checks")
    parser.add_argument("--head-wait", type=float, default=900.0, help="how long to wait for an unreachable head")
    parser.add_argument("--working-dir", default=".", help="uploaded with each submission")
    parser.add_argument("--python", default="python", help="the interpreter the job's entrypoint runs")
    parser.add_argument(
        "--kuberay",
        action="store_true",
        help="run the job in this process (a RayJob's entrypoint): exit 0 done, 1 retry, 2 config",
    )


def run(args) -> int:
    if args.kuberay:
        from orchestrator.launch import run_job

        return run_job(args.config, args.cluster, args.set, args.cluster_set)
    return supervise(
        SuperviseOptions(
            address=args.address,
            config=args.config,
            cluster=args.cluster,
            sets=tuple(args.set),
            cluster_sets=tuple(args.cluster_set),
            max_tries=args.max_tries,
            backoff=args.backoff,
            poll=args.poll,
            head_wait=args.head_wait,
            working_dir=args.working_dir,
            python=args.python,
        )
    )
