"""Reconstruction losses on masked patches only, for any number of channels.

Images ``[B, C, *S]`` are cut into non-overlapping patches ``[B, N, P * C]`` (``P`` voxels per patch,
token order = row-major over the patch grid, as ``conv(x).flatten(2)`` orders ViT tokens). Ours because
MAE's reference ``patchify`` assumes 3 channels and square 2D images; MONAI has none.

The loss is MAE's: mean-squared error per patch, averaged over the *masked* patches only. With
``norm_pix`` the target of every patch is normalised to zero mean and unit variance (MAE's
``norm_pix_loss``); here per channel, because the channels of a medical image are different modalities
(CT next to PET) whose scales must not be mixed. With one channel this is exactly MAE's target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

NORM_PIX_EPS = 1e-6  # as MAE


def _patch_tuple(patch: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    out = (patch,) * spatial_dims if isinstance(patch, int) else tuple(patch)
    if len(out) != spatial_dims or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in out):
        raise ValueError(f"patch={patch!r} needs {spatial_dims} positive integer(s)")
    return out


def patchify(x: torch.Tensor, patch: int | Sequence[int]) -> torch.Tensor:
    """``[B, C, *S]`` -> ``[B, N, P * C]`` with ``N = prod(S / patch)``, ``P = prod(patch)``.

    Each patch vector is laid out ``(patch voxels, channel)`` with the channel fastest.

    Raises:
        ValueError: not a 2D/3D batch, or a spatial size not divisible by the patch.
    """
    if x.ndim not in (4, 5):
        raise ValueError(f"patchify expects [B, C, H, W] or [B, C, D, H, W], got {tuple(x.shape)}")
    d = x.ndim - 2
    p = _patch_tuple(patch, d)
    b, c, *size = x.shape
    if any(s % q for s, q in zip(size, p, strict=True)):
        raise ValueError(f"spatial size {tuple(size)} is not divisible by the patch {p}")
    g = [s // q for s, q in zip(size, p, strict=True)]
    interleaved = [v for pair in zip(g, p, strict=True) for v in pair]
    x = x.reshape(b, c, *interleaved)  # [B, C, g1, p1, g2, p2, (g3, p3)]
    order = [0, *(2 + 2 * i for i in range(d)), *(3 + 2 * i for i in range(d)), 1]
    return x.permute(*order).reshape(b, math.prod(g), math.prod(p) * c)


def unpatchify(patches: torch.Tensor, patch: int | Sequence[int], grid: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, N, P * C]`` -> ``[B, C, *(grid * patch)]``.

    Raises:
        ValueError: the sizes do not fit.
    """
    d = len(grid)
    p = _patch_tuple(patch, d)
    b, n, width = patches.shape
    if n != math.prod(grid) or width != math.prod(p) * channels:
        raise ValueError(
            f"patches {tuple(patches.shape)} do not fit grid {tuple(grid)} x patch {p} x {channels} channel(s)"
        )
    x = patches.reshape(b, *grid, *p, channels)  # [B, g1, g2, (g3), p1, p2, (p3), C]
    order = [0, 1 + 2 * d, *(v for i in range(d) for v in (1 + i, 1 + d + i))]
    x = x.permute(*order)  # [B, C, g1, p1, g2, p2, ...]
    return x.reshape(b, channels, *(gi * pi for gi, pi in zip(grid, p, strict=True)))


def _per_channel(patches: torch.Tensor, channels: int) -> torch.Tensor:
    b, n, width = patches.shape
    if width % channels:
        raise ValueError(f"patch width {width} is not a multiple of {channels} channel(s)")
    return patches.reshape(b, n, width // channels, channels)  # [B, N, P, C]


def patch_stats(target: torch.Tensor, channels: int, eps: float = NORM_PIX_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch and channel mean and std ``[B, N, 1, C]`` of target patches ``[B, N, P * C]``."""
    t = _per_channel(target, channels)
    mean = t.mean(dim=2, keepdim=True)
    var = t.var(dim=2, keepdim=True) if t.shape[2] > 1 else torch.zeros_like(mean)
    return mean, (var + eps).sqrt()


def normalize_patches(target: torch.Tensor, channels: int, eps: float = NORM_PIX_EPS) -> torch.Tensor:
    """MAE's norm-pix target: every patch (and channel) to zero mean, unit variance; ``[B, N, P * C]``."""
    mean, std = patch_stats(target, channels, eps)
    return ((_per_channel(target, channels) - mean) / std).reshape(target.shape)


def denormalize_patches(pred: torch.Tensor, target: torch.Tensor, channels: int,
                        eps: float = NORM_PIX_EPS) -> torch.Tensor:
    """Map norm-pix predictions back to intensities with the target patches' statistics (for display)."""
    mean, std = patch_stats(target, channels, eps)
    return (_per_channel(pred, channels) * std + mean).reshape(pred.shape)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean-squared error over masked patches only.

    Args:
        pred, target: ``[B, N, D]`` patch vectors.
        mask: ``[B, N]``, 1/True = masked (counted), 0 = visible (ignored).

    Returns:
        Scalar: per-patch MSE averaged over the masked patches of the whole batch.

    Raises:
        ValueError: shapes differ, or nothing is masked.
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask "
                         f"{tuple(mask.shape)} do not match ([B, N, D] and [B, N])")
    weight = mask.to(pred.dtype)
    total = weight.sum()
    if total <= 0:
        raise ValueError("masked_mse: no patch is masked, the loss is undefined")
    per_patch = (pred - target).pow(2).mean(dim=-1)  # [B, N], mean loss per patch
    return (per_patch * weight).sum() / total


def masked_patch_loss(pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, patch: int | Sequence[int],
                      *, norm_pix: bool = False) -> torch.Tensor:
    """MAE loss: predicted patches ``[B, N, P * C]`` against the patches of ``image`` ``[B, C, *S]``.

    Args:
        pred: predicted patch vectors (layout of :func:`patchify`).
        image: the unmasked input.
        mask: ``[B, N]`` (or ``[B, *grid]``), True = masked.
        patch: patch edge(s) in voxels.
        norm_pix: normalise every target patch per channel first.
    """
    target = patchify(image, patch)  # [B, N, P * C]
    if norm_pix:
        target = normalize_patches(target, image.shape[1])
    return masked_mse(pred, target, mask.reshape(mask.shape[0], -1))


def masked_voxel_loss(pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, block: int | Sequence[int],
                      *, norm_pix: bool = False) -> torch.Tensor:
    """Masked image modelling loss: full-size reconstruction ``[B, C, *S]`` scored on masked blocks only.

    Args:
        pred: the network's reconstruction, same shape as ``image``.
        image: the unmasked input ``[B, C, *S]``.
        mask: block mask ``[B, *(S / block)]``, True = masked.
        block: the mask's block edge(s) in voxels (the norm-pix patches).
        norm_pix: normalise the target per block and channel (the prediction is compared as is).

    Raises:
        ValueError: shapes do not match.
    """
    if pred.shape != image.shape:
        raise ValueError(f"reconstruction {tuple(pred.shape)} and image {tuple(image.shape)} differ")
    return masked_patch_loss(patchify(pred, block), image, mask, block, norm_pix=norm_pix)
