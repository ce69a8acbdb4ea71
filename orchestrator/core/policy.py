"""The orchestrator's decisions, as pure functions of plain data: no Ray, no I/O, no clock.

Executors (launch, the steward, the services) gather the facts, ask here, and carry out the answer,
so every decision is unit-tested on its own (tests/unit/test_policy.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from orchestrator.core.ledger import AttemptReason
from relay_train.checkpoint import DEFAULT_KEEP, keep_count, keep_newest

__all__ = [
    "DEFAULT_KEEP",
    "Ask",
    "AttemptFacts",
    "FitDecision",
    "attempt_reason",
    "backoff",
    "fit_decision",
    "keep_count",
    "keep_newest",
    "place",
    "retention",
    "retry_after",
    "retry_delay",
    "share_cpus",
    "stall_seconds",
]

Bundle = dict[str, float]  # one actor's resource request, Ray's names ("CPU", "GPU", custom)


# -- what the run asks of the cluster ------------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """One kind of actor the run needs: `count` of them, each asking for `bundle`."""

    what: str  # for a person: "training worker", "validation actor"
    count: int
    bundle: Bundle
    key: str  # the cluster.json key that sizes it, named in the refusal


@dataclass(frozen=True)
class FitDecision:
    fits: bool  # every actor has a place on the cluster as it is (totals, not what is free now)
    wait: bool  # it does not fit yet, but the cluster can grow: wait, up to a bound
    message: str  # what was asked, what the cluster has, what to change (empty when it fits)


def describe(bundle: Bundle) -> str:
    return ", ".join(f"{_num(v)} {k}" for k, v in sorted(bundle.items()) if v) or "nothing"


def _num(value: float) -> str:
    return f"{value:g}"


def place(asks: list[Ask], nodes: list[Bundle]) -> Ask | None:
    """First-fit decreasing of every actor onto the nodes' total resources; the first ask that finds no
    node, or None when all fit. (Ray packs each actor whole on one node: 4 CPUs on two 2-CPU nodes never fit.)"""
    free = [dict(n) for n in nodes]
    actors = [(ask, ask.bundle) for ask in asks for _ in range(ask.count)]
    actors.sort(key=lambda a: (a[1].get("GPU", 0), a[1].get("CPU", 0)), reverse=True)
    for ask, bundle in actors:
        node = next((n for n in free if all(n.get(k, 0) + 1e-9 >= v for k, v in bundle.items() if v)), None)
        if node is None:
            return ask
        for k, v in bundle.items():
            node[k] = node.get(k, 0) - v
    return None


def fit_decision(asks: list[Ask], nodes: list[Bundle], can_grow: bool) -> FitDecision:
    """Whether the run can start on this cluster, should wait for it to grow, or can never start."""
    missing = place(asks, nodes)
    if missing is None:
        return FitDecision(True, False, "")
    total: Bundle = {}
    for node in nodes:
        for k, v in node.items():
            total[k] = total.get(k, 0) + v
    asked = "; ".join(f"{a.count} {a.what}(s) × {{{describe(a.bundle)}}}" for a in asks if a.count)
    biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    shown = {"CPU", "GPU", *_custom(asks)}  # the units the run asks in, not memory or node labels

    def only(bundle: Bundle) -> Bundle:
        return {k: v for k, v in bundle.items() if k in shown}

    has = f"{len(nodes)} node(s) with {describe(only(total))} in all, the largest {describe(only(biggest))}"
    message = (
        f"the run asks for {asked}; the cluster has {has}: no place for a {missing.what} "
        f"({describe(missing.bundle)}). Lower or change {missing.key} in the cluster config"
    )
    return FitDecision(False, can_grow, message)


def _custom(asks: list[Ask]) -> set[str]:
    return {k for a in asks for k in a.bundle if k not in ("CPU", "GPU")}


def share_cpus(cpus: float, actors: int, most: float = 1.0) -> float:
    """CPUs per actor so that `actors` of them fit on `cpus` (at most `most` each), rounded down to a
    hundredth: the local demo's 2 workers and 1 validation actor on a 2-CPU machine get 0.66 each."""
    if actors <= 0:
        return most
    return min(most, math.floor(100 * cpus / actors) / 100)


# -- retention -----------------------------------------------------------------------------------------
# One rule for every store: relay_train.checkpoint.keep_count / keep_newest (the trainer's local folder
# uses it too, and relay_train never imports the orchestrator), imported above with the other policies.


def retention(steps: list[int], limit: int | None) -> tuple[list[int], list[int]]:
    """(kept, dropped), each oldest first: the newest keep_count(limit) steps are kept."""
    kept, dropped = keep_newest(steps, keep_count(limit))
    return sorted(kept), sorted(dropped)


# -- attempts ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptFacts:
    """What the steward knows when a worker group starts training."""

    resumed: bool  # it restored a checkpoint
    first_in_job: bool  # no attempt yet in this job (a new or resubmitted job)
    had_attempt_before: bool  # the run had an attempt before (in this job or an earlier one)
    notice_since_last: bool  # a preemption notice arrived during the previous attempt
    nodes_lost_since_last: list[str] = field(default_factory=list)  # nodes of the previous attempt now dead
    world_size: int = 1
    previous_world_size: int | None = None
    previous_job_ended: bool = True  # the job before this one recorded its end (a lost head records none)


def attempt_reason(f: AttemptFacts) -> AttemptReason:
    """Why this worker group is training."""
    if not f.resumed:
        return AttemptReason.FRESH
    if not f.had_attempt_before:
        return AttemptReason.RESUBMITTED
    if f.first_in_job:
        return AttemptReason.RESUBMITTED if f.previous_job_ended else AttemptReason.HEAD_LOST
    if f.notice_since_last:
        return AttemptReason.PREEMPTION
    if f.nodes_lost_since_last:
        return AttemptReason.NODE_LOST
    if f.previous_world_size is not None and f.world_size > f.previous_world_size:
        return AttemptReason.RESIZE  # an elastic group grew back: Ray restarted it with more workers
    return AttemptReason.FAILURE


STALL_FLOOR_SECONDS = 60.0  # a checkpoint's upload or a validation hand-off pauses the steps for seconds, not this
STALL_STEPS = 20  # ...nor for this many steps' time


def stall_seconds(steps_per_second: float | None, configured: float | None = None) -> float:
    """How long without a recorded step before a run counts as stalled (`relay status`) or, with a node of
    its group gone, as waiting for capacity (the steward): the cluster's `stall_seconds` when set, else
    20 steps' time, at least a minute; 5 minutes before a rate is known (a model still loading)."""
    if configured:
        return configured
    return max(STALL_FLOOR_SECONDS, STALL_STEPS / steps_per_second) if steps_per_second else 5 * STALL_FLOOR_SECONDS


UNPLANNED = (
    AttemptReason.NODE_LOST,
    AttemptReason.FAILURE,
    AttemptReason.HEAD_LOST,
)  # attempts that ended without warning: alerts, not news


# -- retries -------------------------------------------------------------------------------------------


def backoff(attempt: int, base: float, cap: float, jitter: float | None = None) -> float:
    """Seconds before try `attempt + 1` after `attempt` failures: base·2^(attempt−1), at most cap. With
    `jitter` (a uniform draw in [0, 1)) half the delay is randomised, so that restarted senders do not
    retry in step. The one backoff of the Hub mirror, the webhooks and the supervisor."""
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    return ceiling if jitter is None else ceiling / 2 + jitter * ceiling / 2


RETRYABLE_4XX = (408, 425, 429)  # request timeout, too early, too many requests: the same request may pass later


def retry_delay(
    attempt: int,
    base: float,
    cap: float,
    *,
    status: int | None = None,
    retry_after: float | None = None,
    jitter: float | None = None,
    longest_wait: float = math.inf,
) -> float | None:
    """Seconds before try `attempt + 1` after `attempt` failures, or None to give up. The one retry rule
    of the Hub mirror and the webhooks.

    `status` is the failed try's HTTP status, None when there was no answer (a connection error, a
    timeout) or the caller retries whatever the answer (the Hub mirror). A 4xx other than 408, 425 and
    429 will never be accepted: give up. `retry_after` (what the server asked for, policy.retry_after)
    wins on a 429 or when no status is given, bounded by `longest_wait`; otherwise backoff(attempt,
    base, cap, jitter)."""
    if status is not None and (300 <= status < 400 or (400 <= status < 500 and status not in RETRYABLE_4XX)):
        return None  # a redirect (never followed) or a refusal: the same request will never be accepted
    if retry_after is not None and status in (None, 429):
        return min(max(retry_after, 0.0), longest_wait)
    return backoff(attempt, base, cap, jitter)


def retry_after(headers, body: dict | None = None) -> float | None:
    """Seconds a server asked us to wait: Discord's JSON `retry_after` first, then the Retry-After
    header, in seconds or as an HTTP date; None when neither says."""
    if isinstance(body, dict) and body.get("retry_after") is not None:
        try:
            return max(0.0, float(body["retry_after"]))
        except (TypeError, ValueError):
            pass
    value = headers.get("Retry-After") if headers is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        import time

        return max(0.0, when.timestamp() - time.time())


# -- the supervisor ------------------------------------------------------------------------------------
