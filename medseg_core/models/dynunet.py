"""nnU-Net-style DynUNet (MONAI) with kernel sizes and strides derived from the plan."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.nets import DynUNet

from medseg_core.models.layers import build_with_norm, disable_inplace, resolve_norm
from medseg_core.models.registry import register_model


def dynunet_kernels_strides(
    spacing_mm: Sequence[float],
    patch_size: Sequence[int],
    *,
    min_feature_map_size: int = 4,
    max_num_pool: int | None = None,
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Convolution kernel sizes and strides per resolution level, following nnU-Net's planner.

    nnU-Net rules (Isensee et al. 2021, ``get_pool_and_conv_props``): an axis is downsampled (stride
    2) while its feature map stays ``>= 2 * min_feature_map_size`` and its current spacing is within
    a factor 2 of the finest spacing among the axes still eligible; a lone eligible axis also needs
    ``>= 3 * min_feature_map_size``. An axis gets 3-wide kernels once its spacing is within a factor 2
    of the finest spacing (1-wide before: no in-plane mixing across thick slices). The bottleneck
    always uses 3-wide kernels. Written here because MONAI has no planner (its DynUNet tutorial has
    a simpler variant without the feature-map limits).

    Args:
        spacing_mm: target voxel spacing of the plan, one value per spatial axis.
        patch_size: training patch size in voxels, same axes.
        min_feature_map_size: smallest feature-map edge at the bottleneck.
        max_num_pool: cap on downsamplings per axis (``None``: no cap).

    Returns:
        ``(kernel_sizes, strides)``: one tuple per level, ``strides[0]`` all ones; pass them as
        DynUNet's ``kernel_size`` / ``strides`` and ``strides[1:]`` as ``upsample_kernel_size``.

    Raises:
        ValueError: mismatched or non-positive inputs, or a patch size that the derived strides do not
            divide (the message gives the divisor per axis).
    """
    spacing = [float(s) for s in spacing_mm]
    size = [int(s) for s in patch_size]
    if len(spacing) != len(size) or len(size) not in (2, 3):
        raise ValueError(
            f"spacing_mm={tuple(spacing_mm)} and patch_size={tuple(patch_size)} need 2 or 3 axes each"
        )
    if any(s <= 0 for s in spacing) or any(s < 1 for s in size):
        raise ValueError(
            f"spacing_mm={tuple(spacing_mm)} and patch_size={tuple(patch_size)} must be positive"
        )
    if min_feature_map_size < 1:
        raise ValueError(f"min_feature_map_size={min_feature_map_size} must be >= 1")
    dims = range(len(size))
    num_pool = [0] * len(size)
    kernel = [1] * len(size)
    kernels: list[tuple[int, ...]] = []
    strides: list[tuple[int, ...]] = [(1,) * len(size)]
    while True:
        axes = [a for a in dims if size[a] >= 2 * min_feature_map_size]
        if not axes:
            break
        finest = min(spacing[a] for a in axes)
        axes = [a for a in axes if spacing[a] / finest < 2]
        if max_num_pool is not None:
            axes = [a for a in axes if num_pool[a] < max_num_pool]
        if not axes or (len(axes) == 1 and size[axes[0]] < 3 * min_feature_map_size):
            break
        finest_all = min(spacing)
        kernel = [3 if kernel[a] == 3 or spacing[a] / finest_all < 2 else 1 for a in dims]
        kernels.append(tuple(kernel))
        strides.append(tuple(2 if a in axes else 1 for a in dims))
        for a in axes:
            num_pool[a] += 1
            spacing[a] *= 2
            size[a] = math.ceil(size[a] / 2)
    kernels.append((3,) * len(size))
    divisor = tuple(2**n for n in num_pool)
    if any(p % d for p, d in zip(patch_size, divisor, strict=True)):
        raise ValueError(
            f"patch_size={tuple(patch_size)} must be divisible by {divisor} (per axis) for these strides"
        )
    return kernels, strides


class DedupDynUNet(DynUNet):
    """MONAI ``DynUNet`` with every block registered once, following the registry's output convention.

    MONAI registers the input block, down/up-samples, bottleneck and deep-supervision heads both as
    attributes and again inside the recursive ``skip_layers`` (which alone runs the forward). Under
    two names a module gets DP hooks twice (silently doubled per-sample gradients) and is sent twice
    in federated updates, so the duplicate attributes are removed: state-dict keys are
    ``skip_layers.*`` and ``output_block.*`` only.

    Forward: ``[B, in_channels, *spatial] -> [B, out_channels, *spatial]`` logits; in training mode
    with deep supervision a list ``[main, aux_1, ..., aux_n]`` where ``aux_k`` comes from the
    decoder level ``k`` steps below the output, at that level's (lower) resolution.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name in ("input_block", "downsamples", "bottleneck", "upsamples", "deep_supervision_heads"):
            if name in self._modules:
                delattr(self, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:  # noqa: D102
        out = self.output_block(self.skip_layers(x))  # fills self.heads when deep supervision is on
        if not self.deep_supervision:
            return out
        aux = list(self.heads)
        # Empty the list shared with the skip layers so the model holds no graph between calls
        # (otherwise copy.deepcopy(model) fails and activations stay alive).
        self.heads[:] = [torch.zeros(1)] * len(self.heads)
        return [out, *aux] if self.training else out


def _levels(value: Sequence, spatial_dims: int) -> list:
    return [tuple(v) if isinstance(v, Sequence) else (v,) * spatial_dims for v in value]


@register_model(
    "dynunet",
    spatial_dims=(2, 3),
    tiny=lambda d: {"filters": (4, 8, 16, 32), "kernel_size": (3, 3, 3, 3), "strides": (1, 2, 2, 2)},
)
def dynunet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str | None = None,
    dp_compatible: bool = False,
    kernel_size: Sequence[int | Sequence[int]] | None = None,
    strides: Sequence[int | Sequence[int]] | None = None,
    upsample_kernel_size: Sequence[int | Sequence[int]] | None = None,
    spacing_mm: Sequence[float] | None = None,
    patch_size: Sequence[int] | None = None,
    filters: Sequence[int] | None = None,
    dropout: float = 0.0,
    deep_supervision: bool = False,
    deep_supr_num: int = 1,
    res_block: bool = False,
) -> torch.nn.Module:
    """nnU-Net-style U-Net via MONAI ``DynUNet`` (see :class:`DedupDynUNet`). Default norm: instance.

    Give either ``kernel_size`` + ``strides`` (per level, an int or one value per axis), or the plan's
    ``spacing_mm`` + ``patch_size`` to derive them with :func:`dynunet_kernels_strides`; with neither,
    four isotropic levels ``strides=(1, 2, 2, 2)`` are used.

    Args:
        upsample_kernel_size: transposed-conv kernels (default ``strides[1:]``).
        filters: channels per level (default MONAI's 32, 64, ... capped at 320 (3D) / 512 (2D)).
        dropout: dropout probability.
        deep_supervision: return auxiliary outputs in training mode.
        deep_supr_num: number of auxiliary outputs (``< number of levels - 1``).
        res_block: residual conv blocks.
    """
    if (spacing_mm is None) != (patch_size is None):
        raise ValueError(
            f"model 'dynunet': give both spacing_mm and patch_size (got {spacing_mm=}, {patch_size=})"
        )
    if spacing_mm is not None:
        if kernel_size is not None or strides is not None:
            raise ValueError(
                "model 'dynunet': give either kernel_size/strides or spacing_mm/patch_size, not both"
            )
        if len(spacing_mm) != spatial_dims or len(patch_size) != spatial_dims:
            raise ValueError(
                f"model 'dynunet': spacing_mm={spacing_mm} and patch_size={patch_size} need {spatial_dims} axes"
            )
        kernel_size, strides = dynunet_kernels_strides(spacing_mm, patch_size)
    kernel_size = _levels(kernel_size if kernel_size is not None else (3, 3, 3, 3), spatial_dims)
    strides = _levels(strides if strides is not None else (1, 2, 2, 2), spatial_dims)
    if len(kernel_size) != len(strides) or len(strides) < 3:
        raise ValueError(
            f"model 'dynunet': kernel_size ({len(kernel_size)} levels) and strides ({len(strides)} levels) "
            "need the same number of levels, at least 3"
        )
    upsample_kernel_size = _levels(upsample_kernel_size or strides[1:], spatial_dims)
    if filters is not None and len(filters) < len(strides):
        raise ValueError(f"model 'dynunet': filters={filters} needs one entry per level ({len(strides)})")
    if deep_supervision and not 1 <= deep_supr_num < len(strides) - 1:
        raise ValueError(f"model 'dynunet': deep_supr_num={deep_supr_num} must be in [1, {len(strides) - 2}]")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model 'dynunet': dropout={dropout!r} must be in [0, 1)")
    norm = resolve_norm(norm, default="instance", dp_compatible=dp_compatible, model="dynunet")
    model = build_with_norm(
        lambda norm_spec: DedupDynUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
            strides=strides,
            upsample_kernel_size=upsample_kernel_size,
            filters=filters,
            dropout=dropout or None,
            norm_name=norm_spec,
            deep_supervision=deep_supervision,
            deep_supr_num=deep_supr_num,
            res_block=res_block,
        ),
        norm,
        spatial_dims,
    )
    if dp_compatible:
        disable_inplace(model)
    return model
