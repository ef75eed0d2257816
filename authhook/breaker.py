"""A circuit breaker for remote calls: fail fast while a peer is down, let one trial through to see it back.

Written for the remote OPA evaluator; any other remote call the PDP makes (a broker's management API, a
remote store) can hold one. It counts outcomes per epoch, so a call admitted before the last state change
cannot close, reopen or extend the breaker on its way back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple


class Ticket(NamedTuple):
    """A permit to call out: the breaker epoch it was issued in, and whether it is the half-open trial."""

    epoch: int
    trial: bool


class CircuitBreaker:
    """closed -> open after ``failures`` consecutive failures; open fails fast for ``reset_s``; then
    half-open lets exactly one trial call through: its success closes the breaker, its failure reopens it.

    Every call holds a ``Ticket`` from ``allow()`` and reports its outcome with it. Each state change
    starts a new epoch, and an outcome only counts in the epoch its call was admitted in: a call that was
    already in flight when the breaker opened can neither close it (only the trial can) nor reopen or
    extend it.
    """

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"

    def __init__(self, failures: int = 5, reset_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        if failures < 1:
            raise ValueError("breaker_failures must be at least 1")
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._state = self.CLOSED
        self._epoch = 0
        self._count = 0
        self._opened_at = 0.0
        self._trial = False  # the half-open trial is out

    @property
    def state(self) -> str:
        if self._state == self.OPEN and self._clock() - self._opened_at >= self.reset_s:
            return self.HALF_OPEN
        return self._state

    def allow(self) -> Ticket | None:
        """A ticket if a call may go out now, else None. In half-open, only the first caller gets one."""
        if self._state == self.CLOSED:
            return Ticket(self._epoch, False)
        if self._state == self.OPEN:
            if self._clock() - self._opened_at < self.reset_s:
                return None
            self._enter(self.HALF_OPEN)
        if self._trial:
            return None
        self._trial = True
        return Ticket(self._epoch, True)

    def success(self, ticket: Ticket) -> None:
        if ticket.epoch != self._epoch:
            return  # admitted before the last state change: says nothing about now
        if ticket.trial:
            self._enter(self.CLOSED)
        elif self._state == self.CLOSED:
            self._count = 0

    def failure(self, ticket: Ticket) -> None:
        if ticket.epoch != self._epoch:
            return
        if ticket.trial:
            self._enter(self.OPEN)
        elif self._state == self.CLOSED:
            self._count += 1
            if self._count >= self.failures:
                self._enter(self.OPEN)

    def cancel(self, ticket: Ticket) -> None:
        """The call never reached OPA (or was cancelled): no outcome, but a trial's slot is free again."""
        if ticket.trial and ticket.epoch == self._epoch and self._state == self.HALF_OPEN:
            self._trial = False

    def _enter(self, state: str) -> None:
        self._state = state
        self._epoch += 1
        self._count = 0
        self._trial = False
        if state == self.OPEN:
            self._opened_at = self._clock()
