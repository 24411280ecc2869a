"""DP-SGD compatibility: every registered model built with ``dp_compatible=True`` gives Opacus
per-sample gradients equal to one-at-a-time autograd (this catches BatchNorm, in-place ops, unused
and doubly-registered modules, and per-layer grad-sampler bugs), trains one private step, and the
static checker in ``medseg_core.models.dp`` flags what Opacus cannot handle."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
import torch.nn as nn
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.networks.blocks.dynunet_block import UnetResBlock
from monai.networks.nets import DynUNet
from opacus import GradSampleModule, PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from medseg_core.models import (
    build_model,
    dp_problems,
    get_model_spec,
    list_models,
    model_spatial_dims,
    tiny_config,
)
from medseg_core.models.dp import HOOKED_TYPES

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
]

SIZE = 32
# V-Net 3D (46 M parameters, 5^3 kernels) takes ~90 s here; its code is dimension-generic, so 2D covers it.
SKIP = {("vnet", 3)}
EXTRA = [  # variants with their own DP hazards
    ("dynunet", 2, {"deep_supervision": True, "deep_supr_num": 2, "res_block": True}),
    ("unetpp", 2, {"deep_supervision": True}),
    ("transunet_r50_vit_b16", 2, {"stem_in_channels": 3, "img_size": 64}),  # tiling + interpolated pos-embed
]
DP_CASES = [
    pytest.param(n, d, {}, id=f"{n}-{d}d")
    for n in list_models()
    if get_model_spec(n).dp_unsupported is None
    for d in model_spatial_dims(n)
    if (n, d) not in SKIP
] + [pytest.param(n, d, kw, id=f"{n}-{d}d-" + "-".join(kw)) for n, d, kw in EXTRA]


def _dp_model(name: str, spatial_dims: int, **overrides) -> nn.Module:
    for module in get_model_spec(name).requires:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{name} needs the optional package {module!r}")
    kwargs = {**tiny_config(name, spatial_dims), **overrides}
    kwargs.pop("norm", None)  # the DP default (group/instance)
    torch.manual_seed(0)
    return build_model(name, in_channels=1, out_channels=2, dp_compatible=True, **kwargs)


def _weighted_sum(out, weights) -> torch.Tensor:
    outs = out if isinstance(out, list) else [out]
    return sum((o * w).sum() for o, w in zip(outs, weights, strict=True))


def per_sample_mismatches(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Parameters whose Opacus per-sample gradients differ from autograd run on each sample alone.

    Float64 so that only real errors (not summation order) show; the tolerance is relative to the
    largest gradient in the model (conv biases in front of InstanceNorm have ~0 gradients).
    """
    model = model.double().train()
    x = x.double()
    with torch.no_grad():
        first = model(x[:1])
    weights = [torch.randn_like(o[0]) for o in (first if isinstance(first, list) else [first])]
    reference: dict[str, list[torch.Tensor]] = {}
    for i in range(len(x)):
        model.zero_grad()
        _weighted_sum(model(x[i : i + 1]), weights).backward()
        for name, p in model.named_parameters():
            reference.setdefault(name, []).append(p.grad.clone())
    scale = max(torch.stack(g).abs().max().item() for g in reference.values())
    model.zero_grad()
    gsm = GradSampleModule(model, loss_reduction="sum")
    try:
        _weighted_sum(gsm(x), weights).backward()
        bad = []
        for name, p in model.named_parameters():
            expected = torch.stack(reference[name])
            got = getattr(p, "grad_sample", None)
            if got is None or got.shape != expected.shape:
                bad.append(f"{name}: grad_sample {None if got is None else tuple(got.shape)}")
            elif (got - expected).abs().max().item() > 1e-9 * scale:
                bad.append(
                    f"{name}: max error {(got - expected).abs().max().item() / scale:.2e} of the gradient scale"
                )
        return bad
    finally:
        gsm._close()


def test_hooked_types_match_opacus():
    """Our static checker assumes closed-form grad samplers only where Opacus 1.6 has them."""
    assert set(HOOKED_TYPES) <= set(GradSampleModule.GRAD_SAMPLERS)


@pytest.mark.parametrize("name,spatial_dims,extra", DP_CASES)
def test_per_sample_gradients_match_autograd(name, spatial_dims, extra):
    model = _dp_model(name, spatial_dims, **extra)
    assert dp_problems(model) == []
    assert ModuleValidator.validate(model, strict=False) == []
    x = torch.randn(2, 1, *([SIZE] * spatial_dims))
    assert per_sample_mismatches(model, x) == []


@pytest.mark.parametrize("name,spatial_dims,extra", DP_CASES)
def test_one_private_step(name, spatial_dims, extra):
    model = _dp_model(name, spatial_dims, **extra)
    data = TensorDataset(
        torch.randn(4, 1, *([SIZE] * spatial_dims)), torch.randint(0, 2, (4, *([SIZE] * spatial_dims)))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(data, batch_size=2),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(loader))
    # with deep supervision every output must enter the loss, or the auxiliary heads get no
    # per-sample gradient and Opacus refuses the step
    loss = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True, batch=False))
    loss(model(x), y.unsqueeze(1).float()).backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_swin_unetr_refuses_dp_with_the_reason():
    with pytest.raises(ValueError, match="cannot be made DP-compatible: shifted-window attention folds"):
        build_model("swin_unetr", spatial_dims=3, in_channels=1, out_channels=2, dp_compatible=True)


def test_swin_unetr_is_also_flagged_by_the_static_checker():
    pytest.importorskip("einops")
    from medseg_core.models.layers import disable_inplace

    kwargs = tiny_config("swin_unetr", 3)
    model = build_model("swin_unetr", in_channels=1, out_channels=2, **kwargs)
    disable_inplace(model)
    problems = dp_problems(model)
    assert any(
        "WindowAttention needs torch.func per-sample gradients but holds buffers" in p for p in problems
    )


# --------------------------------------------------------------------- the checks can fail


class _Twice(nn.Module):
    """A conv reachable under two names (like MONAI DynUNet's blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.again = nn.ModuleList([self.conv])

    def forward(self, x):
        return self.conv(x)


def test_double_registration_doubles_opacus_gradients_and_is_flagged():
    model = _Twice()
    assert dp_problems(model) == [
        "module registered 2 times (conv, again.0): its gradients would count twice"
    ]
    assert per_sample_mismatches(model, torch.randn(2, 1, 8, 8))  # Opacus silently doubles them


def test_raw_monai_dynunet_is_flagged():
    raw = DynUNet(
        3, 1, 2, [3, 3, 3, 3], [1, 2, 2, 2], [2, 2, 2], filters=(4, 8, 16, 32), deep_supervision=True
    )
    problems = dp_problems(raw)
    assert any("registered 2 times (input_block, skip_layers.downsample)" in p for p in problems)
    assert any("registered 2 times (deep_supervision_heads.0," in p for p in problems)
    assert any("in-place LeakyReLU" in p for p in problems)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("index", torch.zeros(1))

    def forward(self, x, mask):
        return x * self.scale + mask


@pytest.mark.parametrize(
    "module,match",
    [
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), "1: BatchNorm2d mixes samples"),
        (nn.Sequential(nn.InstanceNorm3d(2, track_running_stats=True)), "tracks running statistics"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True)), "1: in-place ReLU"),
        (nn.Sequential(UnetResBlock(2, 2, 2, 3, 1, "instance")), "adds its residual in place"),
        (
            nn.Sequential(_TwoInputs()),
            r"0: _TwoInputs needs torch.func per-sample gradients but holds buffers \['index'\]",
        ),
        (nn.Sequential(_TwoInputs()), r"forward takes 2 inputs \['x', 'mask'\]"),
    ],
)
def test_static_checker_flags(module, match):
    problems = dp_problems(module)
    assert any(re.search(match, p) for p in problems), problems


@pytest.fixture
def bad_model_registered():
    from medseg_core.models import registry

    @registry.register_model("_test_batchnorm_net", spatial_dims=(2,), tiny=lambda d: {})
    def _bad(spatial_dims, in_channels, out_channels, norm=None, dp_compatible=False):
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3), nn.BatchNorm2d(out_channels))

    yield "_test_batchnorm_net"
    registry._REGISTRY.pop("_test_batchnorm_net")


def test_build_model_refuses_a_model_that_fails_the_checks(bad_model_registered):
    build_model(bad_model_registered, spatial_dims=2, in_channels=1, out_channels=2)  # fine without DP
    with pytest.raises(ValueError, match="'_test_batchnorm_net' is not DP-compatible:\n  1: BatchNorm2d"):
        build_model(bad_model_registered, spatial_dims=2, in_channels=1, out_channels=2, dp_compatible=True)


def test_registration_errors(bad_model_registered):
    from medseg_core.models import register_model

    with pytest.raises(ValueError, match="already registered"):
        register_model(bad_model_registered, spatial_dims=(2,), tiny=lambda d: {})(lambda **kw: None)
    with pytest.raises(ValueError, match=r"lacks the common arguments \['norm', 'dp_compatible'\]"):
        register_model("_x", spatial_dims=(2,), tiny=lambda d: {})(
            lambda spatial_dims, in_channels, out_channels: None
        )
