"""Reply screening: every kind of bad site reply is left out and named; good ones come back sorted."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from medseg_core.federation import ARRAYS, CONFIG, KEY_SITE_NAME, METRICS, NUM_EXAMPLES, SITE
from server.inprocess import InProcessGrid
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
