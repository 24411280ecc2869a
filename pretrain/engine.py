"""Pretraining steps as plain functions: what ``medseg-pretrain`` and a federated client both call.

    model = build_pretrain_model(cfg.pretrain, model_kwargs, seed=seed)      # pretrain.builder
    stats = pretrain_one_epoch(model, loader, optimizer, device=device)       # one pass, loss on masked blocks
    val = evaluate_pretraining(model, val_loader, device=device, seed=0)      # same masks every time
    export_encoder(model, run_dir / "encoder.pt", config_hash=...)            # pretrain.export

Batches are MONAI dictionaries ``{"image": [B, C, *patch], ...}`` (labels are never used) or plain tensors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader
from tqdm.auto import tqdm

from medseg_core.engine import plain_tensor
from medseg_core.runtime import autocast
from pretrain.base import PretrainModel, ReconstructionView


def batch_images(batch: Mapping[str, Any] | torch.Tensor) -> torch.Tensor:
    """The image tensor ``[B, C, *S]`` of a batch (dict with ``image``, or a tensor)."""
    return plain_tensor(batch if isinstance(batch, torch.Tensor) else batch["image"])


def reseed_loader(loader: DataLoader | Iterable, seed: int) -> None:
    """Restart a loader's shuffling and its datasets' random transforms from ``seed``.

    Called once per epoch with ``seed + epoch`` so that a resumed run draws exactly what the
    uninterrupted run would have drawn (with ``num_workers=0``; persistent workers keep their own state).
    Anything without a ``dataset`` (e.g. a list of batches) is left alone.
    """
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(int(seed))
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        return
    datasets = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    for ds in datasets:
        transform = getattr(ds, "transform", None)
        if hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=int(seed) % 2**32)


def pretrain_one_epoch(
    model: PretrainModel,
    loader: Iterable[Mapping[str, Any] | torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    grad_clip_norm: float | None = None,
    amp: bool = False,
    max_steps: int | None = None,
    progress: bool = False,
    desc: str = "pretrain",
) -> dict[str, float]:
    """One pass of masked-reconstruction training.

    Args:
        model: a :class:`PretrainModel` (its ``forward`` returns the loss).
        loader: image batches.
        optimizer: over ``model.parameters()``.
        grad_clip_norm: clip the global gradient norm (``None``/0: off).
        amp: bf16 autocast.
        max_steps: stop after this many steps.
        progress: tqdm bar.

    Returns:
        ``loss`` (mean over steps), ``num_steps``, ``num_samples`` (crops), ``seconds``, ``samples_per_s``.

    Raises:
        FloatingPointError: the loss became NaN/Inf.
    """
    model.train()
    total, steps, samples = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for batch in bar:
        images = batch_images(batch).to(device, non_blocking=True)
        if images.shape[0] == 0:
            continue
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = model(images)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {steps}; pretraining diverged")
        loss.backward()
        if grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimizer.step()
        total += float(loss.detach())
        steps += 1
        samples += int(images.shape[0])
        if progress:
            bar.set_postfix(loss=f"{total / steps:.4f}")
        if max_steps is not None and steps >= max_steps:
            break
    seconds = time.perf_counter() - start
    return {"loss": total / steps if steps else math.nan, "num_steps": steps, "num_samples": samples,
            "seconds": seconds, "samples_per_s": samples / seconds if seconds > 0 else math.nan}


@torch.no_grad()
def evaluate_pretraining(model: PretrainModel, loader: DataLoader | Iterable, *, device: torch.device, seed: int = 0,
                         amp: bool = False, max_batches: int | None = None) -> dict[str, float]:
    """Mean masked-reconstruction loss with fixed masks and crops (comparable between epochs).

    The mask RNG and the loader's random transforms are reseeded with ``seed`` and the mask RNG state is
    restored afterwards, so evaluation does not change what training draws next.

    Returns:
        ``loss`` (mean per crop) and ``num_samples``.
    """
    model.eval()
    saved = model.mask_generator.generator.get_state()
    model.mask_generator.reseed(seed)
    reseed_loader(loader, seed)
    total, samples = 0.0, 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            images = batch_images(batch).to(device)
            with autocast(device, amp):
                loss = model(images)
            total += float(loss) * images.shape[0]
            samples += int(images.shape[0])
    finally:
        model.mask_generator.generator.set_state(saved)
    return {"loss": total / samples if samples else math.nan, "num_samples": samples}


@torch.no_grad()
def reconstruction_example(model: PretrainModel, loader: DataLoader | Iterable, *, device: torch.device,
                           seed: int = 0) -> ReconstructionView:
    """Masked input and reconstruction of the first batch of ``loader`` (fixed seed), for pictures."""
    model.eval()
    saved = model.mask_generator.generator.get_state()
    model.mask_generator.reseed(seed)
    reseed_loader(loader, seed)
    try:
        images = batch_images(next(iter(loader))).to(device)
        view = model.reconstruct(images)
    finally:
        model.mask_generator.generator.set_state(saved)
    return ReconstructionView(*(t.detach().cpu() for t in (view.image, view.masked, view.reconstruction, view.mask)),
                              view.loss)
