"""One site's share of a round: local training and evaluation, without Flower.

The site does what ``medseg-train`` does over its own cases (same plan, loaders, model, loss and
engine), starting from the global weights it received, plus what the federated algorithm asks:

* FedProx: ``mu/2 * ||w - w_global||^2`` added to the loss (``train_one_epoch(extra_loss=...)``);
* SCAFFOLD: the gradient corrected by ``c - c_i`` (``grad_hook``), and ``c_i`` set to the round's mean
  uncorrected gradient (what option II estimates; exact under any optimiser, see :class:`_Scaffold`);
* FedBN (``strategy.keep_local: norm``): the normalisation weights are the site's own, loaded from and
  saved to its state folder; they are never sent.

Arrays cross this module as ``{state-dict key: numpy array}``; :mod:`client.app` converts them to and
from Flower records.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from client.privacy import (
    DPSettings,
    PrivacyLedger,
    check_training_config,
    ledger_path,
    make_private,
    resolve_ledger_scope,
)
from client.site import KEEP_STATE_FILES, SiteData, SiteState, held_out_loader
from medseg_core.checkpoint import save_checkpoint
from medseg_core.engine import (
    build_optimizer,
    evaluate,
    load_optimizer_state,
    optimizer_state_arrays,
    prepare_model,
    train_one_epoch,
)
from medseg_core.federation import (
    EVAL_SECONDS,
    KEY_LR,
    NUM_EXAMPLES,
    NUM_STEPS,
    SPLIT_TEST,
    SPLIT_VAL,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    check_arrays,
    local_keys,
    round_seed,
    scaffold_control_update,
    state_to_numpy,
)
from medseg_core.metrics import flat_summary
from medseg_core.predict import original_grid_metrics
from medseg_core.runtime import amp_enabled, resolve_device
from medseg_core.workflow import build_configured_model, foreground_classes, model_config, roi_size

LOCAL = "local"
CONTROL = "control"
#: the site's optimiser state (Adam's moments, SGD's momentum) carried from one round to the next
OPTIM = "optim"


class UpdateError(ValueError):
    """The weights received from the server do not fit this site's model."""


@dataclass(frozen=True)
class TrainInstructions:
    """What the server asked for this round.

    Attributes:
        server_round: round index (1-based).
        lr: local learning rate for the whole round.
        local_epochs: passes over the site's training cases.
        proximal_mu: FedProx's mu (0: plain local training).
        control: SCAFFOLD's server control variate ``c`` (``None``: not SCAFFOLD).
    """

    server_round: int
    lr: float
    local_epochs: int = 1
    proximal_mu: float = 0.0
    control: Mapping[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.server_round < 1:
            raise ValueError(f"server_round must be >= 1, got {self.server_round}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"{KEY_LR} must be a positive number, got {self.lr!r}")
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ValueError(f"proximal_mu must be >= 0, got {self.proximal_mu!r}")


@dataclass
class TrainOutcome:
    """What the site sends back: weights (never its local keys), metrics, SCAFFOLD's ``c_i+ - c_i``."""

    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]
    delta_control: dict[str, np.ndarray] | None = None


def site_model_config(cfg: DictConfig, data: SiteData, plan: Mapping[str, Any]) -> dict[str, Any]:
    """The registry kwargs of the configured network for this site's data and the run's plan."""
    return model_config(cfg.model, in_channels=data.site.num_channels, out_channels=data.site.num_classes, plan=plan)


def build_site_model(cfg: DictConfig, data: SiteData, plan: Mapping[str, Any]) -> torch.nn.Module:
    """The configured network for this site's data, initialised as the server's (same seed)."""
    kwargs = site_model_config(cfg, data, plan)
    torch.manual_seed(int(cfg.seed))
    return build_configured_model(kwargs)


def load_weights(
    model: torch.nn.Module,
    received: Mapping[str, np.ndarray],
    keep_local: list[str],
    local: Mapping[str, np.ndarray] | None,
) -> list[str]:
    """Load the global weights, and the site's own values for its local keys.

    Args:
        model: the site's network (modified in place).
        received: arrays from the server; must cover every key that is not local.
        keep_local: keys the site keeps (values in ``received`` for them are ignored).
        local: the site's saved values for ``keep_local`` (``None``: keep the initial values).

    Returns:
        The keys taken from ``received`` (what the site will send back after training).

    Raises:
        UpdateError: missing or unexpected keys, wrong shapes, or NaN/Inf values.
    """
    state = model.state_dict()
    local_set = set(keep_local)
    shared = [k for k in state if k not in local_set]
    incoming = {k: v for k, v in received.items() if k not in local_set}
    problems = check_arrays(incoming, {k: tuple(state[k].shape) for k in shared}, what="global model")
    if problems:
        raise UpdateError("; ".join(problems))
    new_state = {k: torch.as_tensor(np.asarray(v)).to(state[k].dtype) for k, v in incoming.items()}
    if local:
        problems = check_arrays(
            {k: v for k, v in local.items() if k in local_set},
            {k: tuple(state[k].shape) for k in keep_local},
            what="saved local state",
        )
        if problems:
            raise UpdateError("; ".join(problems))
        new_state.update({k: torch.as_tensor(np.asarray(local[k])).to(state[k].dtype) for k in keep_local})
    model.load_state_dict(new_state, strict=False)
    return shared


def _proximal(global_params: dict[str, torch.Tensor], mu: float):
    """FedProx's term ``mu/2 * sum ||w - w_global||^2`` over the shared trainable parameters."""

    def extra_loss(model: torch.nn.Module) -> torch.Tensor:
        terms = [
            (p - global_params[n]).pow(2).sum() for n, p in model.named_parameters() if n in global_params
        ]
        return 0.5 * mu * torch.stack(terms).sum()

    return extra_loss


def round_optimizer(
    cfg: DictConfig, model: torch.nn.Module, state: SiteState, instructions: TrainInstructions
) -> torch.optim.Optimizer:
    """The round's optimiser over ``model`` at the round's learning rate, with the state the site kept
    after its last round when ``fl.keep_optimizer_state`` (a fresh one otherwise, or at its first round).

    Raises:
        ValueError: the kept state does not fit the model (the message names the state folder).
    """
    optimizer = build_optimizer(cfg.optim, model.parameters())
    if cfg.fl.get("keep_optimizer_state", False):
        saved = state.load(OPTIM, instructions.server_round)
        if saved is not None:
            load_optimizer_state(optimizer, model, saved, source=f"the site's optimiser state in {state.dir}")
    for group in optimizer.param_groups:
        group["lr"] = float(instructions.lr)
    return optimizer


def keep_optimizer(cfg: DictConfig, optimizer: torch.optim.Optimizer, model: torch.nn.Module, state: SiteState,
                   round_idx: int) -> None:
    """Write the optimiser's state after the round (``fl.keep_optimizer_state``) for the next round."""
    if cfg.fl.get("keep_optimizer_state", False):
        state.save(OPTIM, round_idx, optimizer_state_arrays(optimizer, model), keep=KEEP_STATE_FILES)


class _Scaffold:
    """SCAFFOLD at the site: each gradient is corrected to ``g + c - c_i`` (called after backward, before
    clipping), and the uncorrected gradients are averaged over the round's steps for ``c_i+``.

    The paper's option II computes that average from the displacement, ``c_i - c + (x - y_i) / (K lr)``,
    which equals the mean of the local gradients only when each step is ``-lr * (g + c - c_i)``: plain SGD
    without momentum, weight decay or clipping. Under AdamW the displacement per step is about ``lr`` for
    every weight, whatever the gradient, so option II's estimate is orders of magnitude too large and
    the run collapses (measured: validation Dice 0.19 at round 8, 0.03 at round 58). Averaging the
    gradients themselves is what option II estimates, is exact under any optimiser, and costs one
    buffer per parameter.
    """

    def __init__(self, correction: dict[str, torch.Tensor]) -> None:
        self.correction = correction
        self.total = {k: torch.zeros_like(v) for k, v in correction.items()}
        self.steps = 0

    def __call__(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            if p.grad is not None and name in self.correction:
                self.total[name].add_(p.grad)
                p.grad.add_(self.correction[name])
        self.steps += 1

    def mean_gradient(self) -> dict[str, np.ndarray]:
        """The mean uncorrected gradient over the round's steps (``c_i+``)."""
        if self.steps < 1:
            raise ValueError("SCAFFOLD: the round took no optimiser step, so there is no gradient to average")
        return {k: (v / self.steps).cpu().numpy() for k, v in self.total.items()}


def train_round(
    cfg: DictConfig,
    data: SiteData,
    plan: Mapping[str, Any],
    received: Mapping[str, np.ndarray],
    instructions: TrainInstructions,
    state: SiteState,
    *,
    simulated: bool = False,
) -> TrainOutcome:
    """Train the site's model for one round.

    Under ``privacy=dp`` the round is patient-level DP-SGD (:func:`client.privacy.make_private`): the
    site's ledger (in its state folder, never sent) is checked before training and written before the
    reply; the reply carries the ledger's figures (``dp-*``, :mod:`medseg_core.privacy_report`) and no
    training loss (computed from the training patients without noise, so outside the guarantee).

    Args:
        cfg: the run config (model, loss, optim, train, strategy.keep_local, seed).
        data: the site's loaders (:func:`client.site.site_data`).
        plan: the federated plan.
        received: global weights (the shared keys).
        instructions: this round's learning rate, epochs, FedProx mu, SCAFFOLD control variate.
        state: the site's state files for this run.
        simulated: a simulated site (``privacy.ledger_scope: auto`` then keeps one ledger per run).

    Returns:
        The trained shared weights, metrics (``num-examples`` = training cases) and, for SCAFFOLD,
        ``c_i+ - c_i``.

    Raises:
        UpdateError: unusable global weights. FloatingPointError: training diverged.
        client.privacy.PrivacyBudgetExhausted: the round would exceed the site's privacy budget (nothing
            trained; the ClientApp's error reply names the site and the figures).
    """
    device = resolve_device(cfg.device)
    amp = amp_enabled(cfg.train.amp, device)
    r = instructions.server_round
    model = build_site_model(cfg, data, plan)
    keep = local_keys(model, cfg.strategy.get("keep_local"))
    shared = load_weights(model, received, keep, state.load(LOCAL, r) if keep else None)
    model = prepare_model(
        model, device, channels_last=bool(cfg.train.channels_last), spatial_dims=int(cfg.model.spatial_dims)
    )
    x = state_to_numpy({k: v for k, v in model.state_dict().items() if k in set(shared)})

    seed = round_seed(int(cfg.seed), r, data.site.name)
    torch.manual_seed(seed)
    data.reseed(seed)
    loss_fn = hydra.utils.instantiate(cfg.loss)
    optimizer = round_optimizer(cfg, model, state, instructions)

    extra_loss = None
    if instructions.proximal_mu > 0:
        params = {n: p.detach().clone() for n, p in model.named_parameters() if n in set(shared)}
        extra_loss = _proximal(params, float(instructions.proximal_mu))
    grad_hook, c_i = None, None
    if instructions.control is not None:
        control = {k: np.asarray(v) for k, v in instructions.control.items()}
        problems = check_arrays(control, {k: x[k].shape for k in control if k in x}, what="SCAFFOLD control")
        if problems or not set(control) <= set(x):
            raise UpdateError("; ".join(problems) or "SCAFFOLD control variate names keys the model lacks")
        c_i = state.load(CONTROL, r) or {k: np.zeros_like(v) for k, v in control.items()}
        grad_hook = _Scaffold({k: torch.as_tensor(control[k] - c_i[k]).to(device) for k in control})

    private = None
    train_model, train_loader, train_optimizer = model, data.loaders.train, optimizer
    clip_norm = cfg.train.grad_clip_norm
    settings = DPSettings.from_config(cfg.privacy)
    if settings is not None:  # patient-level DP-SGD (client/privacy.py); the engine runs unchanged
        check_training_config(cfg)  # also refuses FedProx/SCAFFOLD, whose terms DP-SGD would drop
        scope = resolve_ledger_scope(settings.ledger_scope, simulated=simulated)
        ledger = PrivacyLedger.open(ledger_path(state.dir.parent, state.dir.name, scope), site=data.site.name)
        private = make_private(  # raises PrivacyBudgetExhausted (the site declines) before any training
            model,
            optimizer,
            data.loaders.train,
            settings,
            ledger=ledger,
            run_name=state.dir.name,
            planned_epochs=int(cfg.fl.num_rounds) * instructions.local_epochs,
            round_epochs=instructions.local_epochs,
        )
        train_model, train_loader, train_optimizer = private.model, private.loader, private.optimizer
        clip_norm = None  # DP-SGD clips each patient's gradient
    losses, steps, seconds = [], 0, 0.0
    try:
        for epoch in range(instructions.local_epochs):
            stats = train_one_epoch(
                train_model,
                train_loader,
                loss_fn,
                train_optimizer,
                device=device,
                grad_clip_norm=clip_norm,
                amp=amp,
                channels_last=bool(cfg.train.channels_last),
                extra_loss=extra_loss,
                grad_hook=grad_hook,
                desc=f"{data.site.name} round {r} epoch {epoch + 1}",
            )
            losses.append(stats["loss"])
            steps += int(stats["num_steps"])
            seconds += float(stats["seconds"])
        privacy_metrics = private.commit(r) if private is not None else {}  # ledger on disk before the reply
    finally:
        if private is not None:
            private.close()

    trained = state_to_numpy(model.state_dict())
    if keep:
        state.save(LOCAL, r, {k: trained[k] for k in keep})
    keep_optimizer(cfg, optimizer, model, state, r)
    delta = None
    if instructions.control is not None:
        assert c_i is not None and isinstance(grad_hook, _Scaffold)
        c_plus, delta = scaffold_control_update(c_i, grad_hook.mean_gradient())
        state.save(CONTROL, r, c_plus, keep=KEEP_STATE_FILES)
    metrics = {NUM_EXAMPLES: data.num_train_cases, NUM_STEPS: steps, TRAIN_SECONDS: seconds}
    if private is None:
        metrics[TRAIN_LOSS] = float(np.mean(losses))
    else:
        # The training loss is computed from the training patients without noise and is not covered by
        # epsilon: it is not released. The step count is the accounted one (empty Poisson batches too).
        metrics[NUM_STEPS] = private.steps
        metrics.update(privacy_metrics)
    return TrainOutcome({k: trained[k] for k in shared}, metrics, delta)


def evaluate_round(
    cfg: DictConfig,
    data: SiteData,
    plan: Mapping[str, Any],
    received: Mapping[str, np.ndarray],
    *,
    split: str,
    server_round: int,
    state: SiteState,
) -> dict[str, float]:
    """Evaluate the global model (with the site's own local weights, if any) on a split of the site.

    Args:
        split: ``"val"`` (the held-out part of the training cases, for model selection) or ``"test"``
            (``imagesTs``).
        server_round: the round whose local state pairs with ``received`` (FedBN).

    Returns:
        :func:`medseg_core.metrics.flat_summary` of the cases (``dice``, ``hd95`` (mm), ``iou``, ``nsd``,
        per class ``dice/<class>`` ...), ``num-examples`` = number of evaluated cases (0 and no metric
        when the split is empty) and ``eval-seconds``.

    Raises:
        ValueError: unknown split. UpdateError: unusable weights.
    """
    if split not in (SPLIT_VAL, SPLIT_TEST):
        raise ValueError(f"split must be {SPLIT_VAL!r} or {SPLIT_TEST!r}, got {split!r}")
    loader = data.loaders.val if split == SPLIT_VAL else held_out_loader(data, plan)
    if loader is None:
        return {NUM_EXAMPLES: 0, EVAL_SECONDS: 0.0}
    device = resolve_device(cfg.device)
    model = build_site_model(cfg, data, plan)
    keep = local_keys(model, cfg.strategy.get("keep_local"))
    load_weights(model, received, keep, state.load(LOCAL, server_round + 1) if keep else None)
    if split == SPLIT_TEST:  # the final test's model is the run's best: the site keeps its own copy
        save_checkpoint(
            state.model_path, state_dict=model.state_dict(), model_config=site_model_config(cfg, data, plan),
            plan=plan, labels=data.site.labels, channel_names=data.site.channel_names,
            round_idx=int(server_round), run_name=state.dir.name,
            local_keys=sorted(keep),
        )
    model = prepare_model(
        model, device, channels_last=bool(cfg.train.channels_last), spatial_dims=int(cfg.model.spatial_dims)
    )
    spatial_dims = int(cfg.model.spatial_dims)
    ev = cfg.eval
    result = evaluate(
        model,
        loader,
        device=device,
        roi_size=roi_size(plan, spatial_dims),
        class_values=foreground_classes(data.site.labels),
        sw_batch_size=int(ev.sw_batch_size),
        overlap=float(ev.get("test_overlap", ev.overlap) if split == SPLIT_TEST else ev.overlap),
        mode=str(ev.mode),
        amp=amp_enabled(cfg.train.amp, device),
        nsd_tolerance_mm=float(ev.nsd_tolerance_mm),
        hd95=bool(ev.hd95),
        model_spatial_dims=spatial_dims,
    )
    metrics = flat_summary(result["aggregate"])
    metrics[NUM_EXAMPLES] = int(result["num_cases"])
    metrics[EVAL_SECONDS] = float(result["seconds"])
    if split == SPLIT_TEST and bool(ev.get("original_grid", True)):
        start = time.perf_counter()
        # the site's copy of the model, as medseg-predict would apply it, on each scan's own grid
        metrics.update(original_grid_metrics(
            state.model_path, data.site.test_cases,
            modalities=data.site.channel_names, device=str(device),
            sw_batch_size=int(ev.sw_batch_size), nsd_tolerance_mm=float(ev.nsd_tolerance_mm), hd95=bool(ev.hd95),
        ))
        metrics[EVAL_SECONDS] += time.perf_counter() - start
    return metrics
