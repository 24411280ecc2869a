"""Normalisation choices and small module surgery shared by every model family.

One ``norm`` vocabulary for all models:

- ``"instance"``: InstanceNorm with a learned affine and *no* running statistics (DP-compatible).
- ``"group"``: GroupNorm; the group count is the largest divisor of the channel count that is
  ``<= max_groups`` (so it always divides, even for narrow CPU configs).
- ``"batch"``: BatchNorm (running statistics mix samples: not DP-compatible).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from monai.networks.blocks.dynunet_block import UnetResBlock
from monai.networks.blocks.transformerblock import TransformerBlock
from torch.nn.modules.batchnorm import _BatchNorm

NORMS = ("instance", "group", "batch")
DP_NORMS = ("instance", "group")
MAX_NORM_GROUPS = 8  # default cap for the U-Net families (SegResNet / nnU-Net-style 3D practice)


def check_norm(norm: str | None, *, model: str) -> None:
    """Raise ``ValueError`` unless ``norm`` is ``None`` or one of :data:`NORMS`."""
    if norm is not None and norm not in NORMS:
        raise ValueError(f"model {model!r}: norm={norm!r} is not one of {list(NORMS)} (or null)")


def resolve_norm(norm: str | None, *, default: str, dp_compatible: bool, model: str) -> str:
    """The normalisation a model is built with.

    Args:
        norm: the requested choice, or ``None`` for the family's reference default.
        default: the family's reference default (e.g. ``"batch"`` for TransUNet and V-Net).
        dp_compatible: whether the model must work with DP-SGD; a ``None`` norm then falls back to
            ``"group"`` when the reference default is BatchNorm.
        model: registry name, for error messages.

    Raises:
        ValueError: ``norm`` is unknown, or ``"batch"`` was asked for together with ``dp_compatible``.
    """
    check_norm(norm, model=model)
    if norm is None:
        norm = "group" if (dp_compatible and default == "batch") else default
    if dp_compatible and norm not in DP_NORMS:
        raise ValueError(
            f"model {model!r}: norm={norm!r} is not DP-compatible (BatchNorm statistics mix the samples "
            f"of a batch, so per-sample gradients are undefined); use one of {list(DP_NORMS)}"
        )
    return norm


def group_count(channels: int, max_groups: int = MAX_NORM_GROUPS) -> int:
    """Largest divisor of ``channels`` that is ``<= max_groups`` (at least 1)."""
    if channels < 1 or max_groups < 1:
        raise ValueError(f"channels={channels} and max_groups={max_groups} must be >= 1")
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


def build_with_norm(
    factory: Callable[[tuple[str, dict]], nn.Module], norm: str, spatial_dims: int
) -> nn.Module:
    """Build a MONAI network with one of our ``norm`` choices.

    Args:
        factory: ``monai_norm_spec -> network``.
        norm: ``"instance"`` (InstanceNorm with affine, no running statistics), ``"group"`` or ``"batch"``.
        spatial_dims: 2 or 3.

    MONAI networks take a single GroupNorm group count for the whole network, which must divide
    every normalised channel count (including ``out_channels`` in some blocks); ``"group"`` is
    therefore built with BatchNorm and each layer swapped for a GroupNorm whose group count divides
    its own channel count (:func:`replace_batchnorm`).
    """
    if norm == "instance":
        return factory(("instance", {"affine": True}))
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not one of {list(NORMS)}")
    model = factory(("batch", {}))
    replace_batchnorm(model, norm, spatial_dims)
    return model


def norm_layer(norm: str, spatial_dims: int, channels: int, max_groups: int = MAX_NORM_GROUPS) -> nn.Module:
    """One normalisation layer for feature maps ``[B, channels, *spatial]``."""
    if norm == "instance":
        cls = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        return cls(channels, affine=True, track_running_stats=False)
    if norm == "group":
        return nn.GroupNorm(group_count(channels, max_groups), channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels) if spatial_dims == 2 else nn.BatchNorm3d(channels)
    raise ValueError(f"norm={norm!r} is not one of {list(NORMS)}")


def replace_batchnorm(
    module: nn.Module, norm: str, spatial_dims: int, max_groups: int = MAX_NORM_GROUPS
) -> int:
    """Swap every BatchNorm in ``module`` (in place) for the ``norm`` choice, keeping channel counts.

    Written here because neither torch nor MONAI swaps norm layers by type (Opacus'
    ``ModuleValidator.fix`` does, but ``medseg_core`` must not import Opacus). Used for networks
    such as MONAI's ``VNet`` that hard-code BatchNorm.

    Returns:
        How many layers were replaced (0 when ``norm == "batch"``).
    """
    if norm == "batch":
        return 0
    replaced = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm):
                setattr(parent, child_name, norm_layer(norm, spatial_dims, child.num_features, max_groups))
                replaced += 1
    return replaced


class OutOfPlaceUnetResBlock(UnetResBlock):
    """MONAI ``UnetResBlock`` adding its residual out of place (same parameters and state-dict keys).

    MONAI's block does ``out += residual`` on the output of a normalisation layer, which breaks the
    full backward hooks of DP-SGD per-sample gradients.
    """

    def forward(self, inp: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = self.lrelu(self.norm1(self.conv1(inp)))
        out = self.norm2(self.conv2(out))
        residual = inp
        if hasattr(self, "conv3"):
            residual = self.conv3(residual)
        if hasattr(self, "norm3"):
            residual = self.norm3(residual)
        return self.lrelu(out + residual)


def disable_inplace(module: nn.Module) -> int:
    """Remove in-place operations that DP-SGD per-sample gradient hooks cannot handle.

    Sets ``inplace=False`` on every activation/dropout layer and turns MONAI ``UnetResBlock`` s into
    :class:`OutOfPlaceUnetResBlock` (class swap; parameters untouched). In-place ops on a hooked
    layer's output raise "Output 0 of BackwardHookFunction is a view and is being modified inplace".

    Returns:
        How many layers were changed.
    """
    changed = 0
    for m in module.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
            changed += 1
        if type(m) is UnetResBlock:
            m.__class__ = OutOfPlaceUnetResBlock
            changed += 1
    return changed


def strip_unused_cross_attention(module: nn.Module) -> int:
    """Remove the cross-attention LayerNorm MONAI's ``TransformerBlock`` creates even when unused.

    MONAI 1.6 builds ``norm_cross_attn`` unconditionally; without cross-attention it never takes part
    in the forward pass, so it would be an unused parameter (no gradient, wasted federated traffic,
    and a hole in DP accounting). Replaced by ``nn.Identity`` (its state-dict keys disappear).

    Returns:
        How many blocks were stripped.
    """
    stripped = 0
    for m in module.modules():
        if isinstance(m, TransformerBlock) and not m.with_cross_attention:
            if not isinstance(m.norm_cross_attn, nn.Identity):
                m.norm_cross_attn = nn.Identity()
                stripped += 1
    return stripped
