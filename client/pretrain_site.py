"""One site's share of federated self-supervised pretraining, without Flower.

The site does over its own images what ``medseg-pretrain`` does over everyone's (same image selection,
loaders, model and engine: :mod:`pretrain`), starting each round from the global reconstruction model:

* round 0 (:func:`enrollment`): validate the site's data, count its pretraining images and, when the
  server has no plan yet and the site has labelled training cases, send its fingerprint (aggregates only,
  as for fine-tuning). A site without any label enrols too: it sends no fingerprint;
* each round (:func:`pretrain_round`): ``fl.local_epochs`` passes of masked reconstruction over the
  site's training images; the reply's ``num-examples`` is that number of *images*;
* evaluation (:func:`evaluate_pretraining_round`): the global model's reconstruction loss on the site's
  held-out images (fixed masks and crops), and at the last round a reconstruction picture written into
  the site's state folder: images never leave the site, so the server draws none.

Which images: :func:`pretrain.data.pretraining_cases` with the ``images.*`` settings (unlabelled images,
test images, optionally labelled training images), every case stripped of its label path, so the
pretraining pipeline cannot open a label file. Arrays cross this module as ``{key: numpy array}``;
:mod:`client.app` converts them to and from Flower records.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from omegaconf import DictConfig

from client.local import TrainInstructions, UpdateError, keep_optimizer, round_optimizer
from client.site import SiteRef, SiteState, cached_bytes, load_validated_site, trim_cache
from medseg_core.data.dataset import Case, SiteDataset
from medseg_core.data.fingerprint import compute_site_fingerprint
from medseg_core.data.loaders import LoaderSettings, build_unlabelled_loader, plan_hash
from medseg_core.engine import prepare_model
from medseg_core.federation import (
    EVAL_LOSS,
    EVAL_SECONDS,
    NUM_EXAMPLES,
    NUM_STEPS,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    check_arrays,
    round_seed,
    state_to_numpy,
)
from medseg_core.runtime import amp_enabled, resolve_device
from medseg_core.workflow import to_container
from pretrain.base import PretrainModel
from pretrain.builder import build_for_plan
from pretrain.data import pretraining_cases, split_images
from pretrain.engine import evaluate_pretraining, pretrain_one_epoch, reconstruction_example, reseed_loader
from pretrain.plots import plot_reconstruction

#: the picture a site draws of the final global model on one of its own images (in its state folder)
RECONSTRUCTION_PNG = "reconstruction.png"

_LOCK = threading.Lock()
_PLOT_LOCK = threading.Lock()  # pyplot is not thread-safe; in-process sites share one process
_DATA: OrderedDict[tuple, PretrainData] = OrderedDict()


@dataclass
class PretrainData:
    """A validated site's pretraining images for one plan: training and held-out loaders.

    Attributes:
        site: the validated site.
        train_cases, val_cases: image-only cases (``label_path`` is ``None``).
        train_loader: shuffled random crops ``{"image": [B, C, *patch]}``.
        val_loader: the held-out images (``None`` when the site has a single image).
    """

    site: SiteDataset
    train_cases: list[Case]
    val_cases: list[Case]
    train_loader: DataLoader
    val_loader: DataLoader | None

    @property
    def num_train_images(self) -> int:
        """What the server weighs this site's model by (images, not crops or batches)."""
        return len(self.train_cases)


def pretraining_images(site: SiteDataset, cfg: DictConfig) -> list[Case]:
    """The site's images selected by ``images.*``, labels stripped.

    Raises:
        ValueError: ``images.extra_dirs`` is set (folders are a site's own: they cannot live in the shared
            config), or the selection holds no image.
    """
    sel = cfg.images
    if sel.get("extra_dirs"):
        raise ValueError(
            f"images.extra_dirs={list(sel.extra_dirs)} is not supported in federated pretraining: the shared "
            "config cannot name folders at a site; put extra scans into the site's imagesTr/ without labels"
        )
    cases = pretraining_cases(
        site, unlabelled=bool(sel.unlabelled), test=bool(sel.test), train=bool(sel.train)
    )
    if not cases:
        raise ValueError(
            f"site {site.name} ({site.root}) has no image to pretrain on with images.unlabelled={sel.unlabelled}, "
            f"images.test={sel.test}, images.train={sel.train}"
        )
    return cases


def enrollment(ref: SiteRef, cfg: DictConfig, *, fingerprint: bool) -> tuple[int, dict[str, Any] | None]:
    """Round 0: validate the site, count its pretraining images, fingerprint it when asked and possible.

    Args:
        ref: the site.
        cfg: the run config.
        fingerprint: the server has no plan yet and asks for fingerprints.

    Returns:
        ``(number of pretraining images, fingerprint or None)``; ``None`` when not asked or the site has
        no labelled training case (the plan is made from the sites that have some).

    Raises:
        DatasetError: invalid data. ValueError: no image to pretrain on.
    """
    site = load_validated_site(ref, cfg)
    num_images = len(pretraining_images(site, cfg))
    if not (fingerprint and site.train_cases):
        return num_images, None
    fp = compute_site_fingerprint(site)
    fp["sites"] = [ref.name]
    return num_images, fp


def pretrain_data(ref: SiteRef, cfg: DictConfig, plan: Mapping[str, Any]) -> PretrainData:
    """The site's pretraining loaders for ``plan`` (built once per process and plan, least recently used dropped).

    Raises:
        DatasetError: invalid data. ValueError: no image, or a channel count that differs from the plan's.
    """
    site = load_validated_site(ref, cfg)
    if site.num_channels != int(plan["num_channels"]):
        raise ValueError(
            f"site {site.name} ({site.root / 'dataset.json'}) declares {site.num_channels} channel(s), the "
            f"federation's plan {plan['num_channels']}"
        )
    container = to_container(cfg)
    settings = LoaderSettings.from_config(container, progress=False)
    key = (
        str(ref.data_dir.resolve()),
        plan_hash(plan),
        repr(settings),
        json.dumps([container.get("transforms"), container.get("images")], sort_keys=True, default=str),
    )
    with _LOCK:
        if key in _DATA:
            _DATA.move_to_end(key)
            return _DATA[key]
    train, val = split_images(pretraining_images(site, cfg), float(cfg.images.val_fraction), int(cfg.seed))

    def loader(cases: list[Case]) -> DataLoader:
        return build_unlabelled_loader(site, plan, container, cases=cases, settings=settings)

    data = PretrainData(site, train, val, loader(train), loader(val) if val else None)
    with _LOCK:
        _DATA[key] = data
        trim_cache(_DATA, cfg, lambda d: cached_bytes(d.train_loader, d.val_loader))
    return data


def global_model(
    cfg: DictConfig, plan: Mapping[str, Any], received: Mapping[str, np.ndarray]
) -> PretrainModel:
    """The reconstruction model with the received global weights (every key: nothing stays at the site).

    Raises:
        UpdateError: missing or unexpected keys, wrong shapes or NaN/Inf values.
    """
    model = build_for_plan(cfg, plan)
    state = model.state_dict()
    problems = check_arrays(
        received, {k: tuple(v.shape) for k, v in state.items()}, what="global pretraining model"
    )
    if problems:
        raise UpdateError("; ".join(problems))
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)).to(state[k].dtype) for k, v in received.items()})
    return model


def pretrain_round(
    cfg: DictConfig,
    data: PretrainData,
    plan: Mapping[str, Any],
    received: Mapping[str, np.ndarray],
    instructions: TrainInstructions,
    state: SiteState,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Masked-reconstruction training on the site's images for one round.

    Args:
        cfg: the run config (``model``, ``pretrain``, ``optim``, ``train``, ``seed``).
        data: :func:`pretrain_data`.
        plan: the federated plan.
        received: the global reconstruction model (every key).
        instructions: round, learning rate and local epochs (FedProx / SCAFFOLD terms are refused by the
            server for pretraining and must be absent).
        state: the site's state files for this run (its optimiser state, ``fl.keep_optimizer_state``).

    Returns:
        ``(weights, metrics)``: every weight of the reconstruction model; ``num-examples`` = training
        images, ``train-loss`` (mean over the round's steps), ``num-steps``, ``train-seconds``.

    Raises:
        ValueError: FedProx / SCAFFOLD instructions. UpdateError: unusable weights.
        FloatingPointError: the loss diverged.
    """
    if instructions.proximal_mu or instructions.control is not None:
        raise ValueError("federated pretraining has no FedProx term or SCAFFOLD control variate")
    device = resolve_device(cfg.device)
    amp = amp_enabled(cfg.train.amp, device)
    model = prepare_model(global_model(cfg, plan, received), device)
    optimizer = round_optimizer(cfg, model, state, instructions)
    r, name = instructions.server_round, data.site.name
    base_seed = round_seed(
        int(cfg.seed), r, name
    )  # crops and masks: a function of (run seed, round, site) only
    losses, steps, seconds = [], 0, 0.0
    for epoch in range(instructions.local_epochs):
        seed = base_seed + epoch
        torch.manual_seed(seed)
        reseed_loader(data.train_loader, seed)
        model.mask_generator.reseed(seed)
        stats = pretrain_one_epoch(
            model,
            data.train_loader,
            optimizer,
            device=device,
            grad_clip_norm=cfg.train.grad_clip_norm,
            amp=amp,
            desc=f"{name} round {r} epoch {epoch + 1}",
        )
        losses.append(stats["loss"])
        steps += int(stats["num_steps"])
        seconds += float(stats["seconds"])
    keep_optimizer(cfg, optimizer, model, state, r)
    metrics = {
        NUM_EXAMPLES: data.num_train_images,
        TRAIN_LOSS: float(np.mean(losses)),
        NUM_STEPS: steps,
        TRAIN_SECONDS: seconds,
    }
    return state_to_numpy(model.state_dict()), metrics


def evaluate_pretraining_round(
    cfg: DictConfig,
    data: PretrainData,
    plan: Mapping[str, Any],
    received: Mapping[str, np.ndarray],
    *,
    picture: Path | None = None,
) -> dict[str, float]:
    """The global model's masked-reconstruction loss on the site's held-out images.

    Masks and crops are fixed (seeded with ``cfg.seed``), so the losses of different rounds compare.

    Args:
        picture: where to draw the reconstruction of one of the site's images (``None``: no picture).

    Returns:
        ``num-examples`` = held-out images (0 and no loss when the site holds none), ``eval-loss`` (mean
        per crop), ``eval-seconds``.

    Raises:
        UpdateError: unusable weights.
    """
    device = resolve_device(cfg.device)
    amp = amp_enabled(cfg.train.amp, device)
    model = prepare_model(global_model(cfg, plan, received), device)
    metrics: dict[str, float] = {NUM_EXAMPLES: 0, EVAL_SECONDS: 0.0}
    if data.val_loader is not None:
        start = time.perf_counter()
        result = evaluate_pretraining(model, data.val_loader, device=device, seed=int(cfg.seed), amp=amp)
        metrics = {
            NUM_EXAMPLES: len(data.val_cases),
            EVAL_LOSS: float(result["loss"]),
            EVAL_SECONDS: time.perf_counter() - start,
        }
    if picture is not None:
        view = reconstruction_example(
            model, data.val_loader or data.train_loader, device=device, seed=int(cfg.seed)
        )
        with _PLOT_LOCK:
            plot_reconstruction(
                view,
                picture,
                channel_names=data.site.channel_names,
                title=f"{model.method} {model.target_config['name']}, site {data.site.name} (federated)",
            )
    return metrics
