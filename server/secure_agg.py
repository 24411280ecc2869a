"""Secure aggregation (SecAgg+, Bell et al. 2020) of the training phase, with Flower's own protocol.

Flower 1.41 implements SecAgg+ as ``flwr.server.workflow.SecAggPlusWorkflow`` (server) and
``flwr.client.mod.secaggplus_mod`` (sites), for its legacy message layout only: ``fitins.*`` /
``fitres.*`` records and a legacy ``flwr.server.strategy`` strategy inside a ``LegacyContext``. The
round loop (:mod:`server.loop`) uses the message API, so under ``privacy.secagg`` the training phase of
every round runs as follows (:meth:`SecureAggregation.train_round`):

1. our strategy's ``configure_train`` samples the sites and builds their messages, as in any round;
2. each message becomes a legacy ``FitIns`` (weights as a nameless list, their keys in the config under
   :data:`medseg_core.federation.KEY_ARRAY_KEYS`), handed to Flower's workflow by :class:`FitInsRelay`,
   a legacy strategy that only relays (sampling and aggregation stay with our strategy);
3. Flower's workflow runs its four stages (setup, share keys, collect masked vectors, unmask) over the
   same grid. Each site (:mod:`client.secure_agg`) trains, clips client-side if configured, and sends
   ``w_i * (y_i - x)`` quantised and masked; ``w_i`` is its number of training cases (1 with client-level
   DP). The server can unmask only the sum over the sites still in the protocol, divided by the sum of
   their weights: the case-weighted mean update; a site that drops out after sharing its keys is
   reconstructed from its neighbours' shares;
4. the mean update is added to the global weights, and for every site in the sum a reply carrying these
   *aggregated* weights and that site's own metrics (not masked: ``num-examples``, ``dp-*`` figures) is
   handed to the strategy's ``aggregate_train``, as Flower's workflow does for legacy strategies (it gives
   every ``FitRes`` the aggregate). FedAvg/FedProx/FedBN of identical weights is those weights;
   FedAvgM/FedAdam/FedYogi/FedAdagrad apply their server step to them; client-level DP adds its noise.

Strategies that need the individual updates (robust aggregators, SCAFFOLD's control variates) and
server-side clipping are refused by :func:`check_secagg_config` before anything runs.

Sites send their *update* ``y_i - x`` rather than their weights: ``privacy.secagg.clipping_range`` then
bounds the update (each site refuses to send a value outside it, rather than let the quantiser clip it
silently), and the quantisation error is absolute: at most ``n * 2 C / Q / W`` per value for ``n`` sites,
range ``C``, ``Q`` levels and total weight ``W = sum(w_i) / max_weight``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import hydra
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    FedXgbBagging,
    FedXgbCyclic,
    MultiKrum,
    QFedAvg,
)
from omegaconf import DictConfig

from medseg_core.federation import ARRAYS, CONFIG, KEY_ARRAY_KEYS, METRICS, SITE, dumps
from server.messaging import exchange
from server.replies import site_name
from server.strategies import Scaffold, to_numpy, to_record

#: strategies that need each site's update and cannot run on a secure sum, with the reason
NEEDS_INDIVIDUAL_UPDATES: dict[type, str] = {
    FedMedian: "the coordinate-wise median needs every site's update",
    FedTrimmedAvg: "the trimmed mean drops the largest/smallest individual values",
    MultiKrum: "Krum scores each site's update by its distance to the others",
    Bulyan: "Bulyan selects individual updates by their distances",
    QFedAvg: "q-FFL reweighs each site's update by its own loss",
    FedXgbBagging: "tree models are not averaged",
    FedXgbCyclic: "tree models are not averaged",
    Scaffold: "SCAFFOLD's control-variate updates travel in a second ArrayRecord that SecAgg+ does not mask",
}
#: stage order of Flower's SecAgg+ protocol
STAGES = tuple(Stage.all())


def check_secagg_config(cfg: DictConfig) -> None:
    """Refuse, before anything runs, a configuration that cannot train under SecAgg+.

    Raises:
        ValueError: a strategy that needs individual updates or is not a weighted mean, server-side
            client-level DP clipping, ``fl.min_train_nodes < 2``, or a bad ``privacy.secagg`` setting.
    """
    path = (cfg.strategy.get("server") or {}).get("_target_")
    try:
        target = hydra.utils.get_class(str(path))
    except Exception as exc:  # Hydra raises its own error types for a path it cannot import
        raise ValueError(
            f"privacy=secagg: strategy.server._target_={path!r} is not an importable class ({exc})"
        ) from exc
    name = str(cfg.strategy.get("name", target.__name__))
    for refused, why in NEEDS_INDIVIDUAL_UPDATES.items():
        if issubclass(target, refused):
            raise ValueError(
                f"privacy=secagg cannot be combined with strategy={name}: {why}, and under SecAgg+ the server "
                "only ever sees the sum of the updates; use fedavg, fedprox, fedavgm, fedadam, fedyogi, "
                "fedadagrad or fedbn"
            )
    if not issubclass(target, FedAvg):
        raise ValueError(
            f"privacy=secagg needs a strategy that aggregates a weighted mean of the updates (FedAvg and its "
            f"server-optimiser variants), got strategy={name} ({target.__module__}.{target.__qualname__})"
        )
    client_dp = (cfg.get("privacy") or {}).get("client_dp")
    if client_dp is not None and client_dp.get("side") != "client":
        raise ValueError(
            f"privacy=secagg with client-level DP needs privacy.client_dp.side=client, got "
            f"{client_dp.get('side')!r}: server-side clipping clips each site's update, which the server never "
            "sees under SecAgg+"
        )
    if int(cfg.fl.min_train_nodes) < 2:
        raise ValueError(
            f"privacy=secagg needs fl.min_train_nodes >= 2, got {cfg.fl.min_train_nodes}: a secure sum over one "
            "site is that site's update"
        )
    SecAggSettings.from_config(cfg)


@dataclass(frozen=True)
class SecAggSettings:
    """``privacy.secagg``, checked (Flower's ``SecAggPlusWorkflow`` arguments, plus ours).

    Attributes:
        num_shares: shares of each site's secrets; a float <= 1 is a fraction of the sampled sites.
        reconstruction_threshold: shares needed to unmask a dropped site; a float is a fraction of
            ``num_shares`` and must be above 0.5 (honest majority).
        max_weight: largest weight a site may report; ``None``: the largest enrolled site's number of
            training cases (1 with client-level DP), the tightest value and so the finest quantisation.
        clipping_range: each weighted update value must lie in ``[-clipping_range, clipping_range]``.
        quantization_range: quantisation levels.
        modulus_range: masks and sums are taken modulo this (a power of 2 above ``quantization_range``).
        timeout_s: per-stage timeout in seconds (a round has 4 stages).
    """

    num_shares: int | float
    reconstruction_threshold: int | float
    max_weight: float | None
    clipping_range: float
    quantization_range: int
    modulus_range: int
    timeout_s: float

    def __post_init__(self) -> None:
        if self.max_weight is not None and not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ValueError(f"privacy.secagg.max_weight must be > 0 or null, got {self.max_weight!r}")
        if not (math.isfinite(self.clipping_range) and self.clipping_range > 0):
            raise ValueError(f"privacy.secagg.clipping_range must be > 0, got {self.clipping_range!r}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"privacy.secagg.timeout_s must be > 0 or null, got {self.timeout_s!r}")
        threshold = self.reconstruction_threshold
        if isinstance(threshold, float) and not 0.5 < threshold <= 1.0:
            # each site answers the unmask stage with either a share of a neighbour's mask seed or of its
            # key, as the server says; with t <= shares/2 a lying server could collect both for one site
            raise ValueError(
                f"privacy.secagg.reconstruction_threshold as a fraction must be in (0.5, 1], got {threshold!r}: "
                "at or below one half a server that lies about dropouts could unmask a single site's update"
            )
        try:
            self.workflow(float(self.max_weight or 1.0))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"privacy.secagg: {exc} (settings {self})") from exc

    @classmethod
    def from_config(cls, cfg: DictConfig) -> SecAggSettings:
        """The settings of ``cfg.privacy.secagg``; ``timeout_s: null`` means ``fl.round_timeout_s``.

        Raises:
            ValueError: a missing or bad setting.
        """
        node = (cfg.get("privacy") or {}).get("secagg")
        if node is None:
            raise ValueError("privacy.secagg is not set")
        try:
            timeout = node.get("timeout_s")
            return cls(
                num_shares=_number(node.num_shares),
                reconstruction_threshold=_number(node.reconstruction_threshold),
                max_weight=None if node.get("max_weight") is None else float(node.max_weight),
                clipping_range=float(node.clipping_range),
                quantization_range=int(node.quantization_range),
                modulus_range=int(node.modulus_range),
                timeout_s=float(cfg.fl.round_timeout_s if timeout is None else timeout),
            )
        except (AttributeError, KeyError, TypeError) as exc:  # omegaconf raises these for a missing key
            raise ValueError(f"privacy.secagg: incomplete or mistyped settings ({exc})") from exc

    def workflow(self, max_weight: float) -> SecAggPlusWorkflow:
        """Flower's workflow with these settings and the round's ``max_weight``."""
        return SecAggPlusWorkflow(
            num_shares=self.num_shares,
            reconstruction_threshold=self.reconstruction_threshold,
            max_weight=max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=self.modulus_range,
            timeout=self.timeout_s,
        )


def _number(value: Any) -> int | float:
    """YAML numbers as Flower reads them: an int is a count, a float a fraction."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return value


class FitInsRelay(LegacyStrategy):
    """A legacy strategy that only relays, for Flower's ``SecAggPlusWorkflow``.

    ``configure_fit`` returns the ``FitIns`` prepared from our strategy's messages; ``aggregate_fit`` keeps
    what the workflow gives it: one ``FitRes`` per site in the secure sum, each carrying the unmasked
    *mean* update (never the site's own) and the site's unmasked metrics and weight. Nothing is aggregated
    here: aggregation stays with our message-API strategy.

    Args:
        fit_ins: ``(proxy, FitIns)`` per sampled site.
    """

    def __init__(self, fit_ins: Sequence[tuple[ClientProxy, FitIns]]) -> None:
        self.fit_ins = list(fit_ins)
        self.results: list[tuple[ClientProxy, FitRes]] | None = None
        self.failures: list[Any] = []

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:  # noqa: D102
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:  # noqa: D102
        return list(self.fit_ins)

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:  # noqa: D102
        self.results, self.failures = list(results), list(failures)
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:  # noqa: D102
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:  # noqa: D102
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:  # noqa: D102
        return None


@dataclass
class StageLog:
    """One SecAgg+ stage as it went over the grid."""

    name: str
    sent: list[Message]
    replies: list[Message]


class StageTap(Grid):
    """A grid that delegates to another and keeps each SecAgg+ stage's messages and replies.

    Flower's workflow reports failures without the node that failed; the tap lets the round loop name the
    site, the stage and the reason in ``history.json``.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.stages: list[StageLog] = []

    def set_run(self, run: Any) -> None:  # noqa: D102
        self._grid.set_run(run)

    @property
    def run(self) -> Any:  # noqa: D102
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # noqa: D102
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send, wait, and keep both sides under the stage's name."""
        sent = list(messages)
        name = STAGES[min(len(self.stages), len(STAGES) - 1)]
        if sent and RECORD_KEY_CONFIGS in sent[0].content.config_records:
            name = str(sent[0].content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, name))
        replies = exchange(self._grid, sent, timeout) if sent else []  # polls like our own rounds
        self.stages.append(StageLog(name, sent, replies))
        return replies


@dataclass
class SecureRound:
    """What one SecAgg+ training phase produced, shaped like a plain round's messages and replies.

    Attributes:
        sent: the strategy's training messages (what the replies are screened against).
        replies: per site in the secure sum, a reply with the *aggregated* weights and the site's metrics;
            per site that failed, its error reply (a site that never answered has none: a timeout).
        summary: for ``history.json``: sampled sites, sites in the sum, dropped sites with stage and reason,
            the protocol parameters as Flower resolved them, ``halted`` (why no sum was produced, or None).
    """

    sent: list[Message]
    replies: list[Message]
    summary: dict[str, Any] = field(default_factory=dict)


class SecureAggregation:
    """The training phase of a round through Flower's SecAgg+ (see the module docstring).

    Args:
        cfg: the run config; ``privacy.secagg`` must be set.

    Raises:
        ValueError: see :func:`check_secagg_config`.
    """

    def __init__(self, cfg: DictConfig) -> None:
        check_secagg_config(cfg)
        self.settings = SecAggSettings.from_config(cfg)
        #: with client-level DP every site weighs 1 (``site-weight``): the sum is a uniform mean
        self.uniform = (cfg.get("privacy") or {}).get("client_dp") is not None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> SecureAggregation | None:
        """``None`` without ``privacy.secagg``; raises ``ValueError`` for settings that cannot work."""
        if (cfg.get("privacy") or {}).get("secagg") is None:
            return None
        return cls(cfg)

    def largest_weight(self, train_cases: Mapping[str, int]) -> float:
        """The largest weight a site can report: its training cases (1 with client-level DP)."""
        return 1.0 if self.uniform else float(max(train_cases.values(), default=1))

    def max_weight(self, train_cases: Mapping[str, int]) -> float:
        """``privacy.secagg.max_weight``, or :meth:`largest_weight` when it is null."""
        setting = self.settings.max_weight
        return float(setting) if setting is not None else self.largest_weight(train_cases)

    def train_round(
        self,
        grid: Grid,
        round_idx: int,
        messages: Iterable[Message],
        train_cases: Mapping[str, int],
        known_sites: Mapping[int, str] | None = None,
    ) -> SecureRound:
        """Run one training phase under SecAgg+.

        Args:
            grid: the run's grid.
            round_idx: the round (1-based).
            messages: the strategy's ``configure_train`` messages (one ArrayRecord ``arrays`` and one
                ConfigRecord ``config`` each, the same weights for every site).
            train_cases: site -> enrolled training cases (bounds the weights: ``max_weight``).
            known_sites: node id -> site name (for the summary).

        Returns:
            The replies to screen and aggregate as in a plain round, and the round's summary.

        Raises:
            ValueError: a message with other records than the weights and the config (e.g. SCAFFOLD's).
        """
        t0 = time.perf_counter()
        sent = list(messages)
        names = dict(known_sites or {})
        by_node = {m.metadata.dst_node_id: m for m in sent}
        keys = _check_messages(sent)
        max_weight, needed = self.max_weight(train_cases), self.largest_weight(train_cases)
        summary: dict[str, Any] = {
            "sampled": len(sent),
            "in_sum": 0,
            "sites_in_sum": [],
            "dropped": [],
            "max_weight": max_weight,
            "clipping_range": self.settings.clipping_range,
            "quantization_range": self.settings.quantization_range,
            "modulus_range": self.settings.modulus_range,
            "num_shares": None,
            "reconstruction_threshold": None,
            "halted": None,
            "failed_after_masking": [],
        }
        if not sent:
            summary["halted"] = "no site sampled"
            return SecureRound(sent, [], summary)
        if max_weight < needed:
            summary["halted"] = (
                f"privacy.secagg.max_weight={max_weight:g} is below the largest site's {needed:g} training cases: "
                "its weighted update would overflow the quantiser; set it to null (automatic)"
            )
            return SecureRound(sent, _halt_replies(sent, summary["halted"]), summary)

        tap = StageTap(grid)
        relay = FitInsRelay(
            [
                (GridClientProxy(m.metadata.dst_node_id, tap, m.metadata.run_id), _fit_ins(m, keys))
                for m in sent
            ]
        )
        context = LegacyContext(
            Context(
                run_id=sent[0].metadata.run_id,
                node_id=0,
                node_config={},
                state=RecordDict(
                    {
                        MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: int(round_idx)}),
                        MAIN_PARAMS_RECORD: ArrayRecord(),  # the weights travel in the relayed FitIns
                    }
                ),
                run_config={},
            ),
            strategy=relay,
        )
        for node in grid.get_node_ids():  # for the workflow's log line ("sampled n out of N")
            context.client_manager.register(GridClientProxy(node, tap, sent[0].metadata.run_id))
        try:
            self.settings.workflow(max_weight)(tap, context)
        except Exception as exc:  # a malformed masked vector can break the workflow's arithmetic
            summary["halted"] = f"the SecAgg+ workflow failed ({type(exc).__name__}: {exc})"
        _resolved_parameters(tap, summary)

        results = relay.results
        in_sum = {int(proxy.node_id) for proxy, _ in results or []}
        dropped, error_replies = _dropped(tap, by_node, names, in_sum)
        summary["dropped"] = [d for d in dropped if d["node_id"] not in in_sum]
        # a site that fails in the unmask stage, after its masked vector arrived, is still in the sum
        summary["failed_after_masking"] = [d for d in dropped if d["node_id"] in in_sum]
        aggregated: dict[str, np.ndarray] | None = None
        if results is not None:
            try:
                mean_update = parameters_to_ndarrays(results[0][1].parameters) if results else []
                aggregated = _apply_update(to_numpy(sent[0].content[ARRAYS]), keys, mean_update)
            except ValueError as exc:
                summary["halted"] = f"the unmasked sum does not fit the model: {exc}"
        if aggregated is None:
            if summary["halted"] is None:
                summary["halted"] = _halt_reason(tap, summary, len(dropped))
            failed = {d["node_id"] for d in summary["dropped"]}
            halted = [m for m in sent if m.metadata.dst_node_id not in failed]
            replies = error_replies + _halt_replies(halted, summary["halted"])
        else:
            assert results is not None
            collected = _collected_replies(tap)
            replies = list(error_replies)
            for proxy, fitres in results:
                node = int(proxy.node_id)
                reply = _sum_reply(by_node[node], aggregated, fitres, collected.get(node))
                replies.append(reply)
                summary["sites_in_sum"].append(names.get(node) or site_name(reply) or str(node))
            summary["in_sum"] = len(results)
            summary["sites_in_sum"].sort()
        summary["seconds"] = time.perf_counter() - t0
        return SecureRound(sent, replies, summary)


def _check_messages(sent: Sequence[Message]) -> list[str]:
    """The weights' keys, the same for every message.

    Raises:
        ValueError: a message with other records than ``arrays`` and ``config``, or differing keys.
    """
    keys: list[str] | None = None
    for msg in sent:
        content = msg.content
        extra = sorted(set(content.keys()) - {ARRAYS, CONFIG})
        if extra or ARRAYS not in content.array_records or CONFIG not in content.config_records:
            raise ValueError(
                f"SecAgg+ relays exactly one '{ARRAYS}' ArrayRecord and one '{CONFIG}' ConfigRecord per site; the "
                f"strategy's message to node {msg.metadata.dst_node_id} has {sorted(content.keys())}"
            )
        mine = list(content.array_records[ARRAYS].keys())
        if keys is not None and mine != keys:
            raise ValueError("SecAgg+ sums positionally: every site must be sent the same weights")
        keys = mine
    return keys or []


def _fit_ins(msg: Message, keys: list[str]) -> FitIns:
    """A strategy message as a legacy ``FitIns``: the weights as a list, their keys in the config."""
    config = dict(msg.content.config_records[CONFIG])
    config[KEY_ARRAY_KEYS] = dumps(keys)
    parameters = compat.arrayrecord_to_parameters(msg.content.array_records[ARRAYS], keep_input=True)
    return FitIns(parameters=parameters, config=config)


def _apply_update(
    global_arrays: Mapping[str, np.ndarray], keys: Sequence[str], mean_update: Sequence[np.ndarray]
) -> dict[str, np.ndarray]:
    """``x + mean update``, each array in its global dtype (integer buffers rounded).

    Raises:
        ValueError: the unmasked update does not match the weights' number or shapes.
    """
    if len(mean_update) != len(keys):
        raise ValueError(f"the unmasked sum has {len(mean_update)} arrays, the model {len(keys)}")
    out: dict[str, np.ndarray] = {}
    for key, delta in zip(keys, mean_update, strict=True):
        x = np.asarray(global_arrays[key])
        if tuple(np.shape(delta)) != tuple(x.shape):
            raise ValueError(f"the unmasked sum of {key!r} has shape {np.shape(delta)}, the model {x.shape}")
        value = x.astype(np.float64) + np.asarray(delta, dtype=np.float64)
        out[key] = (value if x.dtype.kind in "fc" else np.rint(value)).astype(x.dtype)
    return out


def _collected_replies(tap: StageTap) -> dict[int, Message]:
    """Node -> its successful reply of the collect-masked-vectors stage (site record, legacy metrics)."""
    for stage in tap.stages:
        if stage.name == Stage.COLLECT_MASKED_VECTORS:
            return {m.metadata.src_node_id: m for m in stage.replies if not m.has_error()}
    return {}


def _sum_reply(
    train_msg: Message, aggregated: Mapping[str, np.ndarray], fitres: FitRes, collected: Message | None
) -> Message:
    """What the strategy aggregates for one site in the sum: the aggregated weights, the site's metrics."""
    content = RecordDict({ARRAYS: to_record(aggregated)})
    try:
        content[METRICS] = MetricRecord(dict(fitres.metrics))
    except TypeError:
        pass  # not numbers: the reply is screened out as invalid (its update is already in the sum)
    if collected is not None and SITE in collected.content.config_records:
        content[SITE] = copy.deepcopy(collected.content.config_records[SITE])
    return Message(content, reply_to=train_msg)


def _dropped(
    tap: StageTap, by_node: Mapping[int, Message], names: Mapping[int, str], in_sum: set[int]
) -> tuple[list[dict[str, Any]], list[Message]]:
    """Sites lost during the protocol: where and why, and the error replies of those not in the sum
    (none for a silent site: the round loop then logs a timeout)."""
    dropped: list[dict[str, Any]] = []
    errors: list[Message] = []
    lost: set[int] = set()
    for stage in tap.stages:
        answered = {m.metadata.src_node_id: m for m in stage.replies}
        for msg in stage.sent:
            node = msg.metadata.dst_node_id
            if node in lost or node not in by_node:
                continue
            reply = answered.get(node)
            if reply is not None and not reply.has_error():
                continue
            lost.add(node)
            reason = "no reply within the stage timeout" if reply is None else str(reply.error.reason)
            dropped.append({"site": names.get(node), "node_id": node, "stage": stage.name, "reason": reason})
            if reply is not None and node not in in_sum:
                errors.append(reply)
    return dropped, errors


def _resolved_parameters(tap: StageTap, summary: dict[str, Any]) -> None:
    """The number of shares and threshold Flower resolved for this round (from its setup message)."""
    for stage in tap.stages:
        if stage.name == Stage.SETUP and stage.sent:
            setup = stage.sent[0].content.config_records[RECORD_KEY_CONFIGS]
            summary["num_shares"] = int(setup[Key.SHARE_NUMBER])
            summary["reconstruction_threshold"] = int(setup[Key.THRESHOLD])


def _halt_reason(tap: StageTap, summary: Mapping[str, Any], num_dropped: int) -> str:
    stage = tap.stages[-1].name if tap.stages else Stage.SETUP
    if not tap.stages:
        return "SecAgg+ needs at least 2 sampled sites"
    return (
        f"SecAgg+ halted at stage '{stage}': {num_dropped} of {summary['sampled']} site(s) dropped out, leaving "
        f"fewer than the reconstruction threshold ({summary['reconstruction_threshold']} of "
        f"{summary['num_shares']} shares, privacy.secagg.reconstruction_threshold) to unmask the sum; no site's "
        "update could be used this round"
    )


def _halt_replies(sent: Iterable[Message], reason: str) -> list[Message]:
    """Error replies for sites whose update was lost because the protocol produced no sum."""
    return [Message(Error(code=ErrorCode.UNKNOWN, reason=reason), reply_to=m) for m in sent]
