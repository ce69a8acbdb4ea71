"""One background worker: a bounded queue drained by one thread, so that a caller never waits on I/O.

`put(item)` only appends (microseconds; never raises, never blocks on I/O). The thread hands each item,
oldest first, to `handle(item)`; an item stays at the head of the queue until handled, so whatever
looks at `items()` (a spool, a count) sees it. When `handle` raises, orchestrator.core.failure.decide
says what happens: Retry (the same item again after the delay; `on_trouble()` runs before the wait and
whenever an item arrives during it) or Fatal (`on_give_up(item, decision)`, then the next item). Past
`max_queue` items, the one `drop(items)` picks goes (default: the oldest), and `on_drop(item)` hears of
it. `close(timeout)` stops taking items, handles what fits before the deadline, and ends the thread.

Users: the webhook channels (services/notify.py) and the W&B tracker (services/tracking.py). The Hub
mirror (services/hub.py) is not a queue: it moves the repo toward a desired state, one commit for many
steps, so it keeps its own loop; the validation pool (services/validation.py) dispatches to several Ray
actors at once. Both retry as failure.decide says.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from orchestrator.core.failure import Decision, Fatal, Retries, decide

log = logging.getLogger(__name__)

T = TypeVar("T")


class Background(Generic[T]):
    def __init__(
        self,
        name: str,
        handle: Callable[[T], Any],
        *,
        max_queue: int,
        retries: Retries = Retries(limit=0),
        drop: Callable[[list[T]], int] | None = None,
        on_drop: Callable[[T], None] | None = None,
        on_give_up: Callable[[T, Decision], None] | None = None,
        on_trouble: Callable[[], None] | None = None,
        on_start: Callable[[], None] | None = None,
        on_end: Callable[[], None] | None = None,
        decide_for: Callable[[BaseException, int], Decision] | None = None,
    ) -> None:
        self.name, self.handle, self.max_queue, self.retries = name, handle, max_queue, retries
        self.drop, self.on_drop, self.on_give_up = drop, on_drop, on_give_up
        self.on_trouble, self.on_start, self.on_end = on_trouble, on_start, on_end
        self.decide_for = decide_for or (lambda exc, attempt: decide(exc, attempt, self.retries))
        self.cond = threading.Condition()
        self.queue: deque[T] = deque()
        self.closing_at: float | None = None  # monotonic deadline once close() began
        self.closed = False  # no more put()s
        self.stats = {"handled": 0, "dropped": 0, "given_up": 0, "retries": 0}
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- the caller's side ------------------------------------------------------------------------------
    def start(self) -> Background[T]:
        with self.cond:
            if self.thread.ident is None:
                self.thread.start()
        return self

    def put(self, item: T) -> bool:
        """Queue `item`; False when closed (not queued)."""
        with self.cond:
            if self.closed:
                return False
            self.queue.append(item)
            self._bound()
            self.cond.notify_all()
            return True

    def put_front(self, items: Iterable[T]) -> None:
        """Queue `items` ahead of everything, in their order (e.g. spooled from an earlier run)."""
        with self.cond:
            self.queue.extendleft(reversed(list(items)))
            self._bound()
            self.cond.notify_all()

    def items(self) -> list[T]:
        with self.cond:
            return list(self.queue)

    def pending(self) -> int:
        return len(self.queue)

    def past_deadline(self) -> bool:
        return self.closing_at is not None and time.monotonic() >= self.closing_at

    def close(self, timeout: float) -> bool:
        """Take no more items; handle what fits within `timeout`; True when the thread ended with the queue empty."""
        self.begin_close(time.monotonic() + timeout)
        self.start()  # never started: it handles what is queued now, then ends
        self.thread.join(max(0.0, self.closing_at - time.monotonic()) + 0.05)
        return not self.thread.is_alive() and not self.queue

    def begin_close(self, deadline: float) -> None:
        """Take no more items, and stop handling at `deadline` (monotonic)."""
        with self.cond:
            self.closed, self.closing_at = True, deadline
            self.cond.notify_all()

    # -- the thread -------------------------------------------------------------------------------------
    def _bound(self) -> None:
        while len(self.queue) > self.max_queue:
            items = list(self.queue)
            victim = items[self.drop(items) if self.drop else 0]
            self.queue.remove(victim)
            self.stats["dropped"] += 1
            if self.on_drop:
                self.on_drop(victim)

    def _done(self, item: T) -> None:
        with self.cond:
            if item in self.queue:  # it may have been dropped meanwhile
                self.queue.remove(item)

    def _run(self) -> None:
        if self.on_start:
            try:
                self.on_start()
            except Exception as exc:  # noqa: BLE001 - start-up trouble must not stop live work
                log.warning("%s: could not start cleanly: %s", self.name, type(exc).__name__)
        attempt = 0
        while True:
            with self.cond:
                while not self.queue and self.closing_at is None:
                    self.cond.wait()
                if not self.queue or self.past_deadline():
                    break
                item = self.queue[0]
            try:
                self.handle(item)
            except Exception as exc:  # noqa: BLE001 - every failure is decided; none reaches the caller
                attempt += 1
                decision = self.decide_for(exc, attempt)
                if isinstance(decision, Fatal):
                    self._done(item)
                    self.stats["given_up"] += 1
                    attempt = 0
                    if self.on_give_up:
                        self.on_give_up(item, decision)
                    continue
                self.stats["retries"] += 1
                if self.on_trouble:
                    self.on_trouble()
                if not self._wait(getattr(decision, "delay", getattr(decision, "seconds", 0.0))):
                    break
                continue
            self._done(item)
            self.stats["handled"] += 1
            attempt = 0
        if self.on_end:
            self.on_end()

    def _wait(self, delay: float) -> bool:
        """Sleep through a retry's delay, calling on_trouble as items arrive; False once close's deadline passes."""
        until = time.monotonic() + delay
        while True:
            with self.cond:
                stop = self.closing_at if self.closing_at is not None else until
                now = time.monotonic()
                if now >= min(until, stop):
                    return self.closing_at is None or now < self.closing_at
                self.cond.wait(min(until, stop) - now)
            if self.on_trouble:
                self.on_trouble()
