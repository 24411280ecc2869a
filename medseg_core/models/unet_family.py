"""U-Net, U-Net++ and V-Net, all built from MONAI with the registry's vocabulary."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.nets import UNet, VNet
from monai.networks.nets.basic_unetplusplus import BasicUNetPlusPlus

from medseg_core.models.layers import build_with_norm, disable_inplace, replace_batchnorm, resolve_norm
from medseg_core.models.registry import register_model


def _check_positive_ints(model: str, key: str, values: Sequence[int], min_len: int = 1) -> None:
    if len(values) < min_len or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"model {model!r}: {key}={values!r} must be >= {min_len} positive integers")


def _check_dropout(model: str, dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model {model!r}: dropout={dropout!r} must be in [0, 1)")


@register_model(
    "unet",
    spatial_dims=(2, 3),
    tiny=lambda d: {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1},
)
def unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str | None = None,
    dp_compatible: bool = False,
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[int] = (2, 2, 2, 2),
    kernel_size: int = 3,
    up_kernel_size: int = 3,
    num_res_units: int = 2,
    act: str = "prelu",
    dropout: float = 0.0,
) -> torch.nn.Module:
    """MONAI ``UNet`` (residual units; Kerfoot et al. 2018). Default norm: instance.

    Args:
        channels: feature channels per level, e.g. ``(8, 16, 32, 64)``.
        strides: downsampling stride between levels (``len(channels) - 1`` entries).
        num_res_units: residual units per level (0: plain conv blocks).
        act: MONAI activation name.
        dropout: dropout probability.
    """
    _check_positive_ints("unet", "channels", channels, min_len=2)
    if len(strides) != len(channels) - 1:
        raise ValueError(
            f"model 'unet': strides={strides!r} needs len(channels) - 1 = {len(channels) - 1} entries"
        )
    _check_dropout("unet", dropout)
    norm = resolve_norm(norm, default="instance", dp_compatible=dp_compatible, model="unet")
    model = build_with_norm(
        lambda norm_spec: UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            strides=strides,
            kernel_size=kernel_size,
            up_kernel_size=up_kernel_size,
            num_res_units=num_res_units,
            act=act,
            norm=norm_spec,
            dropout=dropout,
        ),
        norm,
        spatial_dims,
    )
    if dp_compatible:
        disable_inplace(model)
    return model


class UNetPlusPlus(BasicUNetPlusPlus):
    """MONAI ``BasicUNetPlusPlus`` following the registry's output convention.

    MONAI's version always returns a list and always builds the three auxiliary heads
    (``final_conv_0_1..3``), which are unused parameters without deep supervision. Here they are
    only built with ``deep_supervision=True``; the forward returns the ``x_0_4`` logits
    ``[B, out_channels, *spatial]``, or in training mode with deep supervision the list
    ``[x_0_4, x_0_3, x_0_2, x_0_1]`` logits (all full resolution). State-dict keys are MONAI's
    (without the ``final_conv_0_1..3`` keys when deep supervision is off).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not self.deep_supervision:
            del self.final_conv_0_1, self.final_conv_0_2, self.final_conv_0_3

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:  # noqa: D102
        # Same data flow as MONAI's BasicUNetPlusPlus.forward (nested skip pathways x_i_j).
        x_0_0 = self.conv_0_0(x)
        x_1_0 = self.conv_1_0(x_0_0)
        x_0_1 = self.upcat_0_1(x_1_0, x_0_0)
        x_2_0 = self.conv_2_0(x_1_0)
        x_1_1 = self.upcat_1_1(x_2_0, x_1_0)
        x_0_2 = self.upcat_0_2(x_1_1, torch.cat([x_0_0, x_0_1], dim=1))
        x_3_0 = self.conv_3_0(x_2_0)
        x_2_1 = self.upcat_2_1(x_3_0, x_2_0)
        x_1_2 = self.upcat_1_2(x_2_1, torch.cat([x_1_0, x_1_1], dim=1))
        x_0_3 = self.upcat_0_3(x_1_2, torch.cat([x_0_0, x_0_1, x_0_2], dim=1))
        x_4_0 = self.conv_4_0(x_3_0)
        x_3_1 = self.upcat_3_1(x_4_0, x_3_0)
        x_2_2 = self.upcat_2_2(x_3_1, torch.cat([x_2_0, x_2_1], dim=1))
        x_1_3 = self.upcat_1_3(x_2_2, torch.cat([x_1_0, x_1_1, x_1_2], dim=1))
        x_0_4 = self.upcat_0_4(x_1_3, torch.cat([x_0_0, x_0_1, x_0_2, x_0_3], dim=1))
        main = self.final_conv_0_4(x_0_4)
        if self.deep_supervision and self.training:
            return [main, self.final_conv_0_3(x_0_3), self.final_conv_0_2(x_0_2), self.final_conv_0_1(x_0_1)]
        return main


@register_model("unetpp", spatial_dims=(2, 3), tiny=lambda d: {"features": (4, 4, 8, 8, 16, 4)})
def unetpp(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str | None = None,
    dp_compatible: bool = False,
    features: Sequence[int] = (32, 32, 64, 128, 256, 32),
    deep_supervision: bool = False,
    act: str | tuple = ("leakyrelu", {"negative_slope": 0.1, "inplace": True}),
    dropout: float = 0.0,
    upsample: str = "deconv",
) -> torch.nn.Module:
    """U-Net++ (Zhou et al. 2018) via MONAI ``BasicUNetPlusPlus``. Default norm: instance.

    Args:
        features: six channel counts (five encoder levels + the last decoder block).
        deep_supervision: return auxiliary outputs in training mode (see :class:`UNetPlusPlus`).
        act: MONAI activation spec.
        dropout: dropout probability.
        upsample: ``"deconv"``, ``"pixelshuffle"`` or ``"nontrainable"``.
    """
    _check_positive_ints("unetpp", "features", features, min_len=6)
    if len(features) != 6:
        raise ValueError(f"model 'unetpp': features={features!r} needs exactly 6 entries")
    _check_dropout("unetpp", dropout)
    norm = resolve_norm(norm, default="instance", dp_compatible=dp_compatible, model="unetpp")
    model = build_with_norm(
        lambda norm_spec: UNetPlusPlus(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            features=features,
            deep_supervision=deep_supervision,
            act=act,
            norm=norm_spec,
            dropout=dropout,
            upsample=upsample,
        ),
        norm,
        spatial_dims,
    )
    if dp_compatible:
        disable_inplace(model)
    return model


@register_model("vnet", spatial_dims=(2, 3), tiny=lambda d: {})
def vnet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str | None = None,
    dp_compatible: bool = False,
    act: str = "elu",
    dropout: float = 0.0,
    bias: bool = False,
) -> torch.nn.Module:
    """V-Net (Milletari et al. 2016) via MONAI ``VNet``; fixed widths 16..256 (no width argument).

    MONAI hard-codes BatchNorm; the reference default is kept (``norm=None`` -> batch, or group when
    ``dp_compatible``) and other choices swap every BatchNorm layer.

    Args:
        in_channels: must divide 16 (the input transition tiles the input to 16 channels).
        act: MONAI activation name.
        dropout: probability of every dropout layer (MONAI's default is 0.5).
        bias: conv biases.
    """
    if 16 % in_channels:
        raise ValueError(f"model 'vnet': in_channels={in_channels} must divide 16")
    _check_dropout("vnet", dropout)
    norm = resolve_norm(norm, default="batch", dp_compatible=dp_compatible, model="vnet")
    model = VNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        act=(act, {"inplace": not dp_compatible}),
        dropout_prob_down=dropout,
        dropout_prob_up=(dropout, dropout),
        dropout_dim=spatial_dims,
        bias=bias,
    )
    replace_batchnorm(model, norm, spatial_dims)
    for m in model.modules():  # MONAI hard-codes p=0.5 on the skip dropout of the last two up-transitions
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = dropout
    if dp_compatible:
        disable_inplace(model)
    return model
