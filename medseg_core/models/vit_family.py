"""Transformer U-Nets from MONAI: UNETR and Swin-UNETR (both need MONAI's optional ``einops``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import UNETR, SwinUNETR

from medseg_core.models.layers import (
    build_with_norm,
    disable_inplace,
    resolve_norm,
    strip_unused_cross_attention,
)
from medseg_core.models.registry import register_model

UNETR_PATCH = 16  # fixed in MONAI's UNETR


def _size_tuple(
    model: str, img_size: int | Sequence[int], spatial_dims: int, multiple: int
) -> tuple[int, ...]:
    size = (img_size,) * spatial_dims if isinstance(img_size, int) else tuple(img_size)
    if len(size) != spatial_dims or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"model {model!r}: img_size={img_size!r} needs {spatial_dims} positive integers")
    if any(s % multiple for s in size):
        raise ValueError(f"model {model!r}: img_size={size} must be divisible by {multiple}")
    return size


@register_model(
    "unetr",
    spatial_dims=(2, 3),
    tiny=lambda d: {"img_size": 32, "feature_size": 4, "hidden_size": 16, "mlp_dim": 32, "num_heads": 2},
    requires=("einops",),
    fixed_input_size=True,  # MONAI's ViT position embeddings do not interpolate
)
def unetr(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str | None = None,
    dp_compatible: bool = False,
    img_size: int | Sequence[int] = 96,
    feature_size: int = 16,
    hidden_size: int = 768,
    mlp_dim: int = 3072,
    num_heads: int = 12,
    proj_type: str = "conv",
    res_block: bool = True,
    dropout_rate: float = 0.0,
    qkv_bias: bool = False,
) -> torch.nn.Module:
    """UNETR (Hatamizadeh et al. 2022) via MONAI ``UNETR``: 16^d patches, ViT encoder, CNN decoder.

    Inputs must have exactly ``img_size`` (MONAI's position embeddings do not interpolate). The
    unused cross-attention norms MONAI creates are stripped. Default norm: instance.

    Args:
        img_size: input size, divisible by 16.
        feature_size: decoder base width.
        hidden_size, mlp_dim, num_heads: ViT size (``hidden_size % num_heads == 0``).
        proj_type: ``"conv"`` or ``"perceptron"`` patch embedding.
        res_block: residual decoder blocks.
        dropout_rate: ViT dropout.
        qkv_bias: bias in the attention projections.
    """
    size = _size_tuple("unetr", img_size, spatial_dims, UNETR_PATCH)
    if hidden_size % num_heads:
        raise ValueError(
            f"model 'unetr': hidden_size={hidden_size} must be divisible by num_heads={num_heads}"
        )
    norm = resolve_norm(norm, default="instance", dp_compatible=dp_compatible, model="unetr")
    model = build_with_norm(
        lambda norm_spec: UNETR(
            in_channels=in_channels,
            out_channels=out_channels,
            img_size=size,
            feature_size=feature_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_heads=num_heads,
            proj_type=proj_type,
            norm_name=norm_spec,
            res_block=res_block,
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
            qkv_bias=qkv_bias,
        ),
        norm,
        spatial_dims,
    )
    strip_unused_cross_attention(model)
    if dp_compatible:
        disable_inplace(model)
    return model


SWIN_DP_REASON = (
    "shifted-window attention folds the windows of every sample into the batch dimension "
    "([B * windows, tokens, C]) and keeps its relative position bias next to a buffer and an attention "
    "mask argument, so Opacus cannot attribute gradients to individual samples"
)


@register_model(
    "swin_unetr",
    spatial_dims=(2, 3),
    # GroupNorm: at 32^3 the bottleneck is 1 voxel, where InstanceNorm cannot train.
    tiny=lambda d: {
        "feature_size": 12,
        "depths": (1, 1, 1, 1),
        "num_heads": (1, 1, 1, 1),
        "window_size": 4,
        "norm": "group",
    },
    dp_unsupported=SWIN_DP_REASON,
    requires=("einops",),
)
def swin_unetr(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str | None = None,
    dp_compatible: bool = False,
    feature_size: int = 24,
    depths: Sequence[int] = (2, 2, 2, 2),
    num_heads: Sequence[int] = (3, 6, 12, 24),
    window_size: int = 7,
    patch_size: int = 2,
    dropout_rate: float = 0.0,
    attn_dropout_rate: float = 0.0,
    dropout_path_rate: float = 0.0,
    use_v2: bool = False,
    use_checkpoint: bool = False,
) -> torch.nn.Module:
    """Swin-UNETR (Hatamizadeh et al. 2022) via MONAI ``SwinUNETR`` (MONAI >= 1.5 signature: no
    ``img_size``; inputs must be divisible by ``patch_size * 2**4`` = 32). Default norm: instance
    (which needs inputs >= 64 per axis in training: the bottleneck is ``1/32`` of the input).
    Not DP-compatible (see ``SWIN_DP_REASON``).

    Args:
        feature_size: embedding width, divisible by 12.
        depths, num_heads: Swin blocks and heads per stage (4 stages).
        window_size: attention window edge.
        patch_size: patch embedding edge.
        dropout_rate, attn_dropout_rate, dropout_path_rate: regularisation.
        use_v2: Swin-UNETR-v2 residual conv blocks per stage.
        use_checkpoint: gradient checkpointing (saves memory).
    """
    if dp_compatible:
        raise ValueError(f"model 'swin_unetr' cannot be made DP-compatible: {SWIN_DP_REASON}")
    if feature_size % 12:
        raise ValueError(f"model 'swin_unetr': feature_size={feature_size} must be divisible by 12")
    if len(depths) != 4 or len(num_heads) != 4:
        raise ValueError(f"model 'swin_unetr': depths={depths} and num_heads={num_heads} need 4 stages each")
    norm = resolve_norm(norm, default="instance", dp_compatible=dp_compatible, model="swin_unetr")
    model = build_with_norm(
        lambda norm_spec: SwinUNETR(
            in_channels=in_channels,
            out_channels=out_channels,
            patch_size=patch_size,
            depths=depths,
            num_heads=num_heads,
            window_size=window_size,
            feature_size=feature_size,
            norm_name=norm_spec,
            drop_rate=dropout_rate,
            attn_drop_rate=attn_dropout_rate,
            dropout_path_rate=dropout_path_rate,
            use_checkpoint=use_checkpoint,
            spatial_dims=spatial_dims,
            use_v2=use_v2,
        ),
        norm,
        spatial_dims,
    )
    return model
