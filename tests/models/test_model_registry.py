"""The model registry: every registered model in every supported dimensionality builds from its tiny
config, maps [B, C, *S] to [B, out, *S], back-propagates into every parameter, is deterministic in
eval mode; argument errors are ValueErrors naming the value; the Hydra model configs instantiate."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import hydra
import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

import configs
from medseg_core.models import (
    NORMS,
    build_model,
    dynunet_kernels_strides,
    get_model_spec,
    list_models,
    model_spatial_dims,
    tiny_config,
)
from medseg_core.workflow import build_configured_model, model_config

SIZE = 32
CASES = [pytest.param(n, d, id=f"{n}-{d}d") for n in list_models() for d in model_spatial_dims(n)]
MODEL_CONFIGS = sorted((Path(configs.__file__).parent / "model").glob("*.yaml"))
OFFICIAL_SIZE = {"transunet_r50_vit_b16.yaml", "transunet_vit_b16.yaml"}  # built on the meta device


def _skip_missing(name: str) -> None:
    for module in get_model_spec(name).requires:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{name} needs the optional package {module!r}")


def _tiny(
    name: str, spatial_dims: int, in_channels: int = 1, out_channels: int = 3, **overrides
) -> nn.Module:
    _skip_missing(name)
    torch.manual_seed(0)
    return build_model(
        name,
        in_channels=in_channels,
        out_channels=out_channels,
        **{**tiny_config(name, spatial_dims), **overrides},
    )


def test_registry_lists_every_family():
    assert set(list_models()) == {
        "unet",
        "unetpp",
        "dynunet",
        "vnet",
        "unetr",
        "swin_unetr",
        "transunet_r50_vit_b16",
        "transunet_vit_b16",
        "transunet3d",
    }
    assert model_spatial_dims("transunet3d") == (3,)
    assert model_spatial_dims("unet") == (2, 3)


@pytest.mark.parametrize("name,spatial_dims", CASES)
def test_forward_backward_every_parameter_gets_a_gradient(name, spatial_dims):
    model = _tiny(name, spatial_dims, in_channels=2, out_channels=3).train()
    x = torch.randn(2, 2, *([SIZE] * spatial_dims))
    out = model(x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 3, *([SIZE] * spatial_dims))
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"unused parameters (no gradient): {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # the model learns something: at least most parameter tensors get a non-zero gradient
    nonzero = sum(bool(p.grad.abs().sum() > 0) for p in model.parameters())
    assert nonzero >= 0.8 * len(list(model.parameters()))


@pytest.mark.parametrize("name,spatial_dims", CASES)
def test_eval_mode_is_deterministic(name, spatial_dims):
    model = _tiny(name, spatial_dims).eval()
    x = torch.randn(1, 1, *([SIZE] * spatial_dims))
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    "name,spatial_dims,n_outputs,aux_sizes",
    [("dynunet", 2, 3, [SIZE // 2, SIZE // 4]), ("unetpp", 2, 4, [SIZE] * 3)],
)
def test_deep_supervision_output_convention(name, spatial_dims, n_outputs, aux_sizes):
    extra = {"deep_supr_num": 2} if name == "dynunet" else {}
    model = _tiny(name, spatial_dims, deep_supervision=True, **extra)
    x = torch.randn(2, 1, SIZE, SIZE)
    outs = model.train()(x)
    assert isinstance(outs, list) and len(outs) == n_outputs
    assert outs[0].shape == (2, 3, SIZE, SIZE)  # main output first, full resolution
    assert [o.shape[-1] for o in outs[1:]] == aux_sizes
    assert all(o.shape[:2] == (2, 3) for o in outs)
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        main = model.eval()(x)
    assert isinstance(main, torch.Tensor) and main.shape == (2, 3, SIZE, SIZE)


def test_dynunet_registers_every_block_once():
    model = _tiny("dynunet", 3, deep_supervision=True)
    all_modules = [id(m) for _, m in model.named_modules(remove_duplicate=False)]
    assert len(all_modules) == len(set(all_modules))
    keys = model.state_dict().keys()
    assert not [
        k for k in keys if k.split(".")[0] in ("input_block", "downsamples", "bottleneck", "upsamples")
    ]
    # forward leaves no graph behind (federated code deep-copies models)
    model.train()(torch.randn(1, 1, SIZE, SIZE, SIZE))
    import copy

    copy.deepcopy(model)


def test_unused_monai_layers_are_stripped():
    unetr = _tiny("unetr", 3)
    assert not [k for k in unetr.state_dict() if "norm_cross_attn" in k]
    unetpp = _tiny("unetpp", 2)
    assert not hasattr(unetpp, "final_conv_0_1")


@pytest.mark.parametrize("norm", NORMS)
def test_norm_choice_is_applied_with_dividing_group_counts(norm):
    model = _tiny("unet", 3, out_channels=3, norm=norm)
    expected = {"instance": nn.InstanceNorm3d, "group": nn.GroupNorm, "batch": nn.BatchNorm3d}[norm]
    norms = [m for m in model.modules() if isinstance(m, (nn.InstanceNorm3d, nn.GroupNorm, nn.BatchNorm3d))]
    assert norms and all(isinstance(m, expected) for m in norms)
    for m in norms:
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0
        if isinstance(m, nn.InstanceNorm3d):
            assert m.affine and not m.track_running_stats


def test_vnet_norm_and_dropout_are_configurable():
    model = _tiny("vnet", 2, norm="instance", dropout=0.0)
    assert not [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd))


def test_lists_from_hydra_become_tuples():
    channels = OmegaConf.create({"c": [4, 8, 16]}).c
    model = build_model(
        "unet", spatial_dims=2, in_channels=1, out_channels=2, channels=channels, strides=[2, 2]
    )
    assert model(torch.randn(1, 1, SIZE, SIZE)).shape == (1, 2, SIZE, SIZE)


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_model_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet'.*transunet_r50_vit_b16.*unet"):
        build_model("resnet", spatial_dims=3, in_channels=1, out_channels=2)
    with pytest.raises(ValueError, match="unknown model"):
        tiny_config("nope", 3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "chanels": (4, 8)},
            "unexpected keyword.*chanels",
        ),
        ({"spatial_dims": 3, "out_channels": 2}, "missing a required argument: 'in_channels'"),
        ({"spatial_dims": 4, "in_channels": 1, "out_channels": 2}, "spatial_dims=4 is not supported"),
        (
            {"spatial_dims": 3, "in_channels": 0, "out_channels": 2},
            "in_channels=0 must be a positive integer",
        ),
        ({"spatial_dims": 3, "in_channels": 1, "out_channels": 2.5}, "out_channels=2.5"),
        (
            {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "norm": "layer"},
            "norm='layer' is not one of",
        ),
        (
            {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "dp_compatible": "yes"},
            "dp_compatible='yes'",
        ),
        (
            {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": (8, 16), "strides": (2, 2)},
            r"strides=\(2, 2\) needs len\(channels\) - 1 = 1",
        ),
        ({"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "dropout": 1.5}, "dropout=1.5"),
        (
            {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "norm": "batch", "dp_compatible": True},
            "norm='batch' is not DP-compatible",
        ),
    ],
)
def test_bad_arguments_raise_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model("unet", **kwargs)


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("vnet", {"spatial_dims": 3, "in_channels": 3}, "in_channels=3 must divide 16"),
        (
            "unetr",
            {"spatial_dims": 3, "in_channels": 1, "img_size": 40},
            r"img_size=\(40, 40, 40\) must be divisible by 16",
        ),
        ("unetr", {"spatial_dims": 2, "in_channels": 1, "hidden_size": 30, "num_heads": 4}, "hidden_size=30"),
        ("swin_unetr", {"spatial_dims": 3, "in_channels": 1, "feature_size": 16}, "feature_size=16"),
        ("swin_unetr", {"spatial_dims": 3, "in_channels": 1, "dp_compatible": True}, "batch dimension"),
        ("unetpp", {"spatial_dims": 2, "in_channels": 1, "features": (4, 8)}, "features="),
        (
            "dynunet",
            {"spatial_dims": 3, "in_channels": 1, "spacing_mm": (1, 1, 1)},
            "give both spacing_mm and patch_size",
        ),
        (
            "dynunet",
            {
                "spatial_dims": 3,
                "in_channels": 1,
                "spacing_mm": (1, 1, 1),
                "patch_size": (32, 32, 32),
                "strides": (1, 2, 2),
            },
            "not both",
        ),
        (
            "dynunet",
            {"spatial_dims": 3, "in_channels": 1, "kernel_size": (3, 3), "strides": (1, 2)},
            "at least 3",
        ),
        (
            "dynunet",
            {"spatial_dims": 3, "in_channels": 1, "deep_supervision": True, "deep_supr_num": 3},
            "deep_supr_num=3",
        ),
        (
            "transunet3d",
            {"spatial_dims": 2, "in_channels": 1},
            r"spatial_dims=2 is not supported \(supports \(3,\)\)",
        ),
    ],
)
def test_model_specific_errors(name, kwargs, match):
    _skip_missing(name)
    with pytest.raises(ValueError, match=match):
        build_model(name, out_channels=2, **kwargs)


def test_tiny_config_rejects_unsupported_dims():
    with pytest.raises(ValueError, match="spatial_dims=3 is not supported"):
        tiny_config("transunet_r50_vit_b16", 3)
    assert tiny_config("unet", 2)["spatial_dims"] == 2


# ------------------------------------------------------------------------------------- nnU-Net planner


def test_dynunet_kernels_strides_isotropic():
    kernels, strides = dynunet_kernels_strides((1.0, 1.0, 1.0), (32, 32, 32))
    assert strides == [(1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)]  # stops at 4^3 (min feature map)
    assert kernels == [(3, 3, 3)] * 4


def test_dynunet_kernels_strides_anisotropic_like_nnunet():
    # thick slices: no pooling and 1-wide kernels along z until the in-plane spacing catches up
    kernels, strides = dynunet_kernels_strides((3.0, 0.8, 0.8), (16, 64, 64))
    assert strides == [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)]
    assert kernels == [(1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)]
    # a lone poolable axis needs >= 3x the minimum feature map: 96 -> ... -> 12 -> 6, while 32 stops at 4
    assert dynunet_kernels_strides((1.0, 1.0), (96, 32))[1] == [(1, 1), (2, 2), (2, 2), (2, 2), (2, 1)]


def test_dynunet_kernels_strides_errors():
    with pytest.raises(ValueError, match="need 2 or 3 axes"):
        dynunet_kernels_strides((1.0, 1.0, 1.0), (32, 32))
    with pytest.raises(ValueError, match="must be positive"):
        dynunet_kernels_strides((0.0, 1.0), (32, 32))
    with pytest.raises(ValueError, match=r"patch_size=\(18, 32\) must be divisible by \(4, 4\)"):
        dynunet_kernels_strides((1.0, 1.0), (18, 32))


def test_dynunet_built_from_the_plan_runs_on_an_anisotropic_patch():
    model = build_model(
        "dynunet",
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        filters=(4, 8, 16, 16, 16),
        spacing_mm=(3.0, 1.0, 1.0),
        patch_size=(16, 32, 32),
    )
    assert model(torch.randn(1, 1, 16, 32, 32)).shape == (1, 2, 16, 32, 32)


# ------------------------------------------------------------------------------------------ Hydra configs


#: what the trainers pass for a 32^3 plan (``img_size: null`` in a config becomes the patch)
STAND_IN_PLAN = {"patch_size": [32, 32, 32], "patch_size_2d": [32, 32]}


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_model_config_instantiates(path):
    cfg = OmegaConf.load(path)
    assert cfg._target_ == "medseg_core.models.build_model"
    assert cfg.dp_compatible is False and cfg.in_channels == 1
    _skip_missing(cfg.name)
    kwargs = model_config(cfg, in_channels=1, out_channels=3, plan=STAND_IN_PLAN)  # the trainers' path
    if path.name in OFFICIAL_SIZE:
        with torch.device("meta"):
            model = build_configured_model(kwargs)
    else:
        model = build_configured_model(kwargs)
        assert sum(p.numel() for p in model.parameters()) < 50e6  # CPU-sized
    assert isinstance(model, nn.Module)


def test_a_fixed_size_model_takes_the_plans_patch_and_refuses_another_size_before_training():
    """UNETR's position embeddings are fixed: its config leaves ``img_size`` to the plan (it used to say
    32^3 and ``medseg-train`` crashed in the first step on 64^3 data)."""
    plan = {"patch_size": [64, 64, 48], "patch_size_2d": [64, 64]}
    unetr = OmegaConf.load(Path(configs.__file__).parent / "model" / "unetr.yaml")
    assert unetr.img_size is None
    assert model_config(unetr, in_channels=1, out_channels=3, plan=plan)["img_size"] == [64, 64, 48]
    assert model_config({**unetr, "spatial_dims": 2}, in_channels=1, out_channels=3, plan=plan)["img_size"] == [64, 64]
    with pytest.raises(ValueError, match=r"unetr.*img_size \(32, 32, 32\).*patch size \(64, 64, 48\).*model\.img_size=null"):
        model_config({**unetr, "img_size": [32, 32, 32]}, in_channels=1, out_channels=3, plan=plan)
    with pytest.raises(ValueError, match=r"img_size \(64, 64, 64\)"):  # an int means a cube
        model_config({**unetr, "img_size": 64}, in_channels=1, out_channels=3, plan=plan)
    fine = model_config({**unetr, "img_size": [64, 64, 48]}, in_channels=1, out_channels=3, plan=plan)
    assert build_configured_model(fine)(torch.randn(1, 1, 64, 64, 48)).shape == (1, 3, 64, 64, 48)
    # TransUNet interpolates its position embeddings: its stored grid is kept
    small = OmegaConf.load(Path(configs.__file__).parent / "model" / "transunet3d_small.yaml")
    assert model_config(small, in_channels=1, out_channels=3, plan=plan)["img_size"] == [32, 32, 32]


def test_official_config_has_the_official_parameter_count():
    cfg = OmegaConf.load(Path(configs.__file__).parent / "model" / "transunet_r50_vit_b16.yaml")
    with torch.device("meta"):
        model = hydra.utils.instantiate(cfg)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 105.28) < 0.1
