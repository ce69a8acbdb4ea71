"""The orchestrator's pure decisions (orchestrator/policy.py): no Ray, no I/O."""

from __future__ import annotations

import pytest

from orchestrator.core.policy import Ask, AttemptFacts, attempt_reason, fit_decision, keep_count, place, retention, share_cpus

WORKER = "num_workers, cpus_per_worker"


def test_two_workers_and_a_validator_at_one_cpu_never_fit_a_two_cpu_machine() -> None:
    asks = [Ask("training worker", 2, {"CPU": 1.0}, WORKER), Ask("validation actor", 1, {"CPU": 1.0}, "validation_cpus")]
    decision = fit_decision(asks, [{"CPU": 2.0, "memory": 1e9}], can_grow=False)
    assert not decision.fits and not decision.wait
    msg = decision.message
    assert "2 training worker(s) × {1 CPU}" in msg and "1 validation actor(s) × {1 CPU}" in msg
    assert "1 node(s) with 2 CPU" in msg and "memory" not in msg  # what the cluster has, in the units asked
    assert "validation_cpus" in msg or WORKER in msg  # the key to change


def test_the_demo_share_fits_and_so_does_a_bigger_machine() -> None:
    share = share_cpus(2, 3)
    assert share == 0.66
    asks = [Ask("training worker", 2, {"CPU": share}, WORKER), Ask("validation actor", 1, {"CPU": share}, "v")]
    assert fit_decision(asks, [{"CPU": 2.0}], can_grow=False).fits
    assert share_cpus(16, 3) == 1.0  # never more than one CPU each


def test_an_actor_must_fit_on_one_node() -> None:
    asks = [Ask("training worker", 1, {"CPU": 4.0}, WORKER)]
    assert place(asks, [{"CPU": 2.0}, {"CPU": 2.0}]) is asks[0]
    assert place(asks, [{"CPU": 2.0}, {"CPU": 4.0}]) is None


def test_gpus_and_custom_resources_are_checked() -> None:
    asks = [
        Ask("training worker", 4, {"CPU": 8, "GPU": 1, "train_gpu": 1}, WORKER),
        Ask("validation actor", 1, {"CPU": 1, "GPU": 1, "validation_gpu": 1}, "validation_resources"),
    ]
    head = {"CPU": 8}
    gpu_node = {"CPU": 32, "GPU": 4, "train_gpu": 4}
    val_node = {"CPU": 8, "GPU": 1, "validation_gpu": 1}
    assert fit_decision(asks, [head, gpu_node, val_node], can_grow=False).fits
    waiting = fit_decision(asks, [head, gpu_node], can_grow=True)  # the validation node is still coming up
    assert not waiting.fits and waiting.wait and "validation actor" in waiting.message


def test_retention_is_one_number_everywhere() -> None:
    assert keep_count(None) is None and keep_count(0) == 5 and keep_count(3) == 3  # null keeps all, as documented
    assert retention([50, 10, 30, 20, 40, 60], None) == ([10, 20, 30, 40, 50, 60], [])
    assert retention([50, 10, 30, 20, 40, 60], 5) == ([20, 30, 40, 50, 60], [10])
    assert retention([10, 20], 3) == ([10, 20], [])


@pytest.mark.parametrize(
    "facts, reason",
    [
        (AttemptFacts(resumed=False, first_in_job=True, had_attempt_before=False, notice_since_last=False), "fresh"),
        (AttemptFacts(resumed=True, first_in_job=True, had_attempt_before=True, notice_since_last=False), "resubmitted"),
        (AttemptFacts(resumed=True, first_in_job=False, had_attempt_before=True, notice_since_last=True), "preemption"),
        (
            AttemptFacts(
                resumed=True, first_in_job=False, had_attempt_before=True, notice_since_last=False, nodes_lost_since_last=["n1"]
            ),
            "node_lost",
        ),
        (
            AttemptFacts(
                resumed=True,
                first_in_job=False,
                had_attempt_before=True,
                notice_since_last=False,
                world_size=4,
                previous_world_size=2,
            ),
            "resize",
        ),
        (AttemptFacts(resumed=True, first_in_job=False, had_attempt_before=True, notice_since_last=False), "failure"),
        (
            AttemptFacts(
                resumed=True, first_in_job=True, had_attempt_before=True, notice_since_last=False, previous_job_ended=False
            ),
            "head_lost",
        ),
    ],
)
def test_attempt_reason(facts: AttemptFacts, reason: str) -> None:
    from orchestrator.core.ledger import AttemptReason
    from orchestrator.core.policy import UNPLANNED

    assert attempt_reason(facts) == reason and attempt_reason(facts) is AttemptReason(reason)
    assert (reason in UNPLANNED) == (reason in ("node_lost", "failure", "head_lost"))  # restarts without warning


def test_one_backoff_doubles_to_a_cap_with_optional_jitter() -> None:
    from orchestrator.core.policy import backoff

    assert [backoff(n, 2.0, 30.0) for n in (1, 2, 3, 4, 5, 6)] == [2, 4, 8, 16, 30, 30]
    assert backoff(3, 1.0, 60.0, jitter=0.0) == 2.0 and backoff(3, 1.0, 60.0, jitter=0.999) == pytest.approx(4.0, 0.01)


@pytest.mark.parametrize("status", [None, 408, 425, 429, 500, 502, 503])
def test_retry_delay_backs_off_on_no_answer_timeouts_rate_limits_and_server_errors(status: int | None) -> None:
    from orchestrator.core.policy import backoff, retry_delay

    assert [retry_delay(n, 2.0, 30.0, status=status) for n in (1, 2, 3, 4, 5, 6)] == [2, 4, 8, 16, 30, 30]
    for n, jitter in ((1, 0.0), (3, 0.5), (7, 0.999)):  # jittered: the draw is the caller's, the rule is backoff's
        assert retry_delay(n, 1.0, 8.0, status=status, jitter=jitter) == backoff(n, 1.0, 8.0, jitter)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422, 499])
def test_retry_delay_gives_up_on_a_request_that_will_never_be_accepted(status: int) -> None:
    from orchestrator.core.policy import retry_delay

    assert retry_delay(1, 1.0, 8.0, status=status) is None
    assert retry_delay(1, 1.0, 8.0, status=status, retry_after=2.0, jitter=0.5) is None  # a wait asked changes nothing


def test_retry_delay_honours_the_servers_wait_on_a_429_or_when_the_status_is_not_judged() -> None:
    from orchestrator.core.policy import retry_delay

    assert retry_delay(1, 1.0, 8.0, status=429, retry_after=2.5, jitter=0.5) == 2.5  # not backoff's 0.75
    assert retry_delay(5, 1.0, 8.0, status=429, retry_after=0.1) == 0.1  # nor its 8 after five failures
    assert retry_delay(1, 1.0, 8.0, status=429, retry_after=3600.0) == 3600.0  # unbounded unless told
    assert retry_delay(1, 2.0, 30.0, retry_after=7.0) == 7.0  # no status (the Hub mirror): the wait wins too
    assert retry_delay(1, 2.0, 30.0, retry_after=3600.0, longest_wait=30.0) == 30.0
    assert retry_delay(1, 2.0, 30.0, retry_after=-4.0) == 0.0  # never a negative wait
    # a Retry-After on a 5xx is not a rate limit's: backoff decides, as it does without one
    assert retry_delay(2, 1.0, 8.0, status=503, retry_after=30.0) == 2.0


def test_retry_after_reads_discord_bodies_seconds_and_http_dates() -> None:
    from email.utils import formatdate
    import time

    from orchestrator.core.policy import retry_after

    assert retry_after({"Retry-After": "7"}) == 7.0
    assert retry_after({"Retry-After": "1"}, {"retry_after": 0.25}) == 0.25  # Discord's body is finer
    assert retry_after({}, None) is None and retry_after(None) is None and retry_after({"Retry-After": "soon"}) is None
    assert 25 <= retry_after({"Retry-After": formatdate(time.time() + 30, usegmt=True)}) <= 30


def test_a_stall_is_twenty_steps_time_and_at_least_a_minute() -> None:
    from orchestrator.core.policy import stall_seconds

    assert stall_seconds(10.0) == 60.0 and stall_seconds(0.1) == 200.0  # the recipe's ~0.6 steps/s: 33 s -> 60 s
    assert stall_seconds(None) == 300.0  # no rate yet: a model may still be loading
    assert stall_seconds(10.0, configured=15.0) == 15.0 and stall_seconds(None, configured=15.0) == 15.0  # the cluster's
