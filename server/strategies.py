"""Aggregation strategies from config: Flower's, plus FedBN and SCAFFOLD (which Flower lacks).

``configs/strategy/<name>.yaml`` holds a ``server`` node, a ``_partial_`` Flower strategy; this module
completes it with the sampling settings of ``fl`` (fraction of sites per round, minimum numbers) and
NaN-aware, case-weighted metric aggregation. Flower's strategies are used as they are: FedAvg, FedProx
(its ``proximal-mu`` reaches the clients in the round's config; the proximal term is applied in the
client's loss), FedAdam, FedYogi, FedAdagrad, FedAvgM, FedMedian, FedTrimmedAvg and Krum.

Both strategies written here follow Flower's message-based ``Strategy`` API (subclasses of
``flwr.serverapp.strategy.FedAvg``) and keep their state in :meth:`state_dict` for checkpoints:

* :class:`FedBN` (Li et al., ICLR 2021): normalisation layers stay at each site; only the other
  weights are sent and averaged.
* :class:`Scaffold` (Karimireddy et al., ICML 2020): server control variate ``c`` sent with the model;
  sites return ``c_i+ - c_i`` and keep ``c_i``; update rules in :mod:`medseg_core.federation`.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import hydra
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from omegaconf import DictConfig

from medseg_core.federation import (
    ARRAYS,
    CONFIG,
    KEY_SERVER_ROUND,
    NUM_EXAMPLES,
    SCAFFOLD_CONTROL,
    SCAFFOLD_DELTA_CONTROL,
    SITE_WEIGHT,
    aggregate_by_cases,
    arrays_to_numpy,
    local_keys,
    parameter_keys,
    scaffold_server_update,
    wire_arrays,
    zeros_like,
)
from medseg_core.privacy_report import is_privacy_metric

#: attributes in which Flower's strategies keep state across rounds (server optimiser moments, momentum)
FLOWER_STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector")


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as ``{key: numpy array}``."""
    return arrays_to_numpy(record.items())


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``{key: numpy array}`` as an ArrayRecord, keys in order and shapes kept (``wire_arrays``)."""
    return ArrayRecord({k: Array(v) for k, v in wire_arrays(arrays).items()})


def aggregate_metrics_by_cases(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Case-weighted mean of every metric of the replies, ignoring NaN (Flower's default propagates NaN).

    Used for both training and evaluation replies; the result keeps the total under ``weighted_by_key``.
    Per-site privacy figures (``dp-*``: each site's sigma, steps, epsilon) are not averaged: a mean
    epsilon over sites means nothing; the run loop keeps them per site.
    """
    per_reply = {
        str(i): {k: v for k, v in next(iter(r.metric_records.values())).items() if not is_privacy_metric(k)}
        for i, r in enumerate(records)
    }
    merged = aggregate_by_cases(per_reply, weight_key=weighted_by_key)
    return MetricRecord({k: (v if math.isfinite(v) else float("nan")) for k, v in merged.items()})


class FedBN(FedAvg):
    """FedAvg over everything but the normalisation layers, which never leave the sites.

    Args:
        local_keys: state-dict keys kept at the sites (``medseg_core.federation.norm_state_keys``).
        **kwargs: :class:`flwr.serverapp.strategy.FedAvg` arguments.

    Raises:
        ValueError: no local key (FedBN would be FedAvg: use ``strategy=fedavg``).
    """

    def __init__(self, *, local_keys: Iterable[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.local_keys = frozenset(local_keys)
        if not self.local_keys:
            raise ValueError(
                "FedBN needs the model's normalisation keys (local_keys), got none: the model has "
                "no normalisation layer with state; use strategy=fedavg"
            )

    def summary(self) -> None:
        """Log the settings."""
        log(INFO, "\t├──> FedBN: %d normalisation array(s) stay at the sites", len(self.local_keys))
        super().summary()

    def shared(self, arrays: ArrayRecord) -> ArrayRecord:
        """``arrays`` without the keys that stay at the sites."""
        return ArrayRecord({k: v for k, v in arrays.items() if k not in self.local_keys})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send only the shared (non-normalisation) weights."""
        return super().configure_train(server_round, self.shared(arrays), config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send only the shared weights; each site evaluates with its own normalisation."""
        return super().configure_evaluate(server_round, self.shared(arrays), config, grid)

    def state_dict(self) -> dict[str, Any]:
        """Nothing beyond FedAvg: the local weights live at the sites."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""


class Scaffold(FedAvg):
    """SCAFFOLD: stochastic controlled averaging with server and site control variates.

    The server keeps ``c`` (one array per trainable parameter, zeros at start) and sends it with the
    global model; each sampled site trains with the corrected gradient ``g + c - c_i``, sets its own
    ``c_i`` to its mean local gradient (what option II estimates) and returns its weights and
    ``c_i+ - c_i``. The server then applies
    ``x += eta_g * mean(y_i - x)`` and ``c += |S|/N * mean(delta c_i)``
    (:func:`medseg_core.federation.scaffold_server_update`). ``N`` is the number of connected sites
    when the round is configured.

    Args:
        control_keys: keys of the trainable parameters (``medseg_core.federation.parameter_keys``).
        global_lr: server step size ``eta_g`` (1.0 in the paper's experiments).
        weighted: weigh sites by their number of training cases instead of uniformly (the paper).
        **kwargs: :class:`flwr.serverapp.strategy.FedAvg` sampling arguments.
    """

    def __init__(
        self, *, control_keys: Iterable[str], global_lr: float = 1.0, weighted: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.control_keys = list(control_keys)
        if not self.control_keys:
            raise ValueError("SCAFFOLD needs the model's trainable parameter keys (control_keys), got none")
        if not (math.isfinite(global_lr) and global_lr > 0):
            raise ValueError(f"SCAFFOLD global_lr must be > 0, got {global_lr!r}")
        self.global_lr = float(global_lr)
        self.weighted = bool(weighted)
        self.control: dict[str, np.ndarray] | None = None
        self.current: dict[str, np.ndarray] | None = None
        self.num_nodes_total = 0

    def summary(self) -> None:
        """Log the settings."""
        log(
            INFO,
            "\t├──> SCAFFOLD: global lr %s, %s site weights, %d control arrays",
            self.global_lr,
            "case-weighted" if self.weighted else "uniform",
            len(self.control_keys),
        )
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample sites as FedAvg does and send them the model and the server control variate."""
        if self.fraction_train == 0.0:
            return []
        self.current = to_numpy(arrays)
        missing = [k for k in self.control_keys if k not in self.current]
        if missing:
            raise ValueError(f"SCAFFOLD control keys missing from the global model: {missing[:3]}")
        if self.control is None:
            self.control = zeros_like(self.current, self.control_keys)
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        node_ids, all_nodes = sample_nodes(
            grid, self.min_available_nodes, max(num_nodes, self.min_train_nodes)
        )
        self.num_nodes_total = len(all_nodes)
        log(INFO, "configure_train: Sampled %s nodes (out of %s)", len(node_ids), len(all_nodes))
        config[KEY_SERVER_ROUND] = server_round
        record = RecordDict(
            {
                self.arrayrecord_key: arrays,
                self.configrecord_key: config,
                SCAFFOLD_CONTROL: to_record(self.control),
            }
        )
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n) for n in node_ids]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Apply the SCAFFOLD server update with the replies that carry content."""
        valid = [m for m in replies if not m.has_error()]
        if not valid:
            return None, None
        if self.current is None or self.control is None:
            raise RuntimeError("SCAFFOLD.aggregate_train called before configure_train")
        contents = [m.content for m in valid]
        for content in contents:
            if SCAFFOLD_DELTA_CONTROL not in content.array_records:
                raise ValueError(f"a SCAFFOLD reply lacks the '{SCAFFOLD_DELTA_CONTROL}' ArrayRecord")
        ys = [to_numpy(c.array_records[self.arrayrecord_key]) for c in contents]
        dcs = [to_numpy(c.array_records[SCAFFOLD_DELTA_CONTROL]) for c in contents]
        weights = None
        if self.weighted:
            weights = [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
        x_new, self.control = scaffold_server_update(
            self.current, self.control, ys, dcs, max(self.num_nodes_total, len(ys)), self.global_lr, weights
        )
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return to_record(x_new), metrics

    def state_dict(self) -> dict[str, Any]:
        """The server control variate (what a resumed run needs)."""
        return {"control": self.control}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        control = state.get("control")
        self.control = None if control is None else {k: np.asarray(v) for k, v in control.items()}


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """Everything a strategy carries from round to round, for checkpoints.

    Our strategies expose :meth:`state_dict`; Flower's keep server-optimiser moments and momentum in
    the attributes named in :data:`FLOWER_STATE_ATTRIBUTES` (the last global model they also keep is
    re-derived from the global model passed to the next round).
    """
    if is_client_dp(strategy):  # Flower's DP wrapper: its (adaptive) clipping norm, accountant, inner strategy
        accountant = getattr(strategy, "accountant", None)
        return {
            "client_dp": {
                "clipping_norm": float(strategy.clipping_norm),
                "accountant": None if accountant is None else copy.deepcopy(accountant.state_dict()),
                "inner": strategy_state(strategy.strategy),
            }
        }
    if hasattr(strategy, "state_dict"):
        return copy.deepcopy({"own": strategy.state_dict()})
    return copy.deepcopy(
        {
            "flower": {
                name: getattr(strategy, name) for name in FLOWER_STATE_ATTRIBUTES if hasattr(strategy, name)
            }
        }
    )


def load_strategy_state(strategy: Strategy, state: Mapping[str, Any]) -> None:
    """Restore what :func:`strategy_state` returned."""
    if "client_dp" in state:
        saved = state["client_dp"]
        strategy.clipping_norm = float(saved["clipping_norm"])
        accountant = getattr(strategy, "accountant", None)
        if accountant is not None and saved.get("accountant") is not None:
            accountant.load_state_dict(saved["accountant"])
        load_strategy_state(strategy.strategy, saved["inner"])
        return
    if "own" in state:
        strategy.load_state_dict(state["own"])
        return
    for name, value in state.get("flower", {}).items():
        if name in FLOWER_STATE_ATTRIBUTES:
            setattr(strategy, name, value)


def build_strategy(cfg: DictConfig, model: torch.nn.Module, num_sites: int | None = None) -> Strategy:
    """The configured strategy, with ``fl``'s sampling settings and case-weighted metric aggregation.

    With client-level DP (``privacy.client_dp``) the strategy averages the sites' models uniformly
    (weight :data:`medseg_core.federation.SITE_WEIGHT` = 1 from every site: Flower's noise std
    ``sigma * C / m`` assumes a plain mean) and is wrapped in Flower's DP wrapper
    (:func:`wrap_client_dp`); training metrics stay case-weighted.

    Args:
        cfg: the run config (``strategy.server`` is a ``_partial_`` strategy; ``strategy.keep_local``).
        model: the global model (FedBN needs its normalisation keys, SCAFFOLD its parameter keys).
        num_sites: enrolled sites (client-level DP only; default ``fl.min_available_nodes``).

    Raises:
        ValueError: bad sampling settings, or ``keep_local`` with a strategy other than FedBN.
    """
    fl = cfg.fl
    for key in ("fraction_train", "fraction_evaluate"):
        if not 0.0 < float(fl[key]) <= 1.0:
            raise ValueError(f"fl.{key} must be in (0, 1], got {fl[key]!r}")
    for key in ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes"):
        if int(fl[key]) < 1:
            raise ValueError(f"fl.{key} must be >= 1, got {fl[key]!r}")
    if "server" not in cfg.strategy or "_target_" not in cfg.strategy.server:
        raise ValueError(f"strategy config needs a 'server' node with a _target_, got {cfg.strategy!r}")
    factory = hydra.utils.instantiate(cfg.strategy.server)
    target = factory.func if isinstance(factory, functools.partial) else factory
    kwargs: dict[str, Any] = {
        "fraction_train": float(fl.fraction_train),
        "fraction_evaluate": float(fl.fraction_evaluate),
        "min_train_nodes": int(fl.min_train_nodes),
        "min_evaluate_nodes": int(fl.min_evaluate_nodes),
        "min_available_nodes": int(fl.min_available_nodes),
        "weighted_by_key": NUM_EXAMPLES,
        "arrayrecord_key": ARRAYS,
        "configrecord_key": CONFIG,
        "train_metrics_aggr_fn": aggregate_metrics_by_cases,
        "evaluate_metrics_aggr_fn": aggregate_metrics_by_cases,
    }
    keep_local = cfg.strategy.get("keep_local")
    if isinstance(target, type) and issubclass(target, FedBN):
        kwargs["local_keys"] = local_keys(model, keep_local or "norm")
    elif keep_local:
        raise ValueError(
            f"strategy.keep_local={keep_local!r} needs the FedBN strategy, not {target.__name__}"
        )
    if isinstance(target, type) and issubclass(target, Scaffold):
        kwargs["control_keys"] = parameter_keys(model)
    client_dp = (cfg.get("privacy") or {}).get("client_dp") is not None
    if client_dp:
        kwargs["weighted_by_key"] = SITE_WEIGHT
        kwargs["train_metrics_aggr_fn"] = uniform_metric
    strategy = factory(**kwargs)
    if client_dp:
        strategy = wrap_client_dp(cfg, strategy, int(num_sites or fl.min_available_nodes))
    return strategy


# --------------------------------------------------------------------------------------------------
# client-level (hospital-level) central DP: Flower's strategy wrappers

#: strategies whose aggregate is the (uniform) mean of the updates: Flower's noise std sigma*C/m is
#: calibrated for exactly that; robust, adaptive-optimiser and site-specific strategies are refused
CLIENT_DP_STRATEGIES = ("fedavg", "fedprox")
_DP_WRAPPERS = {
    ("fixed", "client"): DifferentialPrivacyClientSideFixedClipping,
    ("fixed", "server"): DifferentialPrivacyServerSideFixedClipping,
    ("adaptive", "client"): DifferentialPrivacyClientSideAdaptiveClipping,
    ("adaptive", "server"): DifferentialPrivacyServerSideAdaptiveClipping,
}
_DP_WRAPPER_TYPES = tuple(_DP_WRAPPERS.values())


def uniform_metric(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Training metrics stay case-weighted when the model is averaged uniformly (client-level DP)."""
    return aggregate_metrics_by_cases(records, NUM_EXAMPLES)


def num_sampled_sites(cfg: DictConfig, num_sites: int) -> int:
    """Sites sampled per training round: what Flower's FedAvg samples out of ``num_sites`` connected."""
    return max(int(num_sites * float(cfg.fl.fraction_train)), int(cfg.fl.min_train_nodes))


def _flower_accountant(client_dp: Mapping[str, Any], num_sites: int) -> Any:
    """Flower's RDP accountant for fixed clipping (needs the optional ``dp-accounting`` package).

    Raises:
        ValueError: ``client_dp.accountant`` names another accountant, or ``dp-accounting`` is missing.
    """
    name = client_dp.get("accountant")
    if name in (None, "", "none"):
        return None
    if name != "rdp":
        raise ValueError(f"privacy.client_dp.accountant must be 'rdp' or null, got {name!r}")
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    config = PrivacyConfig(
        target_delta=float(client_dp.get("delta", 1e-3)),
        population_size=int(num_sites),
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,  # a handful of hospitals: no sampling amplification
        max_epsilon=None if client_dp.get("max_epsilon") is None else float(client_dp["max_epsilon"]),
    )
    try:
        return RdpAccountant(config)
    except ImportError as exc:
        raise ValueError(
            "privacy.client_dp.accountant=rdp needs the dp-accounting package (pip install 'medseg[dp]' or "
            "pip install dp-accounting); set privacy.client_dp.accountant=null to run without client-level epsilon"
        ) from exc


def wrap_client_dp(cfg: DictConfig, strategy: Strategy, num_sites: int) -> Strategy:
    """Wrap ``strategy`` in Flower's central-DP wrapper named by ``privacy.client_dp`` (or return it).

    Args:
        cfg: the run config (``privacy.client_dp``: ``clipping`` fixed|adaptive, ``side`` client|server,
            ``noise_multiplier``, ``clipping_norm`` or the adaptive settings, ``accountant``, ``delta``).
        strategy: the configured strategy; it must weigh sites uniformly (see :func:`build_strategy`).
        num_sites: enrolled sites (the population of Flower's accountant and the sampling base).

    Raises:
        ValueError: an unknown clipping/side, a strategy whose aggregate is not the mean of the updates,
            or a bad setting (Flower's wrappers validate the numbers).
    """
    client_dp = (cfg.get("privacy") or {}).get("client_dp")
    if client_dp is None:
        return strategy
    name = str(cfg.strategy.get("name", ""))
    if name not in CLIENT_DP_STRATEGIES:
        raise ValueError(
            f"client-level DP (privacy.client_dp) needs a strategy that averages the updates "
            f"{CLIENT_DP_STRATEGIES}, got strategy={name}: Flower's noise is calibrated for a uniform mean"
        )
    key = (str(client_dp.get("clipping")), str(client_dp.get("side")))
    if key not in _DP_WRAPPERS:
        raise ValueError(
            f"privacy.client_dp: clipping must be fixed|adaptive and side client|server, got {key[0]!r}, {key[1]!r}"
        )
    wrapper = _DP_WRAPPERS[key]
    m = num_sampled_sites(cfg, num_sites)
    sigma = float(client_dp.noise_multiplier)
    if key[0] == "fixed":
        return wrapper(
            strategy, sigma, float(client_dp.clipping_norm), m, accountant=_flower_accountant(client_dp, num_sites)
        )
    stddev = client_dp.get("clipped_count_stddev")
    return wrapper(
        strategy,
        sigma,
        m,
        initial_clipping_norm=float(client_dp.initial_clipping_norm),
        target_clipped_quantile=float(client_dp.target_clipped_quantile),
        clip_norm_lr=float(client_dp.clip_norm_lr),
        clipped_count_stddev=None if stddev is None else float(stddev),
    )


def is_client_dp(strategy: Strategy) -> bool:
    """Whether ``strategy`` is one of Flower's central-DP wrappers."""
    return isinstance(strategy, _DP_WRAPPER_TYPES)


def client_dp_figures(strategy: Strategy) -> dict[str, Any] | None:
    """This round's client-level DP figures for ``history.json`` (``None`` without client-level DP).

    ``noise_stddev`` is Flower's ``sigma * C / m`` added to the mean of ``m`` sampled sites' clipped
    updates; ``epsilon`` / ``delta`` come from Flower's accountant (fixed clipping with ``accountant: rdp``)
    and are ``None`` otherwise, with the reason in ``epsilon_note``.
    """
    if not is_client_dp(strategy):
        return None
    sigma, clip, m = float(strategy.noise_multiplier), float(strategy.clipping_norm), int(strategy.num_sampled_clients)
    out: dict[str, Any] = {
        "wrapper": type(strategy).__name__,
        "noise_multiplier": sigma,
        "clipping_norm": clip,
        "num_sampled_sites": m,
        "noise_stddev": sigma * clip / m,
        "epsilon": None,
        "delta": None,
    }
    accountant = getattr(strategy, "accountant", None)
    if accountant is not None:
        spent = accountant.get_privacy_spent()
        out.update(epsilon=float(spent.epsilon), delta=float(spent.delta), releases=int(spent.num_releases))
    elif isinstance(strategy, (DifferentialPrivacyClientSideAdaptiveClipping, DifferentialPrivacyServerSideAdaptiveClipping)):
        out["epsilon_note"] = "Flower accounts for fixed clipping only"
    else:
        out["epsilon_note"] = "privacy.client_dp.accountant is null"
    return out
