"""Masked image modelling for CNN U-Nets (and any registry network mapping an image to its own size).

Blocks of the input (default: the network's total downsampling, e.g. 8^3 voxels for three stride-2
levels, so one block is one bottleneck cell) are set to 0 (the mean after z-scoring); the *whole*
U-Net, built with ``out_channels = in_channels`` as a reconstruction head, predicts the image; the loss
is the MSE on the masked blocks only (optionally on per-block normalised targets).

What transfers to segmentation: every weight except the output head (the keys whose shape depends on
``out_channels``), i.e. encoder and decoder, as in Models Genesis / SimMIM-style U-Net pretraining.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from medseg_core.inference import main_output
from medseg_core.models import build_model
from medseg_core.models.pretrained import output_dependent_keys
from pretrain.base import EncoderScope, PretrainModel, ReconstructionView
from pretrain.losses import denormalize_patches, masked_voxel_loss, patchify, unpatchify
from pretrain.masking import MaskGenerator, upsample_mask

#: total downsampling of registry families without a ``strides`` argument
_FIXED_DOWNSAMPLING = {"unetpp": 16, "vnet": 16, "unetr": 16, "swin_unetr": 32}


def total_downsampling(model_config: Mapping[str, Any]) -> tuple[int, ...]:
    """Per-axis product of a registry model's strides (the bottleneck cell, in voxels).

    ``unet`` / ``dynunet`` read their (possibly derived) strides from a ``meta``-device build; TransUNet
    uses its token stride; other families their fixed depth (U-Net++ / V-Net / UNETR 16, Swin-UNETR 32).
    """
    cfg = {k: v for k, v in dict(model_config).items() if k != "pretrained"}
    name = cfg.pop("name")
    dims = int(cfg["spatial_dims"])
    if name in _FIXED_DOWNSAMPLING:
        return (_FIXED_DOWNSAMPLING[name],) * dims
    with torch.device("meta"):
        net = build_model(name, **cfg)
    encoder = getattr(net, "encoder", None)
    if encoder is not None and hasattr(encoder, "stride"):  # TransUNet
        return (int(encoder.stride),) * dims
    strides = getattr(net, "strides", None)
    if strides is None:
        return (16,) * dims
    per_axis = [1] * dims
    for s in strides:
        s = (s,) * dims if isinstance(s, int) else tuple(s)
        per_axis = [a * int(b) for a, b in zip(per_axis, s, strict=True)]
    return tuple(per_axis)


def _block_tuple(block: int | Sequence[int] | None, model_config: Mapping[str, Any], dims: int) -> tuple[int, ...]:
    if block is None:
        return total_downsampling(model_config)
    out = (block,) * dims if isinstance(block, int) else tuple(block)
    if len(out) != dims or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in out):
        raise ValueError(f"block_size={block!r} needs {dims} positive integer(s) (voxels) or null (auto)")
    return out


class MaskedImageModel(PretrainModel):
    """Masked image modelling around a registry network.

    ``forward``: ``[B, C, *S] -> loss`` with ``S`` divisible by the block size.

    Args:
        target_config: registry kwargs of the segmentation model (``name``, ``spatial_dims``,
            ``in_channels``, ``out_channels``, ...); the pretraining network is the same model with
            ``out_channels = in_channels``.
        mask_ratio: fraction of blocks masked (60-75 % is typical).
        block_size: block edge in voxels (int or per axis); ``None``: the network's total downsampling.
        norm_pix: per-block normalised targets.
        seed: seed of the mask RNG.

    Raises:
        ValueError: bad ratio, block size or model config.
    """

    method = "mim"

    def __init__(self, target_config: Mapping[str, Any], *, mask_ratio: float = 0.6,
                 block_size: int | Sequence[int] | None = None, norm_pix: bool = False, seed: int = 0) -> None:
        super().__init__(target_config, MaskGenerator(mask_ratio, 1, seed), norm_pix)
        self.block = _block_tuple(block_size, self.target_config, self.spatial_dims)
        net_cfg = {k: v for k, v in self.target_config.items() if k != "pretrained"}
        net_cfg["out_channels"] = self.in_channels  # the reconstruction head
        name = net_cfg.pop("name")
        self.net = build_model(name, **net_cfg)
        self._head_keys = tuple(output_dependent_keys(self.target_config))

    @property
    def input_multiple(self) -> tuple[int, ...]:  # noqa: D102
        return self.block

    def _masked_pass(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        self.check_input(x, self.block)
        grid = [s // b for s, b in zip(x.shape[2:], self.block, strict=True)]
        mask = self.mask_generator(x.shape[0], grid, device=x.device)  # [B, *grid] block mask
        voxels = upsample_mask(mask, self.block).to(x.dtype)  # [B, 1, *S]
        masked = x * (1 - voxels)
        out = main_output(self.net(masked))
        if out.ndim == x.ndim + 1:  # DynUNet's training-mode deep-supervision stack [B, heads, C, *S]
            out = out[:, 0]
        return out.float(), mask, voxels, masked

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out, mask, _, _ = self._masked_pass(x)
        return masked_voxel_loss(out, x.float(), mask, self.block, norm_pix=self.norm_pix)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> ReconstructionView:  # noqa: D102
        out, mask, voxels, masked = self._masked_pass(x)
        loss = masked_voxel_loss(out, x.float(), mask, self.block, norm_pix=self.norm_pix)
        recon = out
        if self.norm_pix:
            grid = [s // b for s, b in zip(x.shape[2:], self.block, strict=True)]
            patches = denormalize_patches(patchify(out, self.block), patchify(x.float(), self.block), x.shape[1])
            recon = unpatchify(patches, self.block, grid, x.shape[1])
        return ReconstructionView(x, masked, recon, voxels, float(loss))

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:  # noqa: D102
        head = set(self._head_keys)
        return {k: v for k, v in self.net.state_dict().items() if k not in head}

    @property
    def encoder_scope(self) -> EncoderScope:  # noqa: D102
        return EncoderScope(("",), self._head_keys)

    def extra_repr(self) -> str:
        return (f"block={self.block}, ratio={self.mask_generator.ratio}, norm_pix={self.norm_pix}, "
                f"masked voxels per block={math.prod(self.block)}")
