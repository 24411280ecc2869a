"""Screening of the sites' replies before anything is aggregated.

A site is left out of a round's aggregate, and the reason logged, when it

* raised (Flower turns the exception into an error reply: ``error``), or declined the round because
  its privacy budget is spent (an error reply saying so: ``declined``),
* did not answer within ``fl.round_timeout_s`` (``timeout``),
* answered the same round twice or under a site name another node already used (``duplicate``),
* sent weights with missing or unexpected keys, wrong shapes or NaN/Inf values, or unusable metrics
  (``invalid``).

Valid replies are returned sorted by site name, so aggregation sums in the same order in every run
(floating-point addition is not associative; a resumed run must reproduce an uninterrupted one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

from flwr.app import Message

from medseg_core.federation import (
    ARRAYS,
    KEY_SITE_NAME,
    NUM_EXAMPLES,
    SCAFFOLD_CONTROL,
    SCAFFOLD_DELTA_CONTROL,
    SITE,
    arrays_to_numpy,
    check_arrays,
)
from medseg_core.privacy_report import DECLINED, is_budget_decline

ERROR, TIMEOUT, DUPLICATE, INVALID = "error", "timeout", "duplicate", "invalid"
#: ArrayRecord sent -> ArrayRecord the reply must carry, with the same keys and shapes
REPLY_ARRAYS = {ARRAYS: ARRAYS, SCAFFOLD_CONTROL: SCAFFOLD_DELTA_CONTROL}


@dataclass(frozen=True)
class Fault:
    """One site left out of one phase of one round (a row of ``history.json``'s ``faults``)."""

    phase: str
    round: int
    node_id: int
    site: str | None
    kind: str
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        who = f"site {self.site} (node {self.node_id})" if self.site else f"node {self.node_id}"
        return f"round {self.round} {self.phase}: {who} left out ({self.kind}): {self.detail}"


def site_name(msg: Message) -> str | None:
    """The site name a reply carries, if any."""
    if msg.has_error() or SITE not in msg.content.config_records:
        return None
    name = msg.content.config_records[SITE].get(KEY_SITE_NAME)
    return str(name) if name else None


def _content_problems(msg: Message, sent: Message, *, needs_arrays: bool, min_examples: int) -> list[str]:
    content = msg.content
    problems: list[str] = []
    if site_name(msg) is None:
        problems.append(f"no '{SITE}' record with a '{KEY_SITE_NAME}'")
    if len(content.metric_records) != 1:
        problems.append(f"expected exactly one MetricRecord, got {len(content.metric_records)}")
    else:
        metrics = next(iter(content.metric_records.values()))
        n = metrics.get(NUM_EXAMPLES)
        if (
            not isinstance(n, (int, float))
            or isinstance(n, bool)
            or not math.isfinite(n)
            or n < min_examples
            or float(n) != int(n)
        ):
            problems.append(f"'{NUM_EXAMPLES}' must be an integer >= {min_examples} (cases), got {n!r}")
    if needs_arrays:
        for sent_name, reply_name in REPLY_ARRAYS.items():
            if sent_name not in sent.content.array_records:
                continue
            expected = {k: tuple(v.shape) for k, v in sent.content.array_records[sent_name].items()}
            if reply_name not in content.array_records:
                problems.append(f"no '{reply_name}' ArrayRecord")
                continue
            arrays = arrays_to_numpy(content.array_records[reply_name].items())
            problems += check_arrays(arrays, expected, what=f"'{reply_name}'")
    return problems


def screen_replies(
    phase: str,
    round_idx: int,
    sent: Sequence[Message],
    replies: Iterable[Message],
    *,
    needs_arrays: bool,
    min_examples: int = 0,
    known_sites: Mapping[int, str] | None = None,
) -> tuple[list[Message], list[Fault]]:
    """Split replies into usable ones (sorted by site) and faults.

    Args:
        phase: ``"fingerprint"``, ``"train"``, ``"evaluate"`` or ``"test"`` (for the log).
        round_idx: the round (0 for the fingerprint round).
        sent: the instruction messages (their ``dst_node_id`` and ArrayRecords are what replies must match).
        replies: what came back within the timeout.
        needs_arrays: replies must return weights matching the sent ones (training).
        min_examples: smallest acceptable ``num-examples`` (1 for training: a site without cases
            cannot be weighed).
        known_sites: node id -> site name from earlier rounds (a node claiming another site is refused).

    Returns:
        ``(valid, faults)``.
    """
    by_node = {m.metadata.dst_node_id: m for m in sent}
    valid: dict[str, Message] = {}
    faults: list[Fault] = []
    answered: set[int] = set()
    for msg in replies:
        node = msg.metadata.src_node_id
        if node not in by_node:
            continue  # a late reply to an earlier round's message: not ours
        name = site_name(msg)
        if node in answered:
            faults.append(
                Fault(phase, round_idx, node, name, DUPLICATE, "replied more than once; extra reply ignored")
            )
            continue
        answered.add(node)
        if msg.has_error():
            faults.append(
                Fault(
                    phase,
                    round_idx,
                    node,
                    (known_sites or {}).get(node),
                    DECLINED if is_budget_decline(msg.error.reason) else ERROR,
                    f"{msg.error.reason} (error code {msg.error.code})".strip(),
                )
            )
            continue
        problems = _content_problems(msg, by_node[node], needs_arrays=needs_arrays, min_examples=min_examples)
        if problems:
            faults.append(Fault(phase, round_idx, node, name, INVALID, "; ".join(problems)))
            continue
        assert name is not None
        expected = (known_sites or {}).get(node)
        if expected is not None and expected != name:
            faults.append(
                Fault(
                    phase,
                    round_idx,
                    node,
                    name,
                    INVALID,
                    f"node {node} enrolled as site {expected} now claims to be {name}",
                )
            )
            continue
        if name in valid:
            other = valid[name].metadata.src_node_id
            faults.append(
                Fault(
                    phase,
                    round_idx,
                    node,
                    name,
                    DUPLICATE,
                    f"site name {name} already used by node {other} this round",
                )
            )
            continue
        valid[name] = msg
    for node in by_node:
        if node not in answered:
            faults.append(
                Fault(
                    phase,
                    round_idx,
                    node,
                    (known_sites or {}).get(node),
                    TIMEOUT,
                    "no reply within the round timeout",
                )
            )
    return [valid[k] for k in sorted(valid)], faults
