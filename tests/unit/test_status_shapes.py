"""`relay status` renders every run it can meet, in text and JSON, from storage alone, and never writes."""

from __future__ import annotations

import json

import pytest

from orchestrator.core.ledger import LEDGER, Ledger, summarize
from orchestrator.ops.status import gather, render, status
from orchestrator.core.ledger import PROGRESS
from orchestrator.core.store import SNAPSHOT, RunStorage

T0 = 1_000.0


def _commit(storage: RunStorage, root, *steps: int, config: dict | None = None) -> None:
    for step in steps:
        folder = root / storage.run_name / f"checkpoint-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "manifest.json").write_text("{}")
        (folder / "config.json").write_text(json.dumps(config or {}))
    storage.write_json(SNAPSHOT, {"checkpoint_results": [{"checkpoint_dir_name": f"checkpoint-{s}"} for s in steps]})


def _events(*kinds: tuple) -> list[dict]:
    return [
        {"time": T0 + t, "type": kind, **({"step": step} if step is not None else {}), **fields}
        for t, kind, step, fields in kinds
    ]


STARTED = (0, "run_started", None, {"total_steps": 300})
FRESH = (5, "attempt", 0, {"reason": "fresh", "world_size": 2, "total_steps": 300})


def _scores_clip() -> dict:  # scores.json as the validation pool writes it with CLIP on, comparison mode
    stats = {"mean": 25.0, "min": 20.0, "max": 30.0, "std": 3.0, "count": 2}
    return {
        "kind": "checkpoint",
        "step": 100,
        "variants": ["adapter", "ema"],
        "scores": {"adapter": stats, "ema": stats},
        "images": [{"file": "a.png"}, {"file": "b.png"}],
        "grid": "grid.png",
    }


def _scores_unscored() -> dict:  # CLIP off (the demo): variants is a list, scores empty
    return {
        "kind": "checkpoint",
        "step": 100,
        "variants": ["adapter", "ema"],
        "scores": {},
        "images": [{"file": "a.png"}],
        "grid": "grid.png",
    }


SHAPES = {
    "not started": ([], None, [], None),
    "before the first checkpoint": (
        [STARTED, FRESH],
        {"step": 12, "time": T0 + 20, "steps_per_second": 2.0, "total_steps": 300},
        [],
        None,
    ),
    "running": (
        [STARTED, FRESH, (30, "checkpoint", 50, {"uri": "x"})],
        {"step": 80, "time": T0 + 40, "steps_per_second": 2.0, "total_steps": 300},
        [50],
        _scores_unscored(),
    ),
    "resumed after a node loss": (
        [
            STARTED,
            FRESH,
            (30, "checkpoint", 50, {}),
            (60, "progress", 70, {"steps_per_second": 2.0}),
            (
                90,
                "attempt",
                50,
                {"reason": "node_lost", "world_size": 2, "steps_lost": 20, "time_to_resume": 30.0, "nodes_lost": ["n1"]},
            ),
        ],
        {"step": 60, "time": T0 + 100, "steps_per_second": 2.0, "total_steps": 300},
        [50],
        _scores_clip(),
    ),
    "failed": (
        [STARTED, FRESH, (30, "checkpoint", 50, {}), (35, "failed", None, {"error": "RuntimeError: boom"})],
        None,
        [50],
        None,
    ),
    "completed": (
        [
            STARTED,
            FRESH,
            (30, "checkpoint", 300, {}),
            (31, "exported", 300, {"files": ["out/a.safetensors"]}),
            (32, "completed", 300, {"goodput": "90.0%"}),
        ],
        {"step": 300, "time": T0 + 29, "total_steps": 300},
        [300],
        _scores_clip(),
    ),
    "stopped": (
        [STARTED, FRESH, (20, "stop_requested", 40, {}), (30, "checkpoint", 41, {}), (31, "stopped", 41, {"signal": 2})],
        None,
        [41],
        None,
    ),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_run_shape_renders_in_text_and_json(tmp_path, shape: str) -> None:
    events, progress, steps, scores = SHAPES[shape]
    storage = RunStorage(str(tmp_path), "r")
    ledger = Ledger(storage)
    ledger.events.extend(_events(*events))
    ledger.flush()
    if progress:
        storage.write_json(PROGRESS, progress)
    if steps:
        _commit(storage, tmp_path, *steps)
    if scores:
        storage.write_json("relay/validation/checkpoint-100/scores.json", scores)
    before = sorted(p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file())
    report = gather(storage, hub=False, now=T0 + 75)  # within a minute of the newest step: not stalled
    text = render(report)
    json.loads(json.dumps(report, default=str))
    assert sorted(p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()) == before  # read only
    expected_state = {
        "not started": "not started",
        "before the first checkpoint": "running",
        "running": "running",
        "resumed after a node loss": "running",
        "failed": "failed",
        "completed": "completed",
        "stopped": "stopped",
    }[shape]
    assert report["state"] == expected_state and f"[{expected_state}]" in text
    if shape == "before the first checkpoint":
        assert "checkpoints none yet" in text and report["step"] == 12 and report["eta_seconds"] == pytest.approx(144)
    if shape == "resumed after a node loss":
        assert "step 50 (node_lost, 2 worker(s), back in 0m 30s)" in text and report["steps_lost"] == 20
        assert "adapter CLIP 25.00 (min 20.00, max 30.00)" in text
    if shape == "running":
        assert "validation step 100: not scored; grid " in text and report["step"] == 80
    if shape == "failed":
        assert "error      RuntimeError: boom" in text
    if shape == "completed":
        assert "adapter    out/a.safetensors" in text and report["goodput"] is not None and report["goodput"] > 0


def test_a_ledger_line_cut_off_by_a_crash_is_skipped_and_counted(tmp_path) -> None:
    storage = RunStorage(str(tmp_path), "r")
    lines = [json.dumps(e) for e in _events(STARTED, FRESH, (30, "checkpoint", 50, {}))]
    storage.write(LEDGER, ("\n".join(lines) + '\n{"time": 1040.0, "type": "chec').encode())
    _commit(storage, tmp_path, 50)
    report = gather(storage, hub=False, now=T0 + 60)
    assert report["ledger_unreadable_lines"] == 1 and report["checkpoints"] == [50]
    assert "1 unreadable ledger line(s) skipped" in render(report)


def test_a_hub_that_errors_is_shown_not_raised(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: connection refused
    storage = RunStorage(str(tmp_path), "r")
    ledger = Ledger(storage)
    ledger.events.extend(_events(STARTED, FRESH))
    ledger.flush()
    _commit(storage, tmp_path, 50, config={"push_to_hub": True, "hub_model_id": "me/adapter"})
    report = gather(storage, hub=True, now=T0 + 60)
    assert report["hub"]["repo"] == "me/adapter" and report["hub"]["error"]
    assert "hub        me/adapter: " in render(report)


def test_goodput_is_one_figure_for_the_ledger_and_status() -> None:
    """The completed event's goodput (the steward) and status's come from the same fold: with the
    steward's progress folded in, a single-attempt run that trained 300 steps is not 0%."""
    events = _events(STARTED, FRESH)
    progress = {"step": 300, "time": T0 + 95, "total_steps": 300}
    end = {"time": T0 + 100, "type": "completed", "step": 300}
    with_end = summarize("r", [*events, end], progress=progress)
    assert with_end.goodput == pytest.approx(0.9, abs=0.05)
    assert summarize("r", [*events, end]).goodput == with_end.goodput  # the end event alone carries the step


def test_status_of_a_missing_run_names_what_is_there(tmp_path) -> None:
    storage = RunStorage(str(tmp_path), "real")
    Ledger(storage).record("run_started")
    with pytest.raises(LookupError, match="no run 'typo' .* runs there: real"):
        status("typo", str(tmp_path))


@pytest.mark.parametrize(
    ("extra", "state"),
    [([], "stalled"), ([(50, "waiting_for_capacity", 80, {"nodes_lost": ["n1"], "since": T0 + 40})], "waiting for capacity")],
)
def test_a_run_without_steps_for_longer_than_its_rate_explains_says_so_with_its_last_step(tmp_path, extra, state) -> None:
    import time

    storage = RunStorage(str(tmp_path), "r")
    ledger = Ledger(storage)
    ledger.events.extend(_events(STARTED, FRESH, (30, "checkpoint", 50, {"uri": "x"}), *extra))
    ledger.flush()
    storage.write_json(PROGRESS, {"step": 80, "time": T0 + 40, "steps_per_second": 2.0, "total_steps": 300})
    quiet = gather(storage, hub=False, now=T0 + 95)  # 55 s: a minute is the least a stall takes
    assert quiet["state"] == ("running" if not extra else state)
    report = gather(storage, hub=False, now=T0 + 170)  # 130 s without a step, at 2 steps/s
    at = time.strftime("%H:%M:%S", time.localtime(T0 + 40))
    assert report["state"] == state and report["eta_seconds"] is None
    assert f"[{state}: last step 80 at {at}, 2m 10s ago]" in render(report)


def test_a_stall_threshold_set_for_the_run_is_what_status_uses(tmp_path) -> None:
    """cluster.stall_seconds, recorded when the run started: 20 s without a step is a stall, not 60."""
    storage = RunStorage(str(tmp_path), "r")
    ledger = Ledger(storage)
    ledger.events.extend(_events((0, "run_started", None, {"total_steps": 300, "stall_seconds": 20}), FRESH))
    ledger.flush()
    storage.write_json(PROGRESS, {"step": 80, "time": T0 + 40, "steps_per_second": 2.0, "total_steps": 300})
    assert gather(storage, hub=False, now=T0 + 55)["state"] == "running"  # 15 s
    assert gather(storage, hub=False, now=T0 + 65)["state"] == "stalled"  # 25 s
