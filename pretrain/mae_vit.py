"""MAE for plain-ViT encoders (UNETR, TransUNet with a pure ViT-B/16) through MONAI's ``MaskedAutoEncoderViT``.

MONAI's MAE returns the predicted pixels of every patch and the mask, but no loss, and masks single
tokens with the global RNG. :class:`SeededMaskedAutoEncoderViT` only replaces the masking (our seeded
block masks, same number of visible tokens in every sample); the loss is :func:`pretrain.losses.masked_patch_loss`.

Key mapping (tested by comparing encoder outputs): MONAI MAE -> segmentation model ::

    patch_embedding.patch_embeddings.*   -> vit.patch_embedding.patch_embeddings.*    (UNETR)
                                         -> encoder.patch_embed.*                     (TransUNet ViT)
    patch_embedding.position_embeddings  -> vit.patch_embedding.position_embeddings | encoder.pos_embed.weight
    blocks.{i}.*   (i < L)               -> vit.blocks.{i}.*  | encoder.blocks.{i}.*
    blocks.{L}.*   (the final LayerNorm) -> vit.norm.*        | encoder.norm.*

``cls_token``, ``mask_tokens`` and the ``decoder_*`` weights are not transferred.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.nets import MaskedAutoEncoderViT

from medseg_core.models.layers import strip_unused_cross_attention
from medseg_core.models.registry import get_model_spec
from pretrain.base import EncoderScope, PretrainModel, ReconstructionView
from pretrain.losses import denormalize_patches, masked_patch_loss, patchify, unpatchify
from pretrain.mae_transunet import gather_tokens, visible_index
from pretrain.masking import MaskGenerator, upsample_mask

UNETR_LAYERS = 12  # fixed inside MONAI's UNETR
#: target model -> (prefix, patch-embedding key, position-embedding key)
TARGETS = {
    "unetr": ("vit.", "vit.patch_embedding.patch_embeddings", "vit.patch_embedding.position_embeddings"),
    "transunet_vit_b16": ("encoder.", "encoder.patch_embed", "encoder.pos_embed.weight"),
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def mae_to_encoder_state(mae_state: Mapping[str, torch.Tensor], target: str, num_layers: int) -> dict[str, torch.Tensor]:
    """Map a MONAI ``MaskedAutoEncoderViT`` state dict onto the encoder keys of a segmentation model.

    Args:
        mae_state: the MAE's ``state_dict()`` (its own keys, no wrapper prefix).
        target: ``"unetr"`` or ``"transunet_vit_b16"``.
        num_layers: transformer blocks of the encoder (``blocks.{num_layers}`` is its final LayerNorm).

    Raises:
        ValueError: unknown target, or a state dict that is not a MAE's of that depth.
    """
    if target not in TARGETS:
        raise ValueError(f"no MAE key mapping for model {target!r}; supported: {sorted(TARGETS)}")
    prefix, patch_key, pos_key = TARGETS[target]
    out: dict[str, torch.Tensor] = {}
    for key, value in mae_state.items():
        if key.startswith("patch_embedding.patch_embeddings."):
            out[patch_key + key[len("patch_embedding.patch_embeddings"):]] = value
        elif key == "patch_embedding.position_embeddings":
            out[pos_key] = value
        elif m := _BLOCK.match(key):
            i, rest = int(m.group(1)), m.group(2)
            if i < num_layers:
                out[f"{prefix}blocks.{i}.{rest}"] = value
            elif i == num_layers:
                out[f"{prefix}norm.{rest}"] = value
            else:
                raise ValueError(f"MAE key {key!r} beyond the {num_layers} encoder blocks and final norm")
    if f"{prefix}norm.weight" not in out or pos_key not in out:
        raise ValueError(f"not a {num_layers}-block MAE state dict (no final norm or position embedding)")
    return out


class SeededMaskedAutoEncoderViT(MaskedAutoEncoderViT):
    """MONAI's MAE with our seeded block masks (and without the unused cross-attention norms).

    Args:
        mask_generator: :class:`MaskGenerator` on the token grid.
        **kwargs: ``MaskedAutoEncoderViT`` arguments (``masking_ratio`` is taken from the generator).
    """

    def __init__(self, mask_generator: MaskGenerator, **kwargs: Any) -> None:
        super().__init__(masking_ratio=mask_generator.ratio, **kwargs)
        strip_unused_cross_attention(self)
        self.mask_generator = mask_generator
        self.grid = tuple(s // p for s, p in zip(self.img_size, self.patch_size, strict=True))
        self.last_mask: torch.Tensor | None = None

    def _masking(self, x: torch.Tensor, masking_ratio: float | None = None):
        """``x [B, T, H]`` -> visible tokens ``[B, T_vis, H]``, their indices ``[B, T_vis]``, mask ``[B, T]``."""
        mask = self.mask_generator(x.shape[0], self.grid, device=x.device).flatten(1)  # [B, T], True = masked
        index = visible_index(mask)
        self.last_mask = mask
        return gather_tokens(x, index), index, mask.int()


def _vit_settings(target_config: Mapping[str, Any]) -> dict[str, Any]:
    """The ViT sizes of a target model config, registry defaults filled in."""
    cfg = {k: v for k, v in dict(target_config).items() if k != "pretrained"}
    name = cfg.pop("name")
    if name not in TARGETS:
        raise ValueError(f"mae_vit supports {sorted(TARGETS)}, got model {name!r} (use mae_transunet or mim)")
    bound = inspect.signature(get_model_spec(name).builder).bind(**cfg)
    bound.apply_defaults()
    a = bound.arguments
    dims = int(a["spatial_dims"])
    size = a["img_size"]
    size = (size,) * dims if isinstance(size, int) else tuple(int(s) for s in size)
    if name == "unetr":
        return {"name": name, "img_size": size, "patch_size": 16, "hidden_size": a["hidden_size"],
                "mlp_dim": a["mlp_dim"], "num_layers": UNETR_LAYERS, "num_heads": a["num_heads"],
                "proj_type": a["proj_type"], "qkv_bias": a["qkv_bias"], "dropout_rate": a["dropout_rate"],
                "stem_in_channels": a["in_channels"]}
    return {"name": name, "img_size": size, "patch_size": a["patch_size"], "hidden_size": a["hidden_size"],
            "mlp_dim": a["mlp_dim"], "num_layers": a["num_layers"], "num_heads": a["num_heads"],
            "proj_type": "conv", "qkv_bias": True, "dropout_rate": a["dropout_rate"],
            "stem_in_channels": a["stem_in_channels"] or a["in_channels"]}


class ViTMAE(PretrainModel):
    """MAE for UNETR / pure-ViT TransUNet via MONAI's ``MaskedAutoEncoderViT``.

    ``forward``: ``[B, C, *img_size] -> loss`` (MONAI's position embeddings do not interpolate, so the
    input must be exactly the model's ``img_size``).

    Args:
        target_config: registry kwargs of ``unetr`` or ``transunet_vit_b16`` (``name`` included).
        mask_ratio: fraction of token blocks masked (MAE: 0.75).
        block_size: mask block edge in tokens.
        norm_pix: per-patch normalised targets.
        decoder_hidden_size, decoder_num_layers, decoder_num_heads, decoder_mlp_dim: MONAI MAE decoder.
        pos_embed_type, decoder_pos_embed_type: ``"learnable"`` or ``"sincos"`` (sin-cos needs widths
            divisible by 4 in 2D, 6 in 3D).
        seed: seed of the mask RNG.

    Raises:
        ValueError: unsupported target model or bad sizes.
    """

    method = "mae_vit"

    def __init__(self, target_config: Mapping[str, Any], *, mask_ratio: float = 0.75, block_size: int = 1,
                 norm_pix: bool = True, decoder_hidden_size: int = 128, decoder_num_layers: int = 2,
                 decoder_num_heads: int = 4, decoder_mlp_dim: int = 256, pos_embed_type: str = "learnable",
                 decoder_pos_embed_type: str = "learnable", seed: int = 0) -> None:
        super().__init__(target_config, MaskGenerator(mask_ratio, block_size, seed), norm_pix)
        vit = _vit_settings(self.target_config)
        self.target_name = vit["name"]
        self.num_layers = int(vit["num_layers"])
        self.img_size = vit["img_size"]
        self.patch = int(vit["patch_size"])
        self.stem_in_channels = int(vit["stem_in_channels"])
        for key, value in (("pos_embed_type", pos_embed_type), ("decoder_pos_embed_type", decoder_pos_embed_type)):
            if value not in ("learnable", "sincos"):
                raise ValueError(f"mae_vit: {key}={value!r} must be 'learnable' or 'sincos'")
        if decoder_hidden_size % decoder_num_heads:
            raise ValueError(f"mae_vit: decoder_hidden_size={decoder_hidden_size} must be divisible by "
                             f"decoder_num_heads={decoder_num_heads}")
        try:
            self.mae = SeededMaskedAutoEncoderViT(
                self.mask_generator, in_channels=self.stem_in_channels, img_size=self.img_size,
                patch_size=self.patch, hidden_size=vit["hidden_size"], mlp_dim=vit["mlp_dim"],
                num_layers=self.num_layers, num_heads=vit["num_heads"], decoder_hidden_size=decoder_hidden_size,
                decoder_mlp_dim=decoder_mlp_dim, decoder_num_layers=decoder_num_layers,
                decoder_num_heads=decoder_num_heads, proj_type=vit["proj_type"], pos_embed_type=pos_embed_type,
                decoder_pos_embed_type=decoder_pos_embed_type, dropout_rate=vit["dropout_rate"],
                spatial_dims=self.spatial_dims, qkv_bias=vit["qkv_bias"],
            )
        except AssertionError as exc:  # MONAI asserts sin-cos widths
            raise ValueError(f"mae_vit: {exc}") from exc

    @property
    def input_multiple(self) -> tuple[int, ...]:  # noqa: D102
        return (self.patch,) * self.spatial_dims

    @property
    def fixed_input_size(self) -> tuple[int, ...] | None:  # noqa: D102
        return self.img_size

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, (self.patch,) * self.spatial_dims)
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"mae_vit: input {tuple(x.shape[2:])} must equal the model's img_size {self.img_size} "
                             "(MONAI's position embeddings are fixed); set model.img_size to the patch size")
        if self.stem_in_channels != self.in_channels:
            x = x.repeat(1, self.stem_in_channels // self.in_channels, *([1] * self.spatial_dims))
        return x.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self._tiled(x)
        pred, mask = self.mae(x)  # [B, T, patch^d * C], [B, T] (1 = masked)
        return masked_patch_loss(pred.float(), x, mask.bool(), self.patch, norm_pix=self.norm_pix)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> ReconstructionView:  # noqa: D102
        tiled = self._tiled(x)
        pred, mask = self.mae(tiled)
        pred = pred.float()
        loss = masked_patch_loss(pred, tiled, mask.bool(), self.patch, norm_pix=self.norm_pix)
        if self.norm_pix:
            pred = denormalize_patches(pred, patchify(tiled, self.patch), tiled.shape[1])
        grid = self.mae.grid
        recon = unpatchify(pred, self.patch, grid, tiled.shape[1])[:, : self.in_channels]
        voxels = upsample_mask(mask.bool().view(x.shape[0], *grid), self.patch)
        return ReconstructionView(x.float(), x.float() * (1 - voxels), recon, voxels, float(loss))

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:  # noqa: D102
        return mae_to_encoder_state(self.mae.state_dict(), self.target_name, self.num_layers)

    @property
    def encoder_scope(self) -> EncoderScope:  # noqa: D102
        return EncoderScope((TARGETS[self.target_name][0],))
