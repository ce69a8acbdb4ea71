"""Reading a run's ledger in a test: its events of one kind, and whether a checkpoint landed since a restart."""

from __future__ import annotations

from orchestrator.core.ledger import Ledger
from orchestrator.core.store import RunStorage


def events(storage: RunStorage, kind: str) -> list[dict]:
    """The run's ledger events of type `kind`, oldest first."""
    return [e for e in Ledger(storage).events if e["type"] == kind]


def checkpointed_since_the_last_attempt(storage: RunStorage, step: int | None = None) -> bool:
    """A checkpoint (at `step`, when given) was recorded after the newest attempt started."""
    since = events(storage, "attempt")[-1]["time"]
    return any(e["time"] > since and step in (None, e["step"]) for e in events(storage, "checkpoint"))
