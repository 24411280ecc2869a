"""The plain pretraining functions a federated client calls: an epoch learns, evaluation is repeatable."""

from __future__ import annotations

import math

import pytest
import torch

from medseg_core.models import tiny_config
from pretrain.engine import evaluate_pretraining, pretrain_one_epoch, reconstruction_example
from pretrain.mim import MaskedImageModel


def _smooth_images(n: int, seed: int) -> torch.Tensor:
    """Blurry blobs: the hidden blocks are predictable from the visible ones."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, 4, generator=g)
    return torch.nn.functional.interpolate(x, size=(16, 16, 16), mode="trilinear", align_corners=False)


def test_pretraining_epochs_lower_the_masked_reconstruction_loss():
    torch.manual_seed(0)
    model = MaskedImageModel({"name": "unet", "in_channels": 1, "out_channels": 3, **tiny_config("unet", 3)},
                             mask_ratio=0.5, block_size=4)
    train = [{"image": b} for b in _smooth_images(32, 0).split(4)]
    val = [{"image": b} for b in _smooth_images(8, 1).split(4)]
    device = torch.device("cpu")
    before = evaluate_pretraining(model, val, device=device, seed=5)
    assert evaluate_pretraining(model, val, device=device, seed=5)["loss"] == before["loss"]  # fixed masks
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(6):
        stats = pretrain_one_epoch(model, train, opt, device=device)
    assert stats["num_steps"] == 8 and stats["num_samples"] == 32 and math.isfinite(stats["loss"])
    after = evaluate_pretraining(model, val, device=device, seed=5)
    assert after["num_samples"] == 8
    assert after["loss"] < 0.7 * before["loss"]
    view = reconstruction_example(model, val, device=device)
    assert view.reconstruction.shape == (4, 1, 16, 16, 16) and not view.image.requires_grad


def test_a_diverging_step_is_refused_and_max_steps_is_honoured():
    model = MaskedImageModel({"name": "unet", "in_channels": 1, "out_channels": 2, **tiny_config("unet", 2)},
                             block_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [torch.randn(2, 1, 16, 16) for _ in range(5)]
    assert pretrain_one_epoch(model, batches, opt, device=torch.device("cpu"), max_steps=2)["num_steps"] == 2
    with pytest.raises(FloatingPointError, match="diverged"):
        pretrain_one_epoch(model, [torch.full((2, 1, 16, 16), float("nan"))], opt, device=torch.device("cpu"))
