"""`relay status` against moto's S3 server: a bucket that is not there is unreadable storage (exit 2), not
"no such run" (exit 8), which stays the answer for an existing bucket without that run."""

from __future__ import annotations

from relay_train.exit_codes import Exit

from orchestrator.cli import main


def test_a_missing_bucket_exits_2_and_a_missing_run_8(s3_endpoint, s3_bucket, caplog):
    _, bucket = s3_bucket
    assert main(["status", "r", "--storage", "s3://no-such-bucket/runs", "--endpoint", s3_endpoint, "--no-hub"]) == Exit.CONFIG
    assert "S3 bucket 'no-such-bucket' does not exist" in caplog.text
    assert main(["status", "r", "--storage", f"s3://{bucket}/runs", "--endpoint", s3_endpoint, "--no-hub"]) == Exit.NO_SUCH_RUN
