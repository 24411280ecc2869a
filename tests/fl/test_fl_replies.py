"""Reply screening: every kind of bad site reply is left out and named; good ones come back sorted."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from medseg_core.federation import ARRAYS, CONFIG, KEY_SITE_NAME, METRICS, NUM_EXAMPLES, SITE
from server.inprocess import InProcessGrid
from server.messaging import poll_interval, send_messages
from server.replies import DUPLICATE, ERROR, INVALID, TIMEOUT, screen_replies
from server.strategies import to_record

GLOBAL = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}


def _sent(nodes):
    InProcessGrid([lambda m, c: m], [{}])  # sets the task identity messages need
    return [
        Message(
            RecordDict({ARRAYS: to_record(GLOBAL), CONFIG: ConfigRecord({})}),
            dst_node_id=n,
            message_type=MessageType.TRAIN,
        )
        for n in nodes
    ]


def _ok(to, site, arrays=None, cases=2):
    arrays = GLOBAL if arrays is None else arrays
    return Message(
        RecordDict(
            {
                ARRAYS: to_record(arrays),
                METRICS: MetricRecord({NUM_EXAMPLES: cases}),
                SITE: ConfigRecord({KEY_SITE_NAME: site}),
            }
        ),
        reply_to=to,
    )


def test_each_bad_reply_is_left_out_with_its_reason():
    sent = _sent([11, 12, 13, 14, 15, 16, 17])
    replies = [
        _ok(sent[0], "site_b"),
        _ok(sent[1], "site_a"),
        Message(Error(code=2, reason="RuntimeError: disk full"), reply_to=sent[2]),
        _ok(sent[3], "site_nan", {"w": np.full((2, 3), np.nan, np.float32), "b": GLOBAL["b"]}),
        _ok(sent[4], "site_shape", {"w": np.ones((3, 2), np.float32), "b": GLOBAL["b"]}),
        _ok(sent[5], "site_a"),  # a second node claiming an enrolled site's name
        # sent[6] never replies
    ]
    valid, faults = screen_replies("train", 4, sent, replies, needs_arrays=True, min_examples=1)
    assert [m.content[SITE][KEY_SITE_NAME] for m in valid] == ["site_a", "site_b"]
    kinds = {(f.node_id, f.kind) for f in faults}
    assert kinds == {(13, ERROR), (14, INVALID), (15, INVALID), (16, DUPLICATE), (17, TIMEOUT)}
    text = {f.node_id: f.detail for f in faults}
    assert "disk full" in text[13] and "NaN/Inf" in text[14] and "shape (3, 2)" in text[15]
    assert all(f.round == 4 and f.phase == "train" for f in faults)
    assert "left out (timeout)" in str([f for f in faults if f.kind == TIMEOUT][0])


def test_metrics_must_count_cases_and_sites_must_not_change_identity():
    sent = _sent([21, 22, 23])
    replies = [_ok(sent[0], "x", cases=0), _ok(sent[1], "y", cases=2.5), _ok(sent[2], "z")]
    valid, faults = screen_replies(
        "train", 1, sent, replies, needs_arrays=True, min_examples=1, known_sites={23: "site_z"}
    )
    assert valid == []
    assert {f.node_id for f in faults} == {21, 22, 23}
    assert (
        "num-examples" in faults[0].detail
        and "now claims" in [f for f in faults if f.node_id == 23][0].detail
    )


def test_evaluation_replies_need_no_arrays_and_late_replies_are_ignored():
    sent = _sent([31])
    other = _sent([99])[0]
    reply = Message(
        RecordDict(
            {METRICS: MetricRecord({NUM_EXAMPLES: 1, "dice": 0.5}), SITE: ConfigRecord({KEY_SITE_NAME: "s"})}
        ),
        reply_to=sent[0],
    )
    late = _ok(other, "old")
    valid, faults = screen_replies("evaluate", 2, sent, [reply, late], needs_arrays=False)
    assert len(valid) == 1 and faults == []


class _TimedGrid:
    """A grid whose replies appear ``delay_s`` after the push (``None``: never); it counts the pulls."""

    def __init__(self, delay_s: float | None):
        self.delay_s, self.pulls, self._pushed = delay_s, [], {}

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{len(self._pushed)}"
            self._pushed[msg.metadata.message_id] = (msg, time.monotonic())
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        now = time.monotonic()
        self.pulls.append(now)
        due = [i for i in message_ids if self.delay_s is not None and now - self._pushed[i][1] >= self.delay_s]
        return [Message(RecordDict(), reply_to=self._pushed.pop(i)[0]) for i in due]


def _messages(n: int) -> list[Message]:
    return _sent(range(1, n + 1))


def test_replies_are_collected_within_a_small_fraction_of_the_wait_and_polling_backs_off():
    """Flower's own send_and_receive sleeps 0.1 s (simulation) or 3 s (deployment) between pulls: a
    fast round paid that latency twice (train, evaluate). Ours polls in proportion to the time waited."""
    grid = _TimedGrid(delay_s=1.0)
    t0 = time.monotonic()
    sent, replies = send_messages(grid, _messages(3), timeout_s=30)
    waited = time.monotonic() - t0
    assert len(sent) == 3 and len(replies) == 3
    assert waited < 1.0 + 0.05, waited  # seen within ~2 % of the wait, not 0.1 s or 3 s later
    gaps = np.diff(grid.pulls)
    assert gaps[-1] > 1.5 * gaps[0]  # backs off ...
    assert len(grid.pulls) < 120
    # ... to once a second: ~1,000 pulls in a ten-minute round, where a fixed 10 ms poll makes 60,000
    assert poll_interval(0.0) == 0.01 and poll_interval(5.0) == 0.1 and poll_interval(600.0) == 1.0


def test_a_missing_reply_ends_the_wait_at_the_timeout_with_the_others():
    grid = _TimedGrid(delay_s=None)
    t0 = time.monotonic()
    sent, replies = send_messages(grid, _messages(2), timeout_s=1.0)
    assert len(sent) == 2 and replies == []
    assert 1.0 <= time.monotonic() - t0 < 1.3
    assert np.diff(grid.pulls).max() <= 1.0 + 0.05  # never sleeps past the deadline by more than a pull
    assert send_messages(grid, [], timeout_s=1.0) == ([], [])
