"""Every command's exit codes: one number, one meaning, whichever command returns it.

The README's "Exit codes" table is `markdown()`'s text, and each command's row there lists the codes
`COMMANDS` gives it (tests/unit/test_exit_codes.py holds both to this file).
"""

from __future__ import annotations

import signal
import sys
from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    FAILED = 1
    CONFIG = 2
    NONFINITE = 3
    IN_USE = 4
    DISK_FULL = 5
    GAVE_UP = 6
    STOPPED = 7
    NO_SUCH_RUN = 8
    SIGINT = 128 + signal.SIGINT  # the shell's "ended by this signal": 130
    SIGPIPE = 128 + signal.SIGPIPE  # 141
    SIGTERM = 128 + signal.SIGTERM  # 143

    @property
    def meaning(self) -> str:
        return MEANING[self]


MEANING = {
    Exit.OK: "done: the run completed (or the command did what it was asked)",
    Exit.FAILED: "failed, and a retry may help (a lost worker group or head, a cluster that did not grow in time); "
    "also Python's own code for an unexpected error, with its traceback",
    Exit.CONFIG: "a config, model, data, checkpoint or storage problem, or a request the cluster can never fit: "
    "the message names the key and the fix; no retry helps until it is fixed",
    Exit.NONFINITE: "stopped on NaN/inf past `nonfinite_policy`; nothing non-finite was written or exported",
    Exit.IN_USE: "the run (its `output_dir`, or its `run_name` in storage) is in use by another run; "
    "the message names the holder",
    Exit.DISK_FULL: "disk full while checkpointing, caching or exporting: nothing half-written is kept, earlier "
    "checkpoints are intact",
    Exit.GAVE_UP: "the supervisor gave up after `--max-tries` submissions",
    Exit.STOPPED: "a person stopped the job (`ray job stop`)",
    Exit.NO_SUCH_RUN: "no such run in that storage (the runs that are there are named)",
    Exit.SIGINT: "ended by SIGINT (Ctrl-C) after a committed checkpoint, or at once on a second one; "
    "the newest complete checkpoint is intact and the same command resumes",
    Exit.SIGPIPE: "the reader of its output went away (piped into `head`, say): it stopped writing, quietly",
    Exit.SIGTERM: "ended by SIGTERM, as SIGINT",
}

_RUN = (Exit.OK, Exit.FAILED, Exit.CONFIG, Exit.NONFINITE, Exit.IN_USE, Exit.DISK_FULL, Exit.SIGINT, Exit.SIGTERM)

COMMANDS: dict[str, tuple[Exit, ...]] = {
    "relay launch": _RUN,
    "jobs/train.py": _RUN,
    "relay demo": _RUN,
    "relay train": (Exit.OK, Exit.CONFIG, Exit.NONFINITE, Exit.IN_USE, Exit.DISK_FULL, Exit.SIGINT, Exit.SIGTERM),
    "relay status": (Exit.OK, Exit.CONFIG, Exit.NO_SUCH_RUN, Exit.SIGPIPE),
    "relay supervise": (Exit.OK, Exit.CONFIG, Exit.NONFINITE, Exit.DISK_FULL, Exit.GAVE_UP, Exit.STOPPED),
    "relay supervise --kuberay": _RUN,
    "relay spot-agent": (Exit.OK, Exit.FAILED),
    "relay validate": (Exit.OK, Exit.CONFIG),
    "relay precompute": (Exit.OK, Exit.CONFIG, Exit.DISK_FULL),  # and jobs/precompute.py
    "relay make-tiny-model": (Exit.OK, Exit.CONFIG),
    "relay make-demo-data": (Exit.OK, Exit.CONFIG),
}
"""The codes each command can return, besides FAILED for an unexpected error (Python's own 1)."""


def for_error(exc: BaseException) -> Exit | None:
    """The one classification of the errors no retry can cure, with their code: `relay train` exits
    with it, and on Ray (orchestrator.core.failure.decide) the run ends at once with it instead of Ray
    Train restarting the worker group. None for every other error: a retry may help."""
    # an error's class is defined in a module already imported: a class whose module is not loaded cannot
    # be the error's, so nothing is imported to say so (a refused config never loads torch)
    permanent = (
        ("relay_train.nonfinite", "NonFiniteError", Exit.NONFINITE),  # the same data resumes into the same NaN
        ("relay_train.checkpoint", "RunLockedError", Exit.IN_USE),
        ("relay_train.checkpoint", "CheckpointWriteError", Exit.DISK_FULL),
        ("relay_train.config.problems", "ConfigError", Exit.CONFIG),  # the config, its files, or a data plan it cannot make
        ("relay_train.model", "ModelNotFoundError", Exit.CONFIG),
        ("relay_train.safe_write", "LinkRefusedError", Exit.CONFIG),  # a link where Relay writes: never written through
        ("relay_train.checkpoint", "CheckpointError", Exit.CONFIG),  # a checkpoint the run must not follow: never restarted
    )
    for module, name, code in permanent:
        kind = getattr(sys.modules.get(module), name, None)
        if kind is not None and isinstance(exc, kind):
            return code
    return None


def by_signal(signum: int) -> Exit:
    """The code of a run a signal stopped (the shell's 128 + signal number)."""
    return Exit(128 + signum)


def markdown() -> str:
    """The README's "Exit codes" table."""
    rows = [
        "| code | name | meaning | returned by |",
        "|---|---|---|---|",
    ]
    for code in Exit:
        users = [name for name, codes in COMMANDS.items() if code in codes]
        who = "every command" if len(users) == len(COMMANDS) else ", ".join(f"`{u}`" for u in users)
        rows.append(f"| {int(code)} | {code.name} | {code.meaning} | {who} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
