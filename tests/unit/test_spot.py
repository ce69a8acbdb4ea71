"""The spot agent's side of the cloud: IMDSv2 and GCP metadata, against a fake service on loopback."""

from __future__ import annotations

import threading
import time

import pytest

from orchestrator.ops import spot
from support.fake_imds import FakeMetadata  # tests/ is on sys.path (conftest rootdir)


@pytest.fixture
def metadata():
    fake = FakeMetadata().start()
    yield fake
    fake.close()


def test_aws_answers_404_until_an_instance_action(metadata):
    source = spot.detect_cloud(aws_endpoint=metadata.url, gcp_endpoint="http://127.0.0.1:9")
    assert isinstance(source, spot.AwsSpot)
    assert source.poll() is None and source.poll() is None
    metadata.announce(seconds=120)
    notice = source.poll()
    assert notice.cloud == "aws" and notice.action == "terminate"
    assert 100 < notice.seconds_left() <= 121
    assert ("PUT", "/latest/api/token") in metadata.requests  # IMDSv2: a token first


def test_gcp_preempted_flag(metadata):
    source = spot.detect_cloud(aws_endpoint="http://127.0.0.1:9", gcp_endpoint=metadata.url)
    assert isinstance(source, spot.GcpSpot) and source.poll() is None
    metadata.announce()
    notice = source.poll()
    assert notice.cloud == "gcp" and 25 < notice.seconds_left() <= spot.GCP_NOTICE_SECONDS


def test_no_metadata_service_means_no_agent():
    assert spot.detect_cloud("http://127.0.0.1:9", "http://127.0.0.1:9") is None


def test_the_agent_polls_until_the_notice_then_drains(metadata):
    drained = []

    source = spot.AwsSpot(metadata.url)  # the real drain is exercised against Ray in test_preemption.py
    start = time.monotonic()
    assert spot.run_agent(source, "unused", "ab" * 14, interval=0.05, max_polls=3, drain=lambda *a: drained.append(a)) is None
    metadata.announce(seconds=60)
    notice = spot.run_agent(source, "gcs:1", "cd" * 14, interval=0.05, max_polls=20, drain=lambda *a: drained.append(a))
    assert notice is not None and len(drained) == 1 and drained[0][:2] == ("gcs:1", "cd" * 14)
    assert time.monotonic() - start < 10


def test_a_rebalance_recommendation_is_a_notice_two_minutes_out_unless_ignored(metadata):
    source = spot.AwsSpot(metadata.url)
    assert source.poll() is None
    metadata.recommend_rebalance()
    notice = source.poll()
    assert notice.cloud == "aws" and notice.action == "rebalance"
    assert spot.REBALANCE_NOTICE_SECONDS - 5 < notice.seconds_left() <= spot.REBALANCE_NOTICE_SECONDS
    assert ("GET", "/latest/meta-data/events/recommendations/rebalance") in metadata.requests
    assert spot.AwsSpot(metadata.url, rebalance=False).poll() is None
    metadata.announce(seconds=90)  # a reclaim notice wins over the recommendation: it carries the real deadline
    assert source.poll().action == "terminate"


def test_sigterm_drains_at_once_with_the_grace_left_even_without_metadata():
    drained, sigterm = [], threading.Event()
    threading.Timer(0.3, sigterm.set).start()
    start = time.monotonic()
    notice = spot.run_agent(
        None, "gcs:1", "ef" * 14, interval=30, max_polls=5, drain=lambda *a: drained.append(a), sigterm=sigterm, sigterm_grace=40
    )
    assert time.monotonic() - start < 5, "the signal must end the wait between polls"
    assert notice.cloud == "signal" and notice.action == "sigterm" and 35 < notice.seconds_left() <= 40
    assert drained == [("gcs:1", "ef" * 14, notice)]
