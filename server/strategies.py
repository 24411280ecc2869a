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
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from omegaconf import DictConfig

from medseg_core.federation import (
    ARRAYS,
    CONFIG,
    KEY_SERVER_ROUND,
    NUM_EXAMPLES,
    SCAFFOLD_CONTROL,
    SCAFFOLD_DELTA_CONTROL,
    aggregate_by_cases,
    local_keys,
    parameter_keys,
    scaffold_server_update,
    zeros_like,
)

#: attributes in which Flower's strategies keep state across rounds (server optimiser moments, momentum)
FLOWER_STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector")


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as ``{key: numpy array}``."""
    return {k: v.numpy() for k, v in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``{key: numpy array}`` as an ArrayRecord (keys kept in order)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def aggregate_metrics_by_cases(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Case-weighted mean of every metric of the replies, ignoring NaN (Flower's default propagates NaN).

    Used for both training and evaluation replies; the result keeps the total under ``weighted_by_key``.
    """
    per_reply = {str(i): dict(next(iter(r.metric_records.values()))) for i, r in enumerate(records)}
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
    global model; each sampled site trains with the corrected gradient ``g + c - c_i``, updates its own
    ``c_i`` (option II) and returns its weights and ``c_i+ - c_i``. The server then applies
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
    if "own" in state:
        strategy.load_state_dict(state["own"])
        return
    for name, value in state.get("flower", {}).items():
        if name in FLOWER_STATE_ATTRIBUTES:
            setattr(strategy, name, value)


def build_strategy(cfg: DictConfig, model: torch.nn.Module) -> Strategy:
    """The configured strategy, with ``fl``'s sampling settings and case-weighted metric aggregation.

    Args:
        cfg: the run config (``strategy.server`` is a ``_partial_`` strategy; ``strategy.keep_local``).
        model: the global model (FedBN needs its normalisation keys, SCAFFOLD its parameter keys).

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
    return factory(**kwargs)
