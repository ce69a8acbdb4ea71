"""Hold the loop at a chosen step, to reproduce a race on purpose: a node lost, a link cut or a group
resized at a known step rather than whenever a fast run happens to be there.

`RELAY_HOLD_FILE=<path>` in a worker's environment: while that file exists and holds a step number N, the
loop trains no step past N (it waits before step N+1, reading the file every 50 ms). Write a larger N to
let it go on to there; delete the file to let it run free. Every rank reads the same file, so every rank
holds at the same step and no collective is left half-joined. Unset (the normal case), the loop never
looks. A file that is not (yet) a number holds the loop where it is: write the number whole."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

HOLD_ENV = "RELAY_HOLD_FILE"
CHECK_EVERY_S = 0.05

log = logging.getLogger(__name__)


@dataclass
class Hold:
    path: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Hold | None:
        value = environ.get(HOLD_ENV)
        return cls(Path(value)) if value else None

    def limit(self) -> int | None:
        """The step the loop may reach now: None when the file is gone (no hold)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return int(text.strip())
        except ValueError:
            return -1  # being written: hold where it is

    def wait(self, step: int) -> None:
        """Return once the loop, at `step`, may train step + 1."""
        said = False
        while (limit := self.limit()) is not None and step >= limit:
            if not said:
                log.info("holding before step %d: %s=%s says %s", step + 1, HOLD_ENV, self.path, limit)
                said = True
            time.sleep(CHECK_EVERY_S)
        if said:
            log.info("released at step %d", step)
