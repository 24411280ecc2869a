"""Seeded 2D/3D block masks for masked image modelling and masked autoencoders.

A mask lives on a *grid*: the voxel grid for CNN masked image modelling (blocks of e.g. 8^3 voxels,
matching the network's total downsampling), or the token grid of a transformer (one cell per patch,
optionally blocks of several tokens). Exactly ``round(ratio * n_blocks)`` blocks are masked in every
sample, as in MAE (a fixed count keeps the number of visible tokens equal across the batch, so they
can be gathered into one dense tensor).

Ours because MONAI's ``MaskedAutoEncoderViT`` masks single tokens with the global RNG and no block
option, and torchvision / timm have no N-d block masking.

Conventions: ``True`` / ``1`` means *masked* (hidden from the encoder, reconstructed by the loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _as_tuple(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    out = (value,) * ndim if isinstance(value, int) else tuple(value)
    if len(out) != ndim or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
        raise ValueError(f"{name}={value!r} needs {ndim} positive integer(s)")
    return out


def check_ratio(ratio: float) -> float:
    """``ratio`` as a float in (0, 1).

    Raises:
        ValueError: outside (0, 1) or not a number.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"mask ratio={ratio!r} must be a number in (0, 1)")
    return float(ratio)


def num_masked(n_blocks: int, ratio: float) -> int:
    """Blocks masked out of ``n_blocks``: ``round(ratio * n)``, at least 1 and at most ``n - 1``.

    Raises:
        ValueError: fewer than 2 blocks (nothing could stay visible, or nothing be masked).
    """
    if n_blocks < 2:
        raise ValueError(f"a mask needs at least 2 blocks (got {n_blocks}): use a larger input or smaller blocks")
    return min(max(round(check_ratio(ratio) * n_blocks), 1), n_blocks - 1)


def block_mask(
    batch_size: int,
    grid: Sequence[int],
    ratio: float,
    block_size: int | Sequence[int] = 1,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random block mask on a 2D/3D grid.

    Args:
        batch_size: samples.
        grid: grid shape, ``(H, W)`` or ``(D, H, W)`` (voxels or tokens).
        ratio: fraction of blocks masked, in (0, 1).
        block_size: block edge in grid cells (an int or one per axis). A grid not divisible by the block
            has smaller blocks at its far edges (the masked fraction of *cells* is then approximate).
        generator: torch RNG on the CPU (seeded: the same seed gives the same masks).
        device: where the mask is returned.

    Returns:
        Boolean mask ``[B, *grid]``, ``True`` = masked; every sample has the same number of masked blocks.

    Raises:
        ValueError: bad batch size, grid, ratio or block size, or fewer than 2 blocks.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    grid = tuple(grid)
    if len(grid) not in (2, 3):
        raise ValueError(f"grid={grid!r} must have 2 or 3 axes")
    grid = _as_tuple(grid, len(grid), "grid")
    block = _as_tuple(block_size, len(grid), "block_size")
    blocks = tuple(math.ceil(g / b) for g, b in zip(grid, block, strict=True))  # block grid
    n = math.prod(blocks)
    k = num_masked(n, ratio)
    noise = torch.rand(batch_size, n, generator=generator)  # [B, n_blocks]
    order = noise.argsort(dim=1)
    flat = torch.zeros(batch_size, n, dtype=torch.bool)
    flat.scatter_(1, order[:, :k], True)  # [B, n_blocks], exactly k True per row
    mask = flat.view(batch_size, *blocks)
    for axis, b in enumerate(block):
        if b > 1:
            mask = mask.repeat_interleave(b, dim=axis + 1)
    mask = mask[(slice(None), *(slice(0, g) for g in grid))]  # crop edge blocks to the grid
    return mask.to(device) if device is not None else mask


def upsample_mask(mask: torch.Tensor, factor: int | Sequence[int]) -> torch.Tensor:
    """Grid mask ``[B, *grid]`` -> voxel mask ``[B, 1, *(grid * factor)]`` (float, 1 = masked)."""
    ndim = mask.ndim - 1
    factor = _as_tuple(factor, ndim, "factor")
    out = mask[:, None].float()
    if any(f > 1 for f in factor):
        out = F.interpolate(out, scale_factor=factor, mode="nearest")
    return out


class MaskGenerator:
    """Seeded source of block masks (one torch RNG; its state can be saved with a checkpoint).

    Args:
        ratio: fraction of blocks masked, in (0, 1) (MAE: 0.75; CNN masked image modelling: 0.6).
        block_size: block edge in grid cells (int or per axis).
        seed: RNG seed.

    Raises:
        ValueError: bad ratio, block size or seed.
    """

    def __init__(self, ratio: float, block_size: int | Sequence[int] = 1, seed: int = 0) -> None:
        self.ratio = check_ratio(ratio)
        if isinstance(block_size, int):
            _as_tuple(block_size, 1, "block_size")
        else:
            _as_tuple(block_size, len(tuple(block_size)), "block_size")
            if len(tuple(block_size)) not in (2, 3):
                raise ValueError(f"block_size={block_size!r} needs 2 or 3 entries (or one int)")
        self.block_size = block_size if isinstance(block_size, int) else tuple(block_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an integer")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch_size: int, grid: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
        """A ``[B, *grid]`` boolean mask (see :func:`block_mask`)."""
        return block_mask(batch_size, grid, self.ratio, self.block_size, generator=self.generator, device=device)

    def reseed(self, seed: int) -> None:
        """Restart the RNG from ``seed`` (e.g. the same masks for every validation pass)."""
        self.generator.manual_seed(int(seed))

    def state_dict(self) -> dict:
        return {"rng": self.generator.get_state(), "ratio": self.ratio, "block_size": self.block_size}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["rng"])

    def __repr__(self) -> str:
        return f"MaskGenerator(ratio={self.ratio}, block_size={self.block_size}, seed={self.seed})"
