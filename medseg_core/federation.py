"""What the Flower server and the site clients agree on, without Flower.

``server/`` (the ServerApp) and ``client/`` (the ClientApp) never import each other; the message
protocol they share is defined once, here: record and key names, metric names, node-config keys, and
the pure functions both sides compute (SCAFFOLD's control-variate algebra, reply checks, case-weighted
metric aggregation). Nothing here imports ``flwr``.

Protocol, one run::

    round 0   server -> every node   query.fingerprint   config: config-hash, run-name
              site   -> server       fingerprint (aggregates only, JSON), site-name
              server merges the fingerprints into plan.json (medseg_core.data.fingerprint)
    round r   server -> sampled      train      arrays, config: config-hash, run-name, plan, lr, local-epochs,
                                                server-round [, proximal-mu] [, scaffold-control arrays]
              site   -> server       arrays (keys received minus the site's local keys), metrics
                                     (num-examples = training *cases*), site-name [, scaffold-delta-control]
              server -> sampled      evaluate   arrays, config: ... split=val
              site   -> server       metrics (num-examples = evaluated cases; dice, hd95, ...), site-name
    final     server -> every node   evaluate   best global arrays, split=test

Under ``privacy.secagg`` the train phase of a round is Flower's SecAgg+ protocol (server/secure_agg.py,
client/secure_agg.py): four ``train`` messages per site (setup, share keys, collect masked vectors,
unmask); the third carries the round's weights in Flower's legacy layout (``fitins.parameters``, a list
whose keys are in ``fitins.config[array-keys]``) and the site replies its update (trained - received)
times its weight, quantised and masked, with its metrics in ``fitres.metrics`` (not masked) and site-name.

Federated self-supervised pretraining (``experiment=fl_pretrain``) uses the same records under the
custom action ``pretrain``::

    round 0   server -> every node   query.pretrain     config: config-hash, run-name [, plan]
              site   -> server       num-examples = the site's pretraining *images*, site-name
                                     [, fingerprint: only when no plan was sent and the site has labels]
    round r   server -> sampled      train.pretrain     reconstruction-model arrays, config as for train
              site   -> server       arrays, metrics (num-examples = training images, train-loss)
              server -> sampled      evaluate.pretrain  arrays, config ...
              site   -> server       metrics (num-examples = held-out images, eval-loss)

Kebab-case is used for every key that travels (Flower's convention); Python names are snake_case.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from medseg_core import metrics
from medseg_core.config import config_hash

# --------------------------------------------------------------------------------------------------
# records in a message's RecordDict

#: ArrayRecord with model weights (Flower strategies' default ``arrayrecord_key``)
ARRAYS = "arrays"
#: ConfigRecord with the round's instructions (Flower strategies' default ``configrecord_key``)
CONFIG = "config"
#: MetricRecord a site reports (exactly one per reply, as Flower's strategies expect)
METRICS = "metrics"
#: ConfigRecord in every reply naming the site that answered
SITE = "site"
#: ArrayRecord server -> site: SCAFFOLD's server control variate ``c``
SCAFFOLD_CONTROL = "scaffold-control"
#: ArrayRecord site -> server: SCAFFOLD's ``c_i+ - c_i``
SCAFFOLD_DELTA_CONTROL = "scaffold-delta-control"

#: custom query action of round 0 (message type ``query.fingerprint``)
FINGERPRINT_ACTION = "fingerprint"
#: custom action of federated pretraining (``query.pretrain``, ``train.pretrain``, ``evaluate.pretrain``)
PRETRAIN_ACTION = "pretrain"

# ConfigRecord keys, server -> site
KEY_SERVER_ROUND = "server-round"  # injected by Flower's strategies
KEY_CONFIG_HASH = "config-hash"
KEY_RUN_NAME = "run-name"
KEY_PLAN = "plan"  # the federated plan, JSON text
KEY_LR = "lr"
KEY_LOCAL_EPOCHS = "local-epochs"
KEY_PROXIMAL_MU = "proximal-mu"  # the key Flower's FedProx sends
KEY_SPLIT = "split"
SPLIT_VAL = "val"
SPLIT_TEST = "test"
#: where a site keeps the model of the final test (the run's best, with its own local layers), in its
#: state folder for the run: a checkpoint ``medseg-predict`` reads
SITE_MODEL = "model_best.pt"
SPLITS = (SPLIT_VAL, SPLIT_TEST)
#: SecAgg+ rounds only (legacy ``fitins.*`` layout, whose weights are a nameless list): JSON list of the
#: weights' state-dict keys, in the order of that list
KEY_ARRAY_KEYS = "array-keys"

# ConfigRecord keys, site -> server
KEY_SITE_NAME = "site-name"
KEY_NOTE = "note"  # round 0: something the server should show the user (e.g. sites not simulated)
KEY_FINGERPRINT = "fingerprint"  # the site's fingerprint, JSON text (aggregates only, no voxel)

# MetricRecord keys
NUM_EXAMPLES = "num-examples"  # training cases (train) or evaluated cases (evaluate); never batches
SITE_WEIGHT = "site-weight"  # 1 from every site: client-level DP averages the sites' models uniformly
TRAIN_LOSS = "train-loss"
NUM_STEPS = "num-steps"
TRAIN_SECONDS = "train-seconds"
EVAL_SECONDS = "eval-seconds"
EVAL_LOSS = "eval-loss"
# evaluation metrics: medseg_core.metrics' names (foreground mean; per class "<metric>/<class>", and
# "<metric>/<class>/n" the number of cases behind it), see medseg_core.metrics.flat_summary
DICE, HD95, IOU, NSD = metrics.DICE, metrics.HD95, metrics.IOU, metrics.NSD
# the final test's metrics on each scan's own grid, as medseg-predict delivers them: "original-grid/dice", ...
ORIGINAL_GRID = "original-grid"

# node config keys (``flower-supernode --node-config``; Flower sets the two partition keys in simulation)
NODE_SITE_DIR = "site-dir"
NODE_STATE_DIR = "state-dir"
NODE_SITE_ID = "site-id"
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"

#: config keys that may change when a run is resumed (everything else must match the stored run)
RESUME_FREE_KEYS = ("fl.resume", "fl.num_rounds")

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_safe_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is safe as a single path component (letters, digits, ``._-``).

    Raises:
        ValueError: anything else (a name received over the network must not walk the file system).
    """
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", ".."):
        raise ValueError(f"{what} {name!r} is not a safe name (letters, digits, '.', '_', '-'; at most 128)")
    return name


def dumps(obj: Any) -> str:
    """Compact, key-sorted JSON for ConfigRecord values (plans, fingerprints)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def loads(text: str, what: str) -> dict[str, Any]:
    """Parse a JSON object received in a message.

    Raises:
        ValueError: not JSON, or not an object (naming ``what``).
    """
    try:
        obj = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def protocol_hash(cfg: DictConfig) -> str:
    """The ``config-hash`` the server sends and every site compares with its own.

    The resolved config without :data:`medseg_core.config.SITE_LOCAL_KEYS` (folders that differ from
    machine to machine by design, e.g. ``data.cache_dir`` from ``$MEDSEG_CACHE_DIR``): what must match is
    what is trained and how, not where each party keeps its files.
    """
    return config_hash(cfg)


def resume_identity(cfg: DictConfig) -> str:
    """Hash of the configuration a resumed run must share with the stored one.

    :func:`protocol_hash`, also ignoring :data:`RESUME_FREE_KEYS`: ``fl.resume`` itself, and
    ``fl.num_rounds`` (and what is derived from it) so a finished run can be extended.
    """
    return config_hash(cfg, ignore=RESUME_FREE_KEYS)


# --------------------------------------------------------------------------------------------------
# which weights travel


def parameter_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of the trainable parameters (not buffers), in state-dict order."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return [k for k in model.state_dict() if k in names]


_NORM_TYPES = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def norm_state_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of every normalisation layer (affine weights, biases, running statistics).

    FedBN keeps exactly these at each site. Covers BatchNorm/InstanceNorm (``_NormBase``), GroupNorm
    and LayerNorm, whatever the model family.
    """
    keys: list[str] = []
    for prefix, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            for name in module.state_dict():
                keys.append(f"{prefix}.{name}" if prefix else name)
    order = {k: i for i, k in enumerate(model.state_dict())}
    return sorted((k for k in keys if k in order), key=order.__getitem__)


def local_keys(model: torch.nn.Module, keep_local: str | None) -> list[str]:
    """Keys a site never sends, for the ``strategy.keep_local`` setting (``None`` or ``"norm"``).

    Raises:
        ValueError: an unknown setting.
    """
    if keep_local in (None, "", "none"):
        return []
    if keep_local == "norm":
        return norm_state_keys(model)
    raise ValueError(f"strategy.keep_local must be null or 'norm', got {keep_local!r}")


#: numpy reads every .npy header (Flower's ``Array.numpy()`` is ``np.load``) with ``ast.literal_eval``,
#: and CPython 3.11 up to at least 3.11.7 (the version here) can raise "SystemError: AST constructor
#: recursion depth mismatch" when two threads do that at once (CPython gh-106905). Sites that run as
#: threads of one process (``server.inprocess.InProcessGrid``) did so: one site of a 750-round bench
#: failed in round 23. Every conversion of received arrays therefore holds this lock; it costs nothing
#: in a deployment, where each site is its own process.
NPY_LOAD_LOCK = threading.Lock()


def arrays_to_numpy(arrays: Iterable[tuple[str, Any]]) -> dict[str, np.ndarray]:
    """``{key: array.numpy()}`` for Flower ``Array`` items (``record.items()``), under :data:`NPY_LOAD_LOCK`."""
    with NPY_LOAD_LOCK:
        return {k: v.numpy() for k, v in arrays}


def wire_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays ready for a Flower ``Array``: C-contiguous, every shape kept (keys in order).

    ``np.require(..., "C")``, not ``np.ascontiguousarray``: the latter turns a 0-d array (BatchNorm's
    ``num_batches_tracked``) into shape ``(1,)``, which the receiver then rejects as a wrong shape.
    """
    return {k: np.require(v, requirements="C") for k, v in arrays.items()}


def state_to_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A torch state dict as NumPy arrays on the CPU (copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def check_arrays(
    arrays: Mapping[str, np.ndarray], expected: Mapping[str, Sequence[int]], what: str = "update"
) -> list[str]:
    """Problems that make a received set of arrays unusable (empty list: usable).

    Args:
        arrays: key -> array, as received.
        expected: key -> shape the receiver expects (exactly these keys).
        what: name used in the messages.

    Returns:
        One message per problem: missing or unexpected keys, wrong shapes, NaN/Inf values.
    """
    problems: list[str] = []
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing:
        problems.append(f"{what} lacks {len(missing)} array(s), e.g. {missing[:3]}")
    if extra:
        problems.append(f"{what} has {len(extra)} unexpected array(s), e.g. {extra[:3]}")
    for key in sorted(set(arrays) & set(expected)):
        value = np.asarray(arrays[key])
        if tuple(value.shape) != tuple(expected[key]):
            problems.append(
                f"{what} array {key!r} has shape {tuple(value.shape)}, expected {tuple(expected[key])}"
            )
        elif value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            problems.append(f"{what} array {key!r} holds {bad} NaN/Inf value(s)")
    return problems


# --------------------------------------------------------------------------------------------------
# metrics


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Mean of ``values`` weighted by ``weights``, ignoring NaN values (NaN if none is left).

    Raises:
        ValueError: different lengths or a negative weight.
    """
    if len(values) != len(weights):
        raise ValueError(f"{len(values)} values but {len(weights)} weights")
    if any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0, got {list(weights)}")
    pairs = [(float(v), float(w)) for v, w in zip(values, weights, strict=True) if math.isfinite(float(v))]
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        return math.nan
    return math.fsum(v * w for v, w in pairs) / total


def aggregate_by_cases(
    per_site: Mapping[str, Mapping[str, float]], weight_key: str = NUM_EXAMPLES
) -> dict[str, float]:
    """Aggregate per-site metrics, each site weighted by its number of cases, NaN-aware.

    Args:
        per_site: site -> ``{metric: value, weight_key: cases}``.
        weight_key: the key holding the number of cases.

    Returns:
        ``{metric: weighted mean}`` over every metric any site reported, plus ``weight_key``: the total.
        Counts (keys ending in ``/n``: cases behind a class mean) are summed, not averaged.
    """
    keys = sorted({k for m in per_site.values() for k in m if k != weight_key})
    out: dict[str, float] = {}
    for key in keys:
        rows = [(m[key], m.get(weight_key, 0)) for m in per_site.values() if key in m]
        if key.endswith("/n"):
            out[key] = float(sum(r[0] for r in rows if math.isfinite(float(r[0]))))
        else:
            out[key] = weighted_mean([r[0] for r in rows], [r[1] for r in rows])
    out[weight_key] = float(sum(m.get(weight_key, 0) for m in per_site.values()))
    return out


# --------------------------------------------------------------------------------------------------
# determinism


def round_seed(seed: int, round_idx: int, site: str) -> int:
    """Seed of a site's local randomness in one round (crops, augmentation, shuffling).

    A pure function of (run seed, round, site), so a resumed run draws exactly what an uninterrupted
    run draws, whatever process serves the site.
    """
    digest = hashlib.sha256(f"{int(seed)}:{int(round_idx)}:{site}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# --------------------------------------------------------------------------------------------------
# SCAFFOLD (Karimireddy et al., ICML 2020, Algorithm 1; the site's variate is what option II estimates)


def scaffold_control_update(
    c_i: Mapping[str, np.ndarray], mean_gradient: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A site's new control variate: the mean of its uncorrected local gradients over the round.

    That is the quantity the paper's option II, ``c_i+ = c_i - c + (x - y_i) / (K * lr)``, recovers from
    the displacement under plain SGD (``y_i = x - lr * sum_k (g_k + c - c_i)``); measuring the gradients
    directly gives the same value there and stays right under momentum, AdamW, weight decay and clipping,
    where the displacement no longer measures the gradient.

    Args:
        c_i: the site's control variate before the round (its keys are the ones updated).
        mean_gradient: the mean over the round's K steps of the stochastic gradient (before correction).

    Returns:
        ``(c_i_plus, delta_c_i)`` with ``delta_c_i = c_i_plus - c_i`` (what is sent to the server).

    Raises:
        ValueError: a key of ``c_i`` has no gradient, or a shape differs.
    """
    problems = [k for k in c_i if k not in mean_gradient or np.shape(mean_gradient[k]) != np.shape(c_i[k])]
    if problems:
        raise ValueError(f"SCAFFOLD: no gradient of the control variate's shape for {problems[:3]}")
    c_plus = {k: np.asarray(mean_gradient[k]).astype(np.asarray(c_i[k]).dtype) for k in c_i}
    delta = {k: (c_plus[k] - c_i[k]).astype(c_plus[k].dtype) for k in c_i}
    return c_plus, delta


def scaffold_server_update(
    x: Mapping[str, np.ndarray],
    c: Mapping[str, np.ndarray],
    ys: Sequence[Mapping[str, np.ndarray]],
    delta_cs: Sequence[Mapping[str, np.ndarray]],
    num_nodes_total: int,
    global_lr: float = 1.0,
    weights: Sequence[float] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The server step of SCAFFOLD over the sites S that replied.

    ``x <- x + eta_g * mean_i(y_i - x)`` and ``c <- c + |S| / N * mean_i(delta_c_i)`` (uniform means, as
    in the paper; pass ``weights`` for a case-weighted variant).

    Args:
        x: global weights sent this round (every key of ``ys``).
        c: server control variate (every key of ``delta_cs``).
        ys: weights returned by each replying site.
        delta_cs: ``c_i+ - c_i`` of each replying site (same order).
        num_nodes_total: N, the number of sites in the federation.
        global_lr: eta_g.
        weights: optional non-negative weight per site (default: uniform).

    Returns:
        ``(x_new, c_new)``.

    Raises:
        ValueError: no reply, mismatched lengths, or ``num_nodes_total < len(ys)``.
    """
    n = len(ys)
    if n == 0 or len(delta_cs) != n:
        raise ValueError(
            f"SCAFFOLD needs at least one reply with a control update, got {n} and {len(delta_cs)}"
        )
    if num_nodes_total < n:
        raise ValueError(f"num_nodes_total={num_nodes_total} is smaller than the {n} replies")
    w = (
        np.full(n, 1.0 / n)
        if weights is None
        else np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    )
    x_new = {
        k: (x[k] + global_lr * sum(wi * (y[k] - x[k]) for wi, y in zip(w, ys, strict=True))).astype(
            x[k].dtype
        )
        for k in ys[0]
    }
    x_new = {**{k: v for k, v in x.items() if k not in x_new}, **x_new}
    frac = n / num_nodes_total
    c_new = {
        k: (c[k] + frac * sum(wi * d[k] for wi, d in zip(w, delta_cs, strict=True))).astype(c[k].dtype)
        for k in c
    }
    return x_new, c_new


def zeros_like(arrays: Mapping[str, np.ndarray], keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Zero arrays with the shapes and dtypes of ``arrays`` (only ``keys`` when given)."""
    keys = list(arrays) if keys is None else list(keys)
    return {k: np.zeros_like(arrays[k]) for k in keys}
