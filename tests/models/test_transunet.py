"""TransUNet (ours): official parameter count, architecture, interpolable position embeddings,
grey-scale tiling, encoder split for MAE pretraining, 3D variant and argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from medseg_core.models import TransUNet, build_model, tiny_config
from medseg_core.models.transunet import GridPositionEmbedding, StdConv2d


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _official(**kwargs) -> nn.Module:
    with torch.device("meta"):  # no memory, no init time: only shapes matter for counting
        return build_model("transunet_r50_vit_b16", spatial_dims=2, out_channels=9, **kwargs)


def _tiny(name: str = "transunet_r50_vit_b16", spatial_dims: int = 2, **overrides) -> TransUNet:
    torch.manual_seed(0)
    return build_model(
        name, in_channels=1, out_channels=3, **{**tiny_config(name, spatial_dims), **overrides}
    )


def test_r50_vit_b16_has_the_official_parameter_count():
    model = _official(in_channels=3)
    assert abs(_count(model) / 1e6 - 105.28) < 0.1
    # the parts, as in the official model
    assert _count(model.encoder.blocks) == 12 * (
        4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768 + 4 * 768
    )
    assert _count(model.encoder.pos_embed) == 14 * 14 * 768
    assert model.encoder.resnet.out_channels == 1024 and model.encoder.resnet.skip_channels == (512, 256, 64)
    assert [len(s) for s in model.encoder.resnet.body] == [3, 4, 9]
    assert [b.conv2[0].out_channels for b in model.decoder.blocks] == [256, 128, 64, 16]
    # grey-scale input tiled to the 3-channel stem keeps the count; a native 1-channel stem is 2x7x7x64 smaller
    assert _count(_official(in_channels=1, stem_in_channels=3)) == _count(model)
    assert _count(model) - _count(_official(in_channels=1)) == 2 * 7 * 7 * 64


def test_official_decoder_uses_batchnorm_unless_dp_or_asked():
    def norms(model):
        return {
            type(m)
            for m in model.decoder.modules()
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d))
        }

    assert norms(_official(in_channels=3)) == {nn.BatchNorm2d}
    assert norms(_official(in_channels=3, dp_compatible=True)) == {nn.GroupNorm}
    assert norms(_official(in_channels=3, norm="instance")) == {nn.InstanceNorm2d}
    encoder_norms = {
        type(m) for m in _official(in_channels=3).encoder.resnet.modules() if "Norm" in type(m).__name__
    }
    assert encoder_norms == {nn.GroupNorm}  # the ResNet always uses GroupNorm (BiT)


@pytest.mark.parametrize(
    "name,spatial_dims", [("transunet_r50_vit_b16", 2), ("transunet_vit_b16", 2), ("transunet3d", 3)]
)
def test_runs_at_sizes_other_than_img_size(name, spatial_dims):
    model = _tiny(name, spatial_dims).eval()  # stored grid: 32 / 16 = 2 per axis
    shape = (32, 48) if spatial_dims == 2 else (32, 48, 16)
    with torch.no_grad():
        out = model(torch.randn(1, 1, *shape))
    assert out.shape == (1, 3, *shape)


def test_position_embedding_interpolation():
    emb = GridPositionEmbedding((2, 3), hidden_size=4)
    assert emb.embedding_for((2, 3)) is emb.weight
    same = emb.embedding_for((2, 3))
    up = emb.embedding_for((4, 6))
    assert up.shape == (1, 24, 4)
    # bilinear upsampling of a grid: the mean of every channel is preserved up to interpolation error
    table = same.transpose(1, 2).reshape(1, 4, 2, 3)
    expected = (
        F.interpolate(table, size=(4, 6), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    )
    assert torch.allclose(up, expected)
    tokens = emb(torch.zeros(2, 4, 2, 3))  # [B, C, *grid] -> [B, N, C]: zeros + embedding
    assert tokens.shape == (2, 6, 4) and torch.equal(tokens[0], emb.weight[0])


def test_grey_scale_tiling_matches_a_three_channel_model():
    tiled = _tiny(stem_in_channels=3).eval()
    native3 = build_model(
        "transunet_r50_vit_b16", in_channels=3, out_channels=3, **tiny_config("transunet_r50_vit_b16", 2)
    ).eval()
    native3.load_state_dict(tiled.state_dict())  # same layout: the stem takes 3 channels in both
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(tiled(x), native3(x.repeat(1, 3, 1, 1)), atol=1e-6)


def test_encoder_split_for_mae_pretraining():
    model = _tiny().eval()
    assert all(k.startswith(("encoder.", "decoder.", "segmentation_head.")) for k in model.state_dict())
    encoder_keys = [k for k in model.state_dict() if k.startswith("encoder.")]
    assert any(".resnet." in k for k in encoder_keys) and any(".pos_embed." in k for k in encoder_keys)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        tokens, skips, grid = model.encoder.embed(x)
        assert tokens.shape == (2, 4, 16) and grid == (2, 2)
        assert [s.shape[1:] for s in skips] == [(32, 4, 4), (16, 8, 8), (4, 16, 16)]
        full, _, _ = model.encoder(x)
        assert torch.allclose(model.encoder.transform(tokens), full)
        kept = model.encoder.transform(tokens[:, :2])  # MAE: the transformer runs on visible tokens only
        assert kept.shape == (2, 2, 16)


@pytest.mark.parametrize("n_skip", [0, 1, 2, 3])
def test_every_number_of_skips(n_skip):
    model = _tiny(n_skip=n_skip)
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 3, 32, 32)
    assert model.decoder.blocks[0].conv1[0].in_channels == 16 + (32 if n_skip >= 1 else 0)


def test_3d_variant_is_three_dimensional():
    model = _tiny("transunet3d", 3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert not convs and isinstance(model.encoder.resnet.root.conv, nn.Conv3d)
    assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_weight_standardised_conv():
    conv = StdConv2d(2, 3, 3, padding=1, bias=False)
    w = conv.weight
    w_std = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / torch.sqrt(
        w.var(dim=(1, 2, 3), unbiased=False, keepdim=True) + 1e-5
    )
    x = torch.randn(1, 2, 5, 5)
    assert torch.allclose(conv(x), F.conv2d(x, w_std, padding=1), atol=1e-5)
    assert not torch.allclose(conv(x), F.conv2d(x, w, padding=1))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"img_size": 40}, r"img_size=40 needs 2 sizes divisible by 16"),
        ({"hidden_size": 18, "num_heads": 4}, "hidden_size=18 must be divisible by num_heads=4"),
        ({"resnet_units": (1, 1)}, "resnet_units"),
        ({"decoder_channels": (8, 8, 8)}, r"decoder_channels=\(8, 8, 8\) needs log2\(16\)"),
        ({"n_skip": 4}, r"n_skip=4 must be in \[0, 3\]"),
        ({"stem_in_channels": 2, "in_channels": 3}, "stem_in_channels=2 must be a multiple of in_channels=3"),
        ({"width_factor": 0.001}, "width_factor"),
        ({"dropout_rate": 1.0}, "dropout_rate=1.0"),
    ],
)
def test_bad_sizes_raise(kwargs, match):
    args = {**tiny_config("transunet_r50_vit_b16", 2), "in_channels": 1, "out_channels": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_model("transunet_r50_vit_b16", **args)


def test_pure_vit_has_no_skips_and_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"n_skip=1 must be in \[0, 0\] without ResNet"):
        TransUNet(
            2,
            1,
            2,
            img_size=32,
            hidden_size=16,
            num_heads=2,
            mlp_dim=16,
            num_layers=1,
            resnet_units=None,
            decoder_channels=(8, 8, 8, 8),
            head_channels=8,
            n_skip=1,
        )
    model = _tiny()
    with pytest.raises(
        ValueError, match=r"expects \[B, 1, \*S\] with every S divisible by 16, got \(1, 1, 30, 32\)"
    ):
        model(torch.randn(1, 1, 30, 32))
    with pytest.raises(ValueError, match=r"got \(1, 2, 32, 32\)"):
        model(torch.randn(1, 2, 32, 32))
