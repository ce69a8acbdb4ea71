"""Job-level autoresume. The head node's loss ends a Ray job; Ray Train's own retries only cover the
worker group. The supervisor runs outside the cluster, submits `jobs/train.py` through Ray's job API,
and resubmits it (with backoff, up to a number of tries) whenever it fails or the head is replaced.
The run resumes from storage by its name.

Exit codes: relay_train/exit_codes.py (COMMANDS["relay supervise"]; the KubeRay mode's are
`relay launch`'s, see infra/k8s/README.md).
"""

from __future__ import annotations

import logging
import shlex
import threading
import time
import uuid
from dataclasses import dataclass

from orchestrator.core.failure import Fatal, Retries, Wait, decide, job_outcome
from relay_train.config.overrides import add_set_flag
from relay_train.exit_codes import Exit

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
    """Submit, watch, resubmit, as the failure decision says. Returns one of the exit codes above."""
    retries = Retries(limit=opts.max_tries - 1, base=opts.backoff, cap=opts.max_backoff)
    for attempt in range(1, opts.max_tries + 1):
        outcome, detail = run_once(opts, attempt)
        decision = decide(outcome, attempt, retries)
        if isinstance(decision, Fatal) and decision.code != Exit.GAVE_UP:
            log.info("supervisor: %s", detail)
            return decision.code
        if isinstance(decision, Fatal):
            break
        log.warning("supervisor: try %d/%d ended: %s; resubmitting in %.0f s", attempt, opts.max_tries, detail, decision.delay)
        sleep(decision.delay)
    log.error("supervisor: gave up after %d tries", opts.max_tries)
    return Exit.GAVE_UP


def run_once(opts: SuperviseOptions, attempt: int) -> tuple[Exit, str]:
    """One submission, watched to its end. The head may vanish meanwhile: wait for a head to answer
    again (a replaced head knows nothing of our job, which then counts as failed)."""
    client = connect(opts)
    if client is None:
        return Exit.FAILED, f"no head answered at {opts.address} for {opts.head_wait:.0f} s"
    submission = f"relay-{time.strftime('%Y%m%d-%H%M%S')}-{attempt}-{uuid.uuid4().hex[:6]}"
    deadline = time.monotonic() + opts.head_wait
    while True:  # a head that just started answers "no available agent" for a while
        try:
            client.submit_job(
                entrypoint=opts.entrypoint(), submission_id=submission, runtime_env={"working_dir": opts.working_dir}
            )
            break
        except Exception as exc:
            if AUTH_FAILURE in f"{type(exc).__name__} {exc}":
                return Exit.FAILED, AUTH_ADVICE
            if time.monotonic() >= deadline:
                return Exit.FAILED, f"submit failed: {type(exc).__name__}: {str(exc)[:300]}"
            log.info("supervisor: submit not accepted yet (%s); retrying", str(exc).splitlines()[0][:120])
            time.sleep(min(opts.poll, 5))
    log.info("supervisor: try %d submitted as %s", attempt, submission)
    follower = follow(client, submission)
    while True:
        time.sleep(opts.poll)
        try:
            info = client.get_job_info(submission)
        except Exception as exc:  # connection refused: the head is gone, perhaps being replaced
            log.warning("supervisor: head unreachable (%s); waiting for it", type(exc).__name__)
            client = connect(opts)
            if client is None:
                return Exit.FAILED, "the head did not come back"
            try:
                info = client.get_job_info(submission)
            except Exception:
                return Exit.FAILED, "the head was replaced and the job with it"
        if not info.status.is_terminal():
            continue
        # the job's last lines (its "completed at step N; adapter: ..." line) may still be on their way: the
        # tail ends with the job's log, so wait for it, boundedly, before saying how the job ended
        follower.join(timeout=LOG_DRAIN_SECONDS)
        code = getattr(info, "driver_exit_code", None)
        outcome = job_outcome(str(info.status.value), code)
        detail = {
            Exit.OK: f"job {submission} completed",
            Exit.STOPPED: f"job {submission} was stopped",
            Exit.CONFIG: f"job {submission} failed on its configuration: see `ray job logs {submission}`",
            Exit.NONFINITE: f"job {submission} stopped on NaN/inf: see `ray job logs {submission}`",
            Exit.DISK_FULL: f"job {submission} ran out of disk while checkpointing: see `ray job logs {submission}`",
        }
        return outcome, detail.get(
            outcome, f"job {submission} ended {info.status.value} (exit code {code}): {(info.message or '')[:200]}"
        )


LOG_DRAIN_SECONDS = 15.0  # how long an ended job's log tail may take to deliver its last lines
AUTH_FAILURE = "InvalidAuthToken"
AUTH_ADVICE = (
    "the head refused the submission's token (InvalidAuthToken): a head restarted on this machine picked up "
    "the ~/.ray/auth_token an earlier one left. Start the head and this command with RAY_AUTH_MODE=disabled, "
    "or remove ~/.ray/auth_token and restart the head (README, On a Ray cluster)"
)


def run_news(chunk: str) -> list[str]:
    """The lines of a chunk of the job's log worth echoing: not blank, not Ray's [state-dump] blocks."""
    return [line for line in chunk.splitlines() if line.strip() and "[state-dump]" not in line]


def follow(client, submission: str) -> threading.Thread:
    """Echo the job's own log (its progress line every 10 s and its milestone lines) here as it is
    written, on a daemon thread that ends with the job or the head. Ray's [state-dump] blocks are left
    out: they are the head's debugging, not the run's news."""
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission):
            for line in run_news(chunk):
                job_log.info("%s", line)

    def run() -> None:
        try:
            asyncio.run(tail())
        except Exception as exc:  # the head went away mid-tail: the status loop says so
            log.debug("supervisor: stopped following %s: %s", submission, exc)

    thread = threading.Thread(target=run, name=f"relay-follow-{submission}", daemon=True)
    thread.start()
    return thread


job_log = logging.getLogger("job")  # the job's lines, as its log has them


def connect(opts: SuperviseOptions):
    """A JobSubmissionClient once the head answers, or None after head_wait seconds."""
    from ray.job_submission import JobSubmissionClient

    # any error while connecting means the head is not answering yet (perhaps being replaced): wait, bounded
    head = Retries(wait_on=(Exception,), wait_for=f"the head at {opts.address} to answer", wait_seconds=opts.head_wait)
    deadline = None
    while True:
        try:
            return JobSubmissionClient(opts.address)
        except Exception as exc:
            wait = decide(exc, retries=head)
            assert isinstance(wait, Wait)
            deadline = deadline or time.monotonic() + wait.seconds
            if time.monotonic() >= deadline:
                log.error("supervisor: waited %.0f s for %s: %s", wait.seconds, wait.what, str(exc).splitlines()[0][:200])
                return None
            time.sleep(min(opts.poll, 10))


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="SimpleTuner-style config.json (path inside the working dir)")
    parser.add_argument("--cluster", help="cluster.json (workers, storage_path, failure limits)")
    add_set_flag(parser)
    add_set_flag(parser, "--cluster-set", "cluster")
    parser.add_argument("--address", default="http://127.0.0.1:8265", help="the head's dashboard address")
    parser.add_argument("--max-tries", type=int, default=20, help="submissions before giving up (exit 6, GAVE_UP)")
    parser.add_argument("--backoff", type=float, default=30.0, help="seconds before a resubmission; doubles each try")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between job status checks")
    parser.add_argument("--head-wait", type=float, default=900.0, help="how long to wait for an unreachable head")
    parser.add_argument("--working-dir", default=".", help="uploaded with each submission")
    parser.add_argument("--python", default="python", help="the interpreter the job's entrypoint runs")
    parser.add_argument(
        "--kuberay",
        action="store_true",
        help="run the job in this process (a RayJob's entrypoint): `relay launch`'s exit codes (1 retry, 2 config)",
    )


def run(args) -> int:
    if args.kuberay:
        from orchestrator.run.launch import run_job

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
