"""compile_model: a compiled training step that survives a second model and a second batch size.

torch 2.13's automatic dynamic shapes recompiled MONAI's 3D U-Net (after a 2D one, or on the smaller last
batch of an epoch) into a graph inductor failed to lower ("ValueRangeError: Invalid ranges [0:-1]");
compile_model compiles static graphs instead. This is the failing sequence, at toy size.
"""

from __future__ import annotations

import pytest
import torch

from medseg_core.engine import compile_model
from medseg_core.models import build_model

pytestmark = pytest.mark.slow


def _unet(spatial_dims: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("unet", spatial_dims=spatial_dims, in_channels=1, out_channels=3, channels=[4, 8],
                       strides=[2], num_res_units=1, norm="instance")


def test_compiled_3d_unet_after_a_2d_one_and_with_a_smaller_batch_matches_eager():
    # Prepare: the 2D model is compiled and run first (as in bench/train_step.py)
    unet2d = _unet(2)
    compile_model(unet2d)(torch.randn(2, 1, 16, 16)).sum().backward()
    unet3d = _unet(3)
    compiled = compile_model(unet3d)
    for batch in (2, 1):  # the last batch of an epoch is smaller
        x = torch.randn(batch, 1, 16, 16, 8)
        # Execute
        out = compiled(x)
        out.sum().backward()
        # Assert: same function as the eager model, gradients reach the shared parameters
        torch.testing.assert_close(out, unet3d(x), rtol=1e-4, atol=1e-5)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in unet3d.parameters())
