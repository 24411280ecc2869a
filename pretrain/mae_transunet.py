"""Masked autoencoder for TransUNet (hybrid R50-ViT or pure ViT, 2D or 3D). Ours: nothing upstream.

Data flow (``T`` tokens on the grid ``S / stride``, stride 16 for the hybrid)::

    x [B, C, *S] --mask blocks aligned with the token grid, set to 0--> x_masked
      --encoder.embed (ResNet stem + 1x1 patch embedding + position embedding)--> tokens [B, T, H]
      --keep the visible tokens only--> [B, T_vis, H] --encoder.transform (ViT + norm)--> latent
      --Linear(H, Hd), mask tokens at the masked positions, decoder position embedding--> [B, T, Hd]
      --a few narrow transformer blocks, LayerNorm, Linear(Hd, stride^d * C)--> pixels of every patch
    loss: MSE on the masked patches (optionally norm-pix targets)

The encoder is the segmentation model's own ``TransUNetEncoder`` (built from the same registry config),
so its weights transfer under identical keys (``encoder.*``). Masking the input before the CNN stem
keeps the hidden content out of the visible tokens (the stem's receptive field crosses token borders);
dropping the masked tokens makes the transformer, the costly part, see only ``1 - ratio`` of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from monai.networks.blocks.transformerblock import TransformerBlock

from medseg_core.models import build_model
from medseg_core.models.layers import strip_unused_cross_attention
from medseg_core.models.transunet import GridPositionEmbedding, TransUNet
from pretrain.base import EncoderScope, PretrainModel, ReconstructionView
from pretrain.losses import denormalize_patches, masked_patch_loss, patchify, unpatchify
from pretrain.masking import MaskGenerator, upsample_mask


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens [B, T, H]``, ``index [B, K]`` -> ``[B, K, H]``."""
    return torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def visible_index(mask: torch.Tensor) -> torch.Tensor:
    """Indices ``[B, T_vis]`` (ascending) of the visible tokens of a flat mask ``[B, T]`` (True = masked).

    Every row must hold the same number of visible tokens (:class:`MaskGenerator` guarantees it).
    """
    counts = (~mask).sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"every sample needs the same number of visible tokens, got {counts.tolist()}")
    order = mask.to(torch.int8).argsort(dim=1, stable=True)  # visible (0) first, in token order
    return order[:, : int(counts[0])]


class MAEDecoder(nn.Module):
    """Light MAE decoder: visible latents + mask tokens -> pixels of every patch.

    Args:
        grid: stored token grid (the position embedding interpolates to others).
        hidden_size: encoder width ``H``.
        decoder_hidden_size, decoder_num_layers, decoder_num_heads, decoder_mlp_dim: decoder size.
        patch_pixels: outputs per token (``prod(patch) * channels``).
    """

    def __init__(self, grid: tuple[int, ...], hidden_size: int, decoder_hidden_size: int, decoder_num_layers: int,
                 decoder_num_heads: int, decoder_mlp_dim: int, patch_pixels: int) -> None:
        super().__init__()
        for key, value in (("decoder_hidden_size", decoder_hidden_size), ("decoder_num_layers", decoder_num_layers),
                           ("decoder_num_heads", decoder_num_heads), ("decoder_mlp_dim", decoder_mlp_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MAE decoder: {key}={value!r} must be a positive integer")
        if decoder_hidden_size % decoder_num_heads:
            raise ValueError(f"MAE decoder: decoder_hidden_size={decoder_hidden_size} must be divisible by "
                             f"decoder_num_heads={decoder_num_heads}")
        self.embed = nn.Linear(hidden_size, decoder_hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_hidden_size))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.pos_embed = GridPositionEmbedding(grid, decoder_hidden_size)
        self.blocks = nn.ModuleList(
            TransformerBlock(decoder_hidden_size, decoder_mlp_dim, decoder_num_heads, 0.0, qkv_bias=True)
            for _ in range(decoder_num_layers)
        )
        strip_unused_cross_attention(self.blocks)
        self.norm = nn.LayerNorm(decoder_hidden_size, eps=1e-6)
        self.pred = nn.Linear(decoder_hidden_size, patch_pixels)

    def forward(self, latent: torch.Tensor, index: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """``latent [B, T_vis, H]`` at token positions ``index [B, T_vis]`` -> ``[B, T, patch_pixels]``."""
        x = self.embed(latent)  # [B, T_vis, Hd]
        b, _, width = x.shape
        n = 1
        for g in grid:
            n *= g
        full = self.mask_token.to(x.dtype).expand(b, n, width).clone()  # [B, T, Hd]
        full = full.scatter(1, index[..., None].expand(-1, -1, width), x)
        table = self.pos_embed.embedding_for(grid)  # [1, T, Hd]
        x = full + table
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))  # [B, T, patch_pixels]


class TransUNetMAE(PretrainModel):
    """MAE around the encoder of a registry TransUNet (``transunet_r50_vit_b16``, ``transunet3d``,
    ``transunet_vit_b16``).

    ``forward``: ``[B, C, *S] -> loss``, ``S`` divisible by the token stride.

    Args:
        target_config: registry kwargs of the TransUNet (``name`` included).
        mask_ratio: fraction of token blocks masked (MAE: 0.75).
        block_size: mask block edge in *tokens* (1: single tokens, as MAE).
        norm_pix: per-patch normalised targets.
        decoder_hidden_size, decoder_num_layers, decoder_num_heads, decoder_mlp_dim: the light decoder.
        seed: seed of the mask RNG.

    Raises:
        ValueError: the target is not a TransUNet, or bad sizes.
    """

    method = "mae_transunet"

    def __init__(self, target_config: Mapping[str, Any], *, mask_ratio: float = 0.75, block_size: int = 1,
                 norm_pix: bool = True, decoder_hidden_size: int = 128, decoder_num_layers: int = 2,
                 decoder_num_heads: int = 4, decoder_mlp_dim: int = 256, seed: int = 0) -> None:
        super().__init__(target_config, MaskGenerator(mask_ratio, block_size, seed), norm_pix)
        cfg = {k: v for k, v in self.target_config.items() if k != "pretrained"}
        name = cfg.pop("name")
        seg = build_model(name, **cfg)
        if not isinstance(seg, TransUNet):
            raise ValueError(f"mae_transunet needs a TransUNet model, got {name!r} ({type(seg).__name__})")
        self.encoder = seg.encoder  # the segmentation model's own encoder: identical keys
        self.stem_in_channels = seg.stem_in_channels
        self.stride = int(self.encoder.stride)
        patch_pixels = self.stride**self.spatial_dims * self.in_channels
        self.decoder = MAEDecoder(self.encoder.pos_embed.grid_size, int(self.encoder.pos_embed.weight.shape[-1]),
                                  decoder_hidden_size, decoder_num_layers, decoder_num_heads, decoder_mlp_dim,
                                  patch_pixels)

    @property
    def input_multiple(self) -> tuple[int, ...]:  # noqa: D102
        return (self.stride,) * self.spatial_dims

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...], torch.Tensor]:
        """Mask, embed, keep visible tokens, transform. Returns latent, flat mask, index, grid, masked input."""
        self.check_input(x, (self.stride,) * self.spatial_dims)
        grid = tuple(s // self.stride for s in x.shape[2:])
        mask = self.mask_generator(x.shape[0], grid, device=x.device)  # [B, *grid] token mask
        masked = x * (1 - upsample_mask(mask, self.stride).to(x.dtype))
        stem_input = masked
        if self.stem_in_channels != self.in_channels:
            stem_input = masked.repeat(1, self.stem_in_channels // self.in_channels, *([1] * self.spatial_dims))
        tokens, _skips, token_grid = self.encoder.embed(stem_input)  # [B, T, H]
        flat = mask.flatten(1)  # [B, T]
        index = visible_index(flat)  # [B, T_vis]
        latent = self.encoder.transform(gather_tokens(tokens, index))  # [B, T_vis, H]: visible tokens only
        return latent, flat, index, token_grid, masked

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        latent, flat, index, grid, _ = self._encode(x)
        pred = self.decoder(latent, index, grid).float()  # [B, T, stride^d * C]
        return masked_patch_loss(pred, x.float(), flat, self.stride, norm_pix=self.norm_pix)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> ReconstructionView:  # noqa: D102
        latent, flat, index, grid, masked = self._encode(x)
        pred = self.decoder(latent, index, grid).float()
        loss = masked_patch_loss(pred, x.float(), flat, self.stride, norm_pix=self.norm_pix)
        if self.norm_pix:
            pred = denormalize_patches(pred, patchify(x.float(), self.stride), x.shape[1])
        recon = unpatchify(pred, self.stride, grid, x.shape[1])
        voxels = upsample_mask(flat.view(x.shape[0], *grid), self.stride)
        return ReconstructionView(x, masked, recon, voxels, float(loss))

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:  # noqa: D102
        return {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}

    @property
    def encoder_scope(self) -> EncoderScope:  # noqa: D102
        return EncoderScope(("encoder.",))
