"""Sending messages to the sites and collecting their replies, with a poll interval that grows with the wait.

Flower's ``Grid.send_and_receive`` sleeps a fixed interval between pulls: 0.1 s in simulation
(``InMemoryGrid``) and 3 s in a deployment (``HttpGrid``). Every exchange (train, evaluate, each of
SecAgg+'s four stages) pays up to that interval after the last reply has arrived, however short the
exchange. Here the interval is a fraction of the time waited so far: the added latency stays near
2 % of the exchange, and a deployment's SuperLink is asked at most once a second while the sites train.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

#: poll every ``POLL_FRACTION`` of the time waited so far, within ``[POLL_MIN_S, POLL_MAX_S]`` seconds
POLL_FRACTION, POLL_MIN_S, POLL_MAX_S = 0.02, 0.01, 1.0


def poll_interval(waited_s: float) -> float:
    """Seconds to sleep before the next pull for replies, after ``waited_s`` seconds of waiting."""
    return min(max(POLL_FRACTION * waited_s, POLL_MIN_S), POLL_MAX_S)


def exchange(grid: Grid, messages: list[Message], timeout_s: float | None) -> list[Message]:
    """Push ``messages`` and pull their replies until all are in or ``timeout_s`` seconds have passed
    (``None``: no limit), like ``Grid.send_and_receive``."""
    start = time.monotonic()
    deadline = None if timeout_s is None else start + timeout_s
    pending = {i for i in grid.push_messages(messages) if i}
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        now = time.monotonic()
        if not pending or (deadline is not None and now >= deadline):
            break
        wait = poll_interval(now - start)
        time.sleep(wait if deadline is None else min(wait, deadline - now))
    return replies


def send_messages(
    grid: Grid, messages: Iterable[Message], timeout_s: float
) -> tuple[list[Message], list[Message]]:
    """Send ``messages``; returns ``(sent, replies that arrived within timeout_s seconds)``."""
    sent = list(messages)
    return sent, (exchange(grid, sent, timeout_s) if sent else [])
