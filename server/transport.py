"""Messages out and replies in, a window at a time, each reply handed over as it arrives.

`Grid.send_and_receive` pushes a whole cohort and returns every reply at the end: at 1,000
phones the server would hold 1,000 outgoing and 1,000 incoming adapters at once, and show
nothing until the last phone answered. Here at most `window` messages are out at a time (in
simulation Flower's engine scans every outstanding message once per virtual node every
100 ms, so a short queue is also a fast one), replies are yielded as they come and dropped by
the caller after folding them in, and the round's deadline still bounds everything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid

PULL_INTERVAL_S = 0.05  # between polls for replies: small against any phone's work


def stream_replies(grid: Grid, messages: Iterable[Message], *, deadline: float,
                   window: int | None, on_wait: Callable[[], None] | None = None
                   ) -> Iterator[Message]:
    """Push `messages` keeping at most `window` (None: all) without a reply, yield each reply
    as it arrives, stop at `deadline` (time.monotonic()); messages still unsent then are
    never sent. `on_wait` runs between polls (progress display)."""
    pending = iter(messages)
    waiting: set[str] = set()
    exhausted = False
    while time.monotonic() < deadline:
        while not exhausted and (window is None or len(waiting) < window):
            message = next(pending, None)
            if message is None:
                exhausted = True
                break
            waiting.update(grid.push_messages([message]))
        if not waiting and exhausted:
            return
        replies = list(grid.pull_messages(list(waiting))) if waiting else []
        for reply in replies:
            waiting.discard(reply.metadata.reply_to_message_id)
            yield reply
        if not replies:
            if on_wait is not None:
                on_wait()
            time.sleep(min(PULL_INTERVAL_S, max(0.0, deadline - time.monotonic())))
