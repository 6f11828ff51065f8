"""A round's progress while it runs: phones done of those sampled, elapsed time, ETA.

One line every `every_s` seconds, only while a round is still waiting for phones. Under
user-level DP the number of phones that answered is not released, so the line says only how
long the round has been running.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RoundProgress:
    """Counts replies of one phase of one round and reports through `emit` now and then."""

    def __init__(self, *, server_round: int, rounds: int, phase: str, sampled: int,
                 every_s: float, emit: Callable[[str], None], counts_secret: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.server_round, self.rounds, self.phase = server_round, rounds, phase
        self.sampled, self.every_s, self.emit = sampled, every_s, emit
        self.counts_secret, self.clock = counts_secret, clock
        self.started = self.last = clock()
        self.done = 0

    def reply(self) -> None:
        """One more phone answered (accepted, rejected or declined alike)."""
        self.done += 1
        self.tick()

    def tick(self) -> None:
        """Report if `every_s` passed since the last line."""
        now = self.clock()
        if self.every_s <= 0 or now - self.last < self.every_s:
            return
        self.last = now
        self.emit(self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self.started
        head = f"round {self.server_round:3d}/{self.rounds} | {self.phase}"
        if self.counts_secret:
            return f"{head} | {elapsed:.0f} s elapsed (counts withheld under user-level DP)"
        if self.done == 0:
            return f"{head} | 0/{self.sampled} phones | {elapsed:.0f} s elapsed"
        eta = elapsed / self.done * max(0, self.sampled - self.done)
        return (f"{head} | {self.done}/{self.sampled} phones | {elapsed:.0f} s elapsed, "
                f"ETA {eta:.0f} s")
