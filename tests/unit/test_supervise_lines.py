"""`relay supervise`'s pure parts: which of the job's log lines it echoes."""

from __future__ import annotations


def test_the_supervisor_echoes_the_runs_lines_without_rays_state_dumps() -> None:
    from orchestrator.ops.supervise import run_news

    chunk = (
        "00:01:02 step 40/300  loss 4.1  12.0 steps/s  ETA 0:00:21\n\n"
        "[state-dump] NodeManager:\n[state-dump] Node ID: 1f2e\n   \n"
        "00:01:05 checkpoint 50 committed: /runs/demo/checkpoint-50\n"
    )
    assert run_news(chunk) == [
        "00:01:02 step 40/300  loss 4.1  12.0 steps/s  ETA 0:00:21",
        "00:01:05 checkpoint 50 committed: /runs/demo/checkpoint-50",
    ]
