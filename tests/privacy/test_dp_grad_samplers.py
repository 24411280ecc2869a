"""Our grad samplers (``client.privacy.FAST_GRAD_SAMPLERS``) give exactly the per-sample gradients of
one-at-a-time autograd, for every layer variant the models use and a few they might (float64, so only
real errors show), and the fast ``GradSampleModule`` leaves stock Opacus untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from opacus import GradSampleModule

from client.privacy import FAST_GRAD_SAMPLERS, FastGradSampleModule, wrap_model
from medseg_core.models import build_model, tiny_config
from medseg_core.models.transunet import StdConv2d, StdConv3d

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths:UserWarning"),
]


def _reference(model: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample gradients of ``sum(model(x_i) * w_i)``, one sample at a time."""
    grads: dict[str, list[torch.Tensor]] = {}
    for i in range(len(x)):
        model.zero_grad()
        (model(x[i : i + 1]) * weights[i : i + 1]).sum().backward()
        for name, p in model.named_parameters():
            grads.setdefault(name, []).append(p.grad.detach().clone())
    return {k: torch.stack(v) for k, v in grads.items()}


def _ours(model: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    gsm = FastGradSampleModule(model, loss_reduction="sum")
    try:
        model.zero_grad()
        (gsm(x) * weights).sum().backward()
        return {name: p.grad_sample.detach().clone() for name, p in model.named_parameters()}
    finally:
        gsm._close()


def assert_exact(model: nn.Module, x: torch.Tensor) -> None:
    model = model.double().train()
    x = x.double()
    with torch.no_grad():
        weights = torch.randn_like(model(x))
    expected, got = _reference(model, x, weights), _ours(model, x, weights)
    assert set(got) == set(expected)
    scale = max(v.abs().max().item() for v in expected.values())
    for name in expected:
        assert got[name].shape == expected[name].shape, name
        err = (got[name] - expected[name]).abs().max().item()
        assert err <= 1e-10 * scale, f"{name}: max error {err / scale:.2e} of the gradient scale"


CONV_LAYERS = [
    pytest.param(nn.Conv1d(3, 4, 3, padding=1), (3, 3, 11), id="conv1d"),
    pytest.param(nn.Conv2d(3, 4, 3, padding=1), (3, 3, 9, 10), id="conv2d"),
    pytest.param(nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2), (3, 4, 11, 9),
                 id="conv2d-stride-dilation-groups"),
    pytest.param(nn.Conv2d(2, 3, 3, padding="same", bias=False), (2, 2, 7, 8), id="conv2d-same-nobias"),
    pytest.param(nn.Conv2d(2, 3, 4, padding="same"), (2, 2, 7, 8), id="conv2d-same-even-kernel"),
    pytest.param(nn.Conv2d(2, 3, 3, padding=2, padding_mode="reflect"), (2, 2, 7, 8), id="conv2d-reflect"),
    pytest.param(nn.Conv3d(2, 3, 3, padding=1, stride=2), (3, 2, 7, 6, 5), id="conv3d-stride"),
    pytest.param(nn.Conv3d(4, 4, 3, padding=1, groups=4), (2, 4, 5, 5, 5), id="conv3d-depthwise"),
    pytest.param(nn.Conv3d(2, 3, 1), (2, 2, 4, 5, 6), id="conv3d-1x1"),
    pytest.param(nn.ConvTranspose1d(3, 2, 3, stride=2), (2, 3, 6), id="convtranspose1d"),
    pytest.param(nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1), (3, 3, 5, 6),
                 id="convtranspose2d-output-padding"),
    pytest.param(nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2, bias=False), (2, 4, 4, 5), id="convtranspose2d-groups"),
    pytest.param(nn.ConvTranspose3d(3, 2, 3, stride=2, padding=1, output_padding=1, dilation=1), (2, 3, 4, 3, 5),
                 id="convtranspose3d"),
    pytest.param(nn.PReLU(), (3, 4, 5, 6), id="prelu-shared"),
    pytest.param(nn.PReLU(4), (3, 4, 5, 6), id="prelu-per-channel"),
    pytest.param(nn.PReLU(4), (3, 4), id="prelu-features"),
    pytest.param(StdConv2d(3, 4, 3, padding=1, bias=False), (3, 3, 8, 8), id="stdconv2d"),
    pytest.param(StdConv3d(2, 4, 3, padding=1, stride=2), (2, 2, 6, 6, 6), id="stdconv3d"),
]


@pytest.mark.parametrize("layer,shape", CONV_LAYERS)
def test_layer_per_sample_gradients_are_exact(layer, shape):
    torch.manual_seed(0)
    assert type(layer) in FAST_GRAD_SAMPLERS
    assert_exact(nn.Sequential(layer), torch.randn(shape))


@pytest.mark.parametrize("layer,shape", [
    (nn.Conv2d(3, 4, 3, padding=1), (3, 3, 9, 10)),
    (nn.ConvTranspose3d(3, 2, 2, stride=2), (2, 3, 4, 3, 5)),
])
def test_channels_last_inputs_give_exact_gradients(layer, shape):
    """Opacus' own Conv2d sampler is wrong for channels-last inputs; ours reads the values, not the strides."""
    torch.manual_seed(0)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    model = nn.Sequential(layer).double().to(memory_format=fmt)
    assert_exact(model, torch.randn(shape).contiguous(memory_format=fmt))


@pytest.mark.parametrize("name,spatial_dims", [("unet", 3), ("transunet_r50_vit_b16", 2)])
def test_whole_model_per_sample_gradients_are_exact(name, spatial_dims):
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, out_channels=2, dp_compatible=True, **tiny_config(name, spatial_dims))
    assert_exact(model, torch.randn(2, 1, *([16 if spatial_dims == 3 else 32] * spatial_dims)))


def test_bf16_autocast_per_sample_gradients_are_float32_and_close():
    """Under bf16 autocast the per-sample gradients (hence clipping norms) are computed in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.PReLU(), nn.ConvTranspose2d(4, 2, 2, stride=2))
    x = torch.randn(3, 2, 8, 8)
    gsm = FastGradSampleModule(model, loss_reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gsm(x)
    out.float().sum().backward()
    got = {n: p.grad_sample for n, p in model.named_parameters()}
    assert all(g.dtype == torch.float32 for g in got.values())
    gsm._close()
    model.zero_grad()
    expected = _reference(model, x, torch.ones(3, 2, 16, 16))
    for name, g in got.items():
        rel = (g - expected[name]).norm() / expected[name].norm()
        assert rel < 0.05, f"{name}: relative error {rel:.3f}"


def test_stock_opacus_is_untouched():
    assert GradSampleModule.GRAD_SAMPLERS is not FastGradSampleModule.GRAD_SAMPLERS
    assert nn.ConvTranspose2d not in GradSampleModule.GRAD_SAMPLERS
    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] is not FAST_GRAD_SAMPLERS[nn.Conv2d]


def test_wrap_model_refuses_incompatible_models_and_modes():
    with pytest.raises(ValueError, match="(?s)not DP-compatible.*BatchNorm2d mixes samples"):
        wrap_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    with pytest.raises(ValueError, match="grad_sample_mode must be one of .* got 'ghost'"):
        wrap_model(nn.Sequential(nn.Conv2d(1, 2, 3)), "ghost")


@pytest.mark.parametrize("method", ["grouped", "one_by_one", "dense"])
@pytest.mark.parametrize("layer,shape", [
    (nn.Conv3d(2, 3, 3, padding=1, stride=2), (3, 2, 7, 6, 5)),
    (nn.Conv2d(3, 4, 3, padding=2, dilation=2), (2, 3, 9, 8)),
    (nn.ConvTranspose3d(3, 2, 3, stride=2, padding=1, output_padding=1), (2, 3, 4, 3, 5)),
], ids=["conv3d", "conv2d-dilated", "convtranspose3d"])
def test_every_weight_gradient_method_is_exact(method, layer, shape):
    """Whichever method the per-shape timing picks, the per-sample weight gradients are the same."""
    from client.privacy import _WEIGHT_GRAD_METHODS, _ConvGeometry

    torch.manual_seed(0)
    layer = layer.double()
    x = torch.randn(shape, dtype=torch.float64)
    gy = torch.randn_like(layer(x))
    expected = []
    for i in range(len(x)):
        (w,) = torch.autograd.grad((layer(x[i : i + 1]) * gy[i : i + 1]).sum(), [layer.weight])
        expected.append(w)
    transposed = isinstance(layer, nn.ConvTranspose3d)
    geo = _ConvGeometry(layer.stride, layer.padding, layer.dilation, transposed,
                        layer.output_padding if transposed else (0,) * (x.dim() - 2), layer.groups)
    got = _WEIGHT_GRAD_METHODS[method](geo, x, gy, layer.weight.shape)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-10, atol=1e-10)
