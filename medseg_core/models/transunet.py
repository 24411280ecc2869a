"""TransUNet (Chen et al. 2021, arXiv:2102.04306) in 2D and 3D: ours, because MONAI has none.

Architecture (R50-ViT-B/16 hybrid, layer layout of the official model, github.com/Beckschen/TransUNet):

- ResNet-v2 root: weight-standardised 7x7 conv stride 2 -> GroupNorm(32) -> ReLU -> 3x3 max-pool
  stride 2, then 3 stages of bottleneck units (3/4/9 units, widths 64/128/256, outputs 256/512/1024,
  stride 2 in the first unit of stages 2 and 3) with weight-standardised convs and GroupNorm.
- 1x1 patch embedding of the 1/16 feature map to ``hidden_size`` tokens + learned position
  embeddings; ViT encoder (pre-norm blocks, MONAI ``TransformerBlock``) and a final LayerNorm.
- Tokens reshaped to the grid, 3x3 conv to ``head_channels`` (512, "conv_more"), cascaded upsampler
  (x2 upsample, concat skip, 2x (3x3 conv, norm, ReLU)) with ``decoder_channels`` (256, 128, 64, 16)
  and ``n_skip`` ResNet skips (512 @ 1/8, 256 @ 1/4, 64 @ 1/2), 3x3 segmentation head.

At 224x224, 3 input channels and 9 classes it counts 105.28 M parameters, like the official model.
Differences from the official code (none changes the parameter count): the max-pool pads by 1, so
every feature map is exactly 1/2, 1/4, ... of the input (the official pads the 1/4 skip with zeros
instead); position embeddings are interpolated at run time for other input sizes; attention-weight
dropout follows ``dropout_rate`` (MONAI's block); LayerNorm eps is MONAI's 1e-5 inside the blocks.
The bottleneck units compute conv -> norm -> ReLU like the official code (which names them
"PreActBottleneck", but does not pre-activate).

For masked-autoencoder pretraining the whole encoder lives in ``model.encoder`` (state-dict prefix
``encoder.``): ``encoder.embed(x)`` gives tokens before the transformer (drop masked tokens there),
``encoder.transform(tokens)`` runs the transformer and final norm.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.transformerblock import TransformerBlock

from medseg_core.models.layers import group_count, norm_layer, resolve_norm, strip_unused_cross_attention
from medseg_core.models.registry import register_model

RESNET_STRIDE = 16  # root conv 2 x max-pool 2 x stage-2 2 x stage-3 2
RESNET_MAX_GROUPS = 32  # GroupNorm(32) as in BiT / the official model


def _standardize(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Weight standardisation (Qiao et al. 2019): zero mean, unit variance per output filter."""
    dims = tuple(range(1, weight.ndim))
    var, mean = torch.var_mean(weight, dim=dims, keepdim=True, unbiased=False)
    return (weight - mean) / torch.sqrt(var + eps)


class StdConv2d(nn.Conv2d):
    """``nn.Conv2d`` with weight standardisation (BiT / R50-ViT hybrid)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self._conv_forward(x, _standardize(self.weight), self.bias)


class StdConv3d(nn.Conv3d):
    """``nn.Conv3d`` with weight standardisation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self._conv_forward(x, _standardize(self.weight), self.bias)


def _std_conv(spatial_dims: int, cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Module:
    cls = StdConv2d if spatial_dims == 2 else StdConv3d
    return cls(cin, cout, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=False)


def _conv(spatial_dims: int) -> type[nn.Module]:
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def _gn(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels, RESNET_MAX_GROUPS), channels, eps=eps)


class ResNetUnit(nn.Module):
    """Bottleneck unit: 1x1 -> 3x3 (stride) -> 1x1 weight-standardised convs with GroupNorm.

    ``[B, cin, *S] -> [B, cout, *S / stride]``; projection shortcut (1x1 conv stride + per-channel
    GroupNorm) when the shape changes.
    """

    def __init__(self, spatial_dims: int, cin: int, cout: int, cmid: int, stride: int, inplace: bool) -> None:
        super().__init__()
        self.conv1 = _std_conv(spatial_dims, cin, cmid, 1)
        self.gn1 = _gn(cmid)
        self.conv2 = _std_conv(spatial_dims, cmid, cmid, 3, stride)
        self.gn2 = _gn(cmid)
        self.conv3 = _std_conv(spatial_dims, cmid, cout, 1)
        self.gn3 = _gn(cout)
        self.relu = nn.ReLU(inplace=inplace)
        self.downsample: nn.Module | None = None
        self.gn_proj: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = _std_conv(spatial_dims, cin, cout, 1, stride)
            self.gn_proj = nn.GroupNorm(cout, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        residual = x if self.downsample is None else self.gn_proj(self.downsample(x))
        y = self.relu(self.gn1(self.conv1(x)))
        y = self.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return self.relu(residual + y)


class ResNetV2(nn.Module):
    """The hybrid's CNN: ``[B, C, *S] -> [B, 16w, *S/16]`` plus skips ``[8w @ S/8, 4w @ S/4, w @ S/2]``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels of the root conv.
        units: bottleneck units per stage, e.g. ``(3, 4, 9)`` for R50.
        width_factor: ``w = int(64 * width_factor)``.
        inplace: in-place ReLUs (off for DP).
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, units: Sequence[int], width_factor: float, inplace: bool
    ) -> None:
        super().__init__()
        width = int(64 * width_factor)
        self.width = width
        self.out_channels = 16 * width
        self.skip_channels = (8 * width, 4 * width, width)
        pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        self.root = nn.Sequential(
            OrderedDict(
                conv=_std_conv(spatial_dims, in_channels, width, 7, 2),
                gn=_gn(width),
                relu=nn.ReLU(inplace=inplace),
                pool=pool(kernel_size=3, stride=2, padding=1),
            )
        )
        stages = []
        cin = width
        for i, (n_units, mult, stride) in enumerate(zip(units, (1, 2, 4), (1, 2, 2), strict=True), start=1):
            cout, cmid = width * 4 * mult, width * mult
            block = [
                (
                    f"unit{j + 1}",
                    ResNetUnit(
                        spatial_dims, cin if j == 0 else cout, cout, cmid, stride if j == 0 else 1, inplace
                    ),
                )
                for j in range(n_units)
            ]
            stages.append((f"block{i}", nn.Sequential(OrderedDict(block))))
            cin = cout
        self.body = nn.Sequential(OrderedDict(stages))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # noqa: D102
        x = self.root.relu(self.root.gn(self.root.conv(x)))  # [B, w, S/2]
        skips = [x]
        x = self.root.pool(x)  # [B, w, S/4]
        for stage in self.body[:-1]:
            x = stage(x)  # [B, 4w, S/4], then [B, 8w, S/8]
            skips.append(x)
        x = self.body[-1](x)  # [B, 16w, S/16]
        return x, skips[::-1]


class GridPositionEmbedding(nn.Module):
    """Feature map ``[B, C, *grid]`` -> tokens ``[B, N, C]`` plus learned position embeddings.

    The embeddings are stored for ``grid_size`` and (bi/tri)linearly interpolated for other grids,
    so a model trained at one patch size runs at any size divisible by its stride. A leaf module
    with a single tensor input, so DP-SGD per-sample gradients work through ``torch.func``.
    """

    def __init__(self, grid_size: Sequence[int], hidden_size: int) -> None:
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.weight = nn.Parameter(torch.zeros(1, math.prod(self.grid_size), hidden_size))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def embedding_for(self, grid: Sequence[int]) -> torch.Tensor:
        """Position embeddings ``[1, prod(grid), C]`` for a token grid."""
        grid = tuple(grid)
        if grid == self.grid_size:
            return self.weight
        c = self.weight.shape[-1]
        table = self.weight.transpose(1, 2).reshape(1, c, *self.grid_size)  # [1, C, *grid_size]
        mode = "bilinear" if len(grid) == 2 else "trilinear"
        table = F.interpolate(table, size=grid, mode=mode, align_corners=False)
        return table.flatten(2).transpose(1, 2)  # [1, N, C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        tokens = x.flatten(2).transpose(1, 2)  # [B, N, C]
        return tokens + self.embedding_for(x.shape[2:])


class TransUNetEncoder(nn.Module):
    """Optional ResNet-v2 + patch embedding + ViT; ``[B, C, *S] -> tokens [B, N, hidden]``, skips, grid."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        img_size: tuple[int, ...],
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        mlp_dim: int,
        dropout_rate: float,
        resnet_units: Sequence[int] | None,
        width_factor: float,
        patch_size: int,
        inplace: bool,
    ) -> None:
        super().__init__()
        self.resnet = (
            ResNetV2(spatial_dims, in_channels, resnet_units, width_factor, inplace) if resnet_units else None
        )
        patch = 1 if self.resnet is not None else patch_size
        self.stride = RESNET_STRIDE if self.resnet is not None else patch_size
        feat_channels = self.resnet.out_channels if self.resnet is not None else in_channels
        self.patch_embed = _conv(spatial_dims)(feat_channels, hidden_size, kernel_size=patch, stride=patch)
        self.pos_embed = GridPositionEmbedding([s // self.stride for s in img_size], hidden_size)
        self.dropout = nn.Dropout(dropout_rate)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias=True)
            for _ in range(num_layers)
        )
        strip_unused_cross_attention(self.blocks)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, ...]]:
        """Tokens with position embeddings ``[B, N, hidden]``, CNN skips (deepest first), token grid."""
        skips: list[torch.Tensor] = []
        if self.resnet is not None:
            x, skips = self.resnet(x)
        x = self.patch_embed(x)  # [B, hidden, *grid]
        grid = tuple(x.shape[2:])
        return self.dropout(self.pos_embed(x)), skips, grid

    def transform(self, tokens: torch.Tensor) -> torch.Tensor:
        """Transformer blocks + final LayerNorm on ``[B, n, hidden]`` (any subset of tokens)."""
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, ...]]:  # noqa: D102
        tokens, skips, grid = self.embed(x)
        return self.transform(tokens), skips, grid


class ConvNormAct(nn.Sequential):
    """3x3 conv (no bias) -> norm -> ReLU."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, norm: str, inplace: bool) -> None:
        super().__init__(
            _conv(spatial_dims)(cin, cout, kernel_size=3, padding=1, bias=False),
            norm_layer(norm, spatial_dims, cout),
            nn.ReLU(inplace=inplace),
        )


class DecoderBlock(nn.Module):
    """x2 upsample, concatenate the skip (if any), two :class:`ConvNormAct`."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, skip: int, norm: str, inplace: bool) -> None:
        super().__init__()
        self.up = nn.Upsample(
            scale_factor=2, mode="bilinear" if spatial_dims == 2 else "trilinear", align_corners=True
        )
        self.conv1 = ConvNormAct(spatial_dims, cin + skip, cout, norm, inplace)
        self.conv2 = ConvNormAct(spatial_dims, cout, cout, norm, inplace)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class TransUNetDecoder(nn.Module):
    """Cascaded upsampler: tokens ``[B, N, hidden]`` on ``grid`` -> ``[B, decoder_channels[-1], *S]``."""

    def __init__(
        self,
        spatial_dims: int,
        hidden_size: int,
        head_channels: int,
        decoder_channels: Sequence[int],
        skip_channels: Sequence[int],
        norm: str,
        inplace: bool,
    ) -> None:
        super().__init__()
        self.conv_more = ConvNormAct(spatial_dims, hidden_size, head_channels, norm, inplace)
        ins = [head_channels, *decoder_channels[:-1]]
        skips = [*skip_channels, *[0] * (len(decoder_channels) - len(skip_channels))]
        self.blocks = nn.ModuleList(
            DecoderBlock(spatial_dims, cin, cout, skip, norm, inplace)
            for cin, cout, skip in zip(ins, decoder_channels, skips, strict=True)
        )
        self.n_skip = len(skip_channels)

    def forward(
        self, tokens: torch.Tensor, grid: Sequence[int], skips: Sequence[torch.Tensor]
    ) -> torch.Tensor:  # noqa: D102
        b, _, hidden = tokens.shape
        # .contiguous(): the transposed view has channels-last strides, which Opacus 1.6's Conv2d
        # per-sample gradient (unfold2d via as_strided) silently gets wrong.
        x = tokens.transpose(1, 2).reshape(b, hidden, *grid).contiguous()  # [B, hidden, *grid]
        x = self.conv_more(x)  # [B, head, *grid]
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < self.n_skip else None)
        return x


def _size(img_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    return (img_size,) * spatial_dims if isinstance(img_size, int) else tuple(img_size)


class TransUNet(nn.Module):
    """TransUNet, hybrid (``resnet_units``) or pure ViT (``resnet_units=None``), 2D or 3D.

    ``forward``: ``[B, in_channels, *S] -> [B, out_channels, *S]`` logits, ``S`` divisible by 16
    (hybrid) or ``patch_size`` (ViT).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input images.
        out_channels: classes (including background).
        img_size: training patch size; sets the stored position-embedding grid.
        hidden_size, num_layers, num_heads, mlp_dim: ViT size (B/16: 768, 12, 12, 3072).
        dropout_rate: dropout of embeddings, attention and MLP.
        resnet_units: bottleneck units per ResNet stage ((3, 4, 9) for R50), or ``None`` for a pure ViT.
        width_factor: ResNet width ``int(64 * width_factor)``.
        patch_size: ViT patch edge without ResNet (16); the hybrid always embeds 1x1 patches at 1/16.
        decoder_channels: cascaded upsampler widths, one x2 stage each (``2**len == stride``).
        head_channels: width of the conv after the transformer ("conv_more").
        n_skip: ResNet skips used by the decoder (0..3; 0 without ResNet).
        norm: decoder normalisation, ``"batch"`` (official), ``"group"`` or ``"instance"``.
        stem_in_channels: channels the first conv expects; when larger than ``in_channels`` the input
            is tiled along channels (the official model tiles grey-scale to RGB so ImageNet weights
            load unchanged). ``None``: ``in_channels``.
        inplace: in-place ReLUs (must be off for DP-SGD).

    Raises:
        ValueError: any inconsistent size, naming the value.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        img_size: int | Sequence[int],
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        dropout_rate: float = 0.1,
        resnet_units: Sequence[int] | None = (3, 4, 9),
        width_factor: float = 1.0,
        patch_size: int = 16,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        head_channels: int = 512,
        n_skip: int = 3,
        norm: str = "batch",
        stem_in_channels: int | None = None,
        inplace: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"TransUNet: spatial_dims={spatial_dims} must be 2 or 3")
        size = _size(img_size, spatial_dims)
        hybrid = bool(resnet_units)
        stride = RESNET_STRIDE if hybrid else patch_size
        for key, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("mlp_dim", mlp_dim),
            ("head_channels", head_channels),
            ("patch_size", patch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TransUNet: {key}={value!r} must be a positive integer")
        if len(size) != spatial_dims or any(not isinstance(s, int) or s < 1 or s % stride for s in size):
            raise ValueError(
                f"TransUNet: img_size={img_size!r} needs {spatial_dims} sizes divisible by {stride}"
            )
        if hidden_size % num_heads:
            raise ValueError(
                f"TransUNet: hidden_size={hidden_size} must be divisible by num_heads={num_heads}"
            )
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"TransUNet: dropout_rate={dropout_rate!r} must be in [0, 1)")
        if hybrid and (len(resnet_units) != 3 or any(not isinstance(u, int) or u < 1 for u in resnet_units)):
            raise ValueError(f"TransUNet: resnet_units={resnet_units!r} needs 3 positive integers (or null)")
        if hybrid and int(64 * width_factor) < 1:
            raise ValueError(f"TransUNet: width_factor={width_factor!r} gives a ResNet width below 1")
        if (
            any(not isinstance(c, int) or c < 1 for c in decoder_channels)
            or 2 ** len(decoder_channels) != stride
        ):
            raise ValueError(
                f"TransUNet: decoder_channels={tuple(decoder_channels)} needs log2({stride}) positive widths "
                "(one x2 upsampling stage each)"
            )
        max_skip = 3 if hybrid else 0
        if not 0 <= n_skip <= max_skip:
            raise ValueError(
                f"TransUNet: n_skip={n_skip} must be in [0, {max_skip}]"
                + ("" if hybrid else " without ResNet")
            )
        stem = in_channels if stem_in_channels is None else stem_in_channels
        if stem < in_channels or stem % in_channels:
            raise ValueError(
                f"TransUNet: stem_in_channels={stem_in_channels} must be a multiple of in_channels={in_channels}"
            )

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.stem_in_channels = stem
        self.img_size = size
        self.encoder = TransUNetEncoder(
            spatial_dims,
            stem,
            size,
            hidden_size,
            num_layers,
            num_heads,
            mlp_dim,
            dropout_rate,
            tuple(resnet_units) if hybrid else None,
            width_factor,
            patch_size,
            inplace,
        )
        skip_channels = self.encoder.resnet.skip_channels[:n_skip] if hybrid else ()
        self.decoder = TransUNetDecoder(
            spatial_dims, hidden_size, head_channels, decoder_channels, skip_channels, norm, inplace
        )
        self.segmentation_head = _conv(spatial_dims)(
            decoder_channels[-1], out_channels, kernel_size=3, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        stride = self.encoder.stride
        if (
            x.ndim != self.spatial_dims + 2
            or x.shape[1] != self.in_channels
            or any(s % stride for s in x.shape[2:])
        ):
            raise ValueError(
                f"TransUNet expects [B, {self.in_channels}, *S] with every S divisible by {stride}, "
                f"got {tuple(x.shape)}"
            )
        if self.stem_in_channels != self.in_channels:
            x = x.repeat(1, self.stem_in_channels // self.in_channels, *([1] * self.spatial_dims))
        tokens, skips, grid = self.encoder(x)  # [B, N, hidden]
        return self.segmentation_head(self.decoder(tokens, grid, skips))


_HYBRID_TINY = {
    "img_size": 32,
    "hidden_size": 16,
    "num_layers": 1,
    "num_heads": 2,
    "mlp_dim": 32,
    "dropout_rate": 0.0,
    "resnet_units": (1, 1, 1),
    "width_factor": 0.0625,  # ResNet width 4
    "decoder_channels": (16, 8, 8, 4),
    "head_channels": 16,
}


def _hybrid(
    name: str,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str | None,
    dp_compatible: bool,
    **kwargs,
) -> TransUNet:
    norm = resolve_norm(norm, default="batch", dp_compatible=dp_compatible, model=name)
    return TransUNet(spatial_dims, in_channels, out_channels, norm=norm, inplace=not dp_compatible, **kwargs)


@register_model("transunet_r50_vit_b16", spatial_dims=(2,), tiny=lambda d: dict(_HYBRID_TINY))
def transunet_r50_vit_b16(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str | None = None,
    dp_compatible: bool = False,
    img_size: int | Sequence[int] = 224,
    hidden_size: int = 768,
    num_layers: int = 12,
    num_heads: int = 12,
    mlp_dim: int = 3072,
    dropout_rate: float = 0.1,
    resnet_units: Sequence[int] = (3, 4, 9),
    width_factor: float = 1.0,
    decoder_channels: Sequence[int] = (256, 128, 64, 16),
    head_channels: int = 512,
    n_skip: int = 3,
    stem_in_channels: int | None = None,
) -> nn.Module:
    """2D TransUNet R50-ViT-B/16 (see :class:`TransUNet`); defaults are the official sizes.

    ``norm=None`` means BatchNorm in the decoder (official), or GroupNorm with ``dp_compatible``.
    """
    return _hybrid(
        "transunet_r50_vit_b16",
        spatial_dims,
        in_channels,
        out_channels,
        norm,
        dp_compatible,
        img_size=img_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        mlp_dim=mlp_dim,
        dropout_rate=dropout_rate,
        resnet_units=resnet_units,
        width_factor=width_factor,
        decoder_channels=decoder_channels,
        head_channels=head_channels,
        n_skip=n_skip,
        stem_in_channels=stem_in_channels,
    )


@register_model("transunet3d", spatial_dims=(3,), tiny=lambda d: dict(_HYBRID_TINY))
def transunet3d(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str | None = None,
    dp_compatible: bool = False,
    img_size: int | Sequence[int] = 96,
    hidden_size: int = 768,
    num_layers: int = 12,
    num_heads: int = 12,
    mlp_dim: int = 3072,
    dropout_rate: float = 0.1,
    resnet_units: Sequence[int] = (3, 4, 9),
    width_factor: float = 1.0,
    decoder_channels: Sequence[int] = (256, 128, 64, 16),
    head_channels: int = 512,
    n_skip: int = 3,
    stem_in_channels: int | None = None,
) -> nn.Module:
    """3D TransUNet: the R50-ViT-B/16 design on volumes (3D ResNet-v2, 3D tokens, 3D decoder).

    Same arguments as ``transunet_r50_vit_b16``; ``img_size`` (default 96^3) must be divisible by 16.
    """
    return _hybrid(
        "transunet3d",
        spatial_dims,
        in_channels,
        out_channels,
        norm,
        dp_compatible,
        img_size=img_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        mlp_dim=mlp_dim,
        dropout_rate=dropout_rate,
        resnet_units=resnet_units,
        width_factor=width_factor,
        decoder_channels=decoder_channels,
        head_channels=head_channels,
        n_skip=n_skip,
        stem_in_channels=stem_in_channels,
    )


@register_model(
    "transunet_vit_b16",
    spatial_dims=(2,),
    tiny=lambda d: {
        "img_size": 32,
        "hidden_size": 16,
        "num_layers": 1,
        "num_heads": 2,
        "mlp_dim": 32,
        "dropout_rate": 0.0,
        "decoder_channels": (16, 8, 8, 4),
        "head_channels": 16,
    },
)
def transunet_vit_b16(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str | None = None,
    dp_compatible: bool = False,
    img_size: int | Sequence[int] = 224,
    patch_size: int = 16,
    hidden_size: int = 768,
    num_layers: int = 12,
    num_heads: int = 12,
    mlp_dim: int = 3072,
    dropout_rate: float = 0.1,
    decoder_channels: Sequence[int] = (256, 128, 64, 16),
    head_channels: int = 512,
    stem_in_channels: int | None = None,
) -> nn.Module:
    """2D TransUNet with a pure ViT-B/16 encoder (16x16 patch embedding, no ResNet, no skips)."""
    norm = resolve_norm(norm, default="batch", dp_compatible=dp_compatible, model="transunet_vit_b16")
    return TransUNet(
        spatial_dims,
        in_channels,
        out_channels,
        img_size=img_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        mlp_dim=mlp_dim,
        dropout_rate=dropout_rate,
        resnet_units=None,
        patch_size=patch_size,
        decoder_channels=decoder_channels,
        head_channels=head_channels,
        n_skip=0,
        norm=norm,
        stem_in_channels=stem_in_channels,
        inplace=not dp_compatible,
    )
