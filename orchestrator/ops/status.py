"""`relay status RUN --storage ...`: where a run stands, read from storage alone (the ledger, the
progress file, Ray's committed checkpoints, validation scores, the Hub when the run mirrors to one).

Nothing here needs the cluster: it works from a laptop while the run goes on, or after it ended.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict

from relay_train.artifacts import CONFIG, GRID, SCORES, VALIDATION_DIR, checkpoint_name, hub_committed_steps, step_of

from orchestrator.core.ledger import LEDGER, PROGRESS, EventType, Ledger, summarize
from orchestrator.core.policy import stall_seconds
from orchestrator.core.store import SNAPSHOT, RunStorage

log = logging.getLogger(__name__)

VALIDATION = VALIDATION_DIR

# What each ledger event adds to the report (through ledger.summarize, or read here); a unit test adds each
# event to a run's ledger and checks that the report changes for these and only these.
SHOWN: dict[EventType, str] = {
    EventType.RUN_STARTED: "the cost (its hourly_cost), the stall threshold (stall_seconds); the first starts the wall clock",
    EventType.ATTEMPT: "the step it resumed at, restarts, steps lost and goodput",
    EventType.PROGRESS: "the step, the rate and goodput",
    EventType.CHECKPOINT: "the step",
    EventType.EMERGENCY_CHECKPOINT: "preemptions: the emergency checkpoints, with notice-to-commit times",
    EventType.PREEMPTION_NOTICE: "preemptions: the notices",
    EventType.EXPORTED: "the adapter",
    EventType.COMPLETED: "the state",
    EventType.STOPPED: "the state",
    EventType.FAILED: "the state and the error",
    EventType.WAITING_FOR_CAPACITY: "the state: waiting for capacity, until the next attempt",
}
NOT_SHOWN: dict[EventType, str] = {  # and why
    EventType.RESIZE: "each attempt carries its world size",
    EventType.VALIDATION: "the newest scores.json in storage is read instead",
    EventType.HUB_PUSHED: "the hub line asks the Hub itself",
    EventType.WARNING: "news for the driver's display and the webhook, not the run's standing",
    EventType.STOP_REQUESTED: "the stopped event that follows ends the run",
}


def gather(storage: RunStorage, hub: bool = True, now: float | None = None) -> dict:
    """Everything status shows, as plain data (what --json prints). Reads only; never writes."""
    now = now or time.time()
    ledger = Ledger(storage)
    events = ledger.events
    progress = storage.read_json(PROGRESS) or {}
    summary = summarize(storage.run_name, events, now, progress=progress)
    checkpoints = storage.checkpoint_steps()
    if summary.state == "not started" and checkpoints:
        summary.state = "unknown"  # checkpoints without a ledger: written by a run outside relay's steward
    hourly = latest(events, EventType.RUN_STARTED, "hourly_cost")
    last = summary.attempts[-1] if summary.attempts else None
    quiet = now - last.last_time if last else None
    stall_after = stall_seconds(summary.steps_per_second, latest(events, EventType.RUN_STARTED, "stall_seconds"))
    if summary.state == "running" and quiet is not None and quiet > stall_after:
        summary.state = "stalled"  # no step recorded for longer than the rate explains: an outage, a lost head
        summary.eta_seconds = None
    return {
        "run": storage.run_name,
        "storage": storage.describe(),
        "state": summary.state,
        "last_step": {"step": last.last_step, "time": last.last_time} if last else None,
        "seconds_since_last_step": quiet,
        "step": summary.step,
        "total_steps": summary.total_steps,
        "steps_per_second": summary.steps_per_second,
        "eta_seconds": summary.eta_seconds,
        "checkpoints": checkpoints,
        "hub": hub_checkpoints(storage, checkpoints) if hub else None,
        "last_validation": last_validation(storage),
        "preemption_notices": summary.preemption_notices,
        "emergency_checkpoints": [
            {"step": e.get("step"), "seconds_from_notice": e.get("seconds_from_notice")} for e in summary.emergency_checkpoints
        ],
        "attempts": [asdict(a) for a in summary.attempts],
        "steps_lost": summary.steps_lost,
        "goodput": summary.goodput,
        "wall_hours": summary.wall_seconds / 3600,
        "estimated_cost": round(hourly * summary.wall_seconds / 3600, 2) if hourly else None,
        "hourly_cost": hourly,
        "adapters": latest(events, EventType.EXPORTED, "files"),
        "error": latest(events, EventType.FAILED, "error") if summary.state == EventType.FAILED else None,
        "ledger": storage.describe(LEDGER),
        "ledger_unreadable_lines": ledger.unreadable,
        "last_event": summary.last_event,
    }


def latest(events: list[dict], kind: EventType, key: str):
    """`key` of the newest event of that kind, or None."""
    return next((e.get(key) for e in reversed(events) if e["type"] == kind), None)


def variant_scores(doc: dict) -> dict[str, dict]:
    """Per variant: {mean, min, max, ...} from a scores.json, whatever its vintage: `scores` is a dict by
    variant (current), or `variants` is (older); variants without CLIP scores are left out."""
    for key in ("scores", "variants"):
        value = doc.get(key)
        if isinstance(value, dict):
            return {v: s for v, s in value.items() if isinstance(s, dict) and "mean" in s}
    return {}


def last_validation(storage: RunStorage) -> dict | None:
    """The newest finished validation (its scores.json is written last, beside the images and grid.png)."""
    names = [n for n in storage.listdir(VALIDATION) if step_of(n) is not None]
    for name in sorted(names, key=step_of, reverse=True):
        try:
            scores = storage.read_json(f"{VALIDATION}/{name}/{SCORES}")
        except ValueError:
            continue  # a half-written scores.json: that validation is not finished
        if isinstance(scores, dict):
            return {
                "step": step_of(name),
                "scores": variant_scores(scores),
                "grid": storage.describe(f"{VALIDATION}/{name}/{scores.get('grid') or GRID}"),
                "images": len(scores.get("images") or []),
            }
    return None


def hub_checkpoints(storage: RunStorage, checkpoints: list[int]) -> dict | None:
    """The Hub repo's checkpoint folders, when the run's config mirrors to one; errors are shown, not raised."""
    if not checkpoints:
        return None
    config = storage.read_json(f"{checkpoint_name(checkpoints[-1])}/{CONFIG}") or {}
    repo = config.get("hub_model_id")
    if not repo or not (config.get("push_to_hub") or config.get("push_checkpoints_to_hub")):
        return None
    answer: dict = {}

    def ask() -> None:
        try:
            from huggingface_hub import HfApi

            answer["files"] = HfApi().list_repo_files(repo)
        except Exception as exc:  # any failure of the Hub is shown as the answer, never raised
            answer["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"

    # the client retries a refused connection for ~20 s: a person asking for status waits HUB_WAIT at most
    asking = threading.Thread(target=ask, name="relay-status-hub", daemon=True)
    asking.start()
    asking.join(HUB_WAIT_SECONDS)
    if "files" not in answer:
        return {"repo": repo, "error": answer.get("error", f"no answer within {HUB_WAIT_SECONDS:g} s")}
    return {"repo": repo, "checkpoints": sorted(hub_committed_steps(set(answer["files"])))}


HUB_WAIT_SECONDS = 8.0


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + (f"{hours}h {minutes:02d}m" if days or hours else f"{minutes}m {secs:02d}s")


OUTAGES = ("stalled", "waiting for capacity")  # states that say when the last step was


def render(report: dict) -> str:
    """The terminal view (plain text: it reads the same in a pipe, a log, or a terminal)."""
    rate, total = report.get("steps_per_second"), report.get("total_steps")
    pct = f" ({100 * report['step'] / total:.1f}%)" if total else ""
    state = report["state"]
    if state in OUTAGES and report.get("last_step"):
        last = report["last_step"]
        state += f": last step {last['step']} at {time.strftime('%H:%M:%S', time.localtime(last['time']))}"
        state += f", {_duration(report.get('seconds_since_last_step'))} ago"
    lines = [
        f"run        {report['run']}  [{state}]",
        f"storage    {report['storage']}",
        f"step       {report['step']} / {total or '?'}{pct}",
        f"rate       {f'{rate:.3f} steps/s' if rate else '-'}   ETA {_duration(report.get('eta_seconds'))}",
        f"checkpoints {', '.join(map(str, report['checkpoints'])) or 'none yet'}",
    ]
    if report.get("error"):
        lines.append(f"error      {report['error']}")
    if report.get("adapters"):
        lines.append(f"adapter    {', '.join(report['adapters'])}")
    hub = report.get("hub")
    if hub:
        shown = hub.get("error") or ", ".join(map(str, hub.get("checkpoints", []))) or "none yet"
        lines.append(f"hub        {hub['repo']}: {shown}")
    val = report.get("last_validation")
    if val:
        parts = [
            f"{variant} CLIP {s['mean']:.2f}"
            + (f" (min {s['min']:.2f}, max {s['max']:.2f})" if "min" in s and "max" in s else "")
            for variant, s in val["scores"].items()
        ]
        lines.append(f"validation step {val['step']}: {'; '.join(parts) or 'not scored'}; grid {val['grid']}")
    em = report["emergency_checkpoints"]
    waits = ", ".join(f"{e['seconds_from_notice']:.1f} s" for e in em if e.get("seconds_from_notice") is not None)
    lines.append(
        f"preemptions {report['preemption_notices']} notice(s), {len(em)} emergency checkpoint(s)"
        + (f" (notice to commit: {waits})" if waits else "")
    )
    restarts = report["attempts"][1:]
    if restarts:
        lines.append(
            "restarts   "
            + "; ".join(
                f"step {a['start_step']} ({a['reason']}, {a['world_size']} worker(s), back in {_duration(a['time_to_resume'])})"
                for a in restarts
            )
        )
        lost = [a["steps_lost"] for a in report["attempts"] if a["steps_lost"] is not None]
        lines.append(f"steps lost {', '.join(map(str, lost))}")
    goodput = report.get("goodput")
    lines.append(f"goodput    {f'{100 * goodput:.1f}%' if goodput is not None else '-'} over {report['wall_hours']:.2f} h wall")
    if report.get("estimated_cost") is not None:
        lines.append(f"cost       ~${report['estimated_cost']:.2f} at ${report['hourly_cost']:.2f}/h")
    if report.get("ledger_unreadable_lines"):
        lines.append(f"note       {report['ledger_unreadable_lines']} unreadable ledger line(s) skipped ({report['ledger']})")
    return "\n".join(lines)


class RunNotFound(LookupError):
    """No such run in that storage."""


def status(run: str, storage_path: str, endpoint_url: str | None = None, as_json: bool = False, hub: bool = True) -> str:
    storage = RunStorage(storage_path, run, endpoint_url)
    if not storage.listdir():
        if not storage.is_local:
            storage._check_bucket()  # an absent bucket lists as empty: OSError (exit 2), not "no such run"
        parent = RunStorage(storage_path, "", endpoint_url)
        runs = [n for n in parent.listdir() if parent.exists(f"{n}/{LEDGER}") or parent.exists(f"{n}/{SNAPSHOT}")]
        raise RunNotFound(
            f"no run {run!r} in {storage_path}" + (f"; runs there: {', '.join(runs)}" if runs else "; it holds no runs")
        )
    report = gather(storage, hub=hub)
    return json.dumps(report, indent=2, default=str) if as_json else render(report)


__all__ = ["RunNotFound", "gather", "render", "status"]
