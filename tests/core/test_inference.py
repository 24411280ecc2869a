from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg_core.inference import keep_largest_component, mirror_axes, predict_probabilities


class Pointwise(torch.nn.Module):
    """A 1x1 conv: equivariant to flips, so mirror TTA must not change its output."""

    def __init__(self, dims: int):
        super().__init__()
        conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
        self.conv = conv(1, 3, 1)

    def forward(self, x):
        return self.conv(x)


def test_mirror_axes_counts():
    assert len(mirror_axes(2)) == 3 and len(mirror_axes(3)) == 7
    assert (2, 3, 4) in mirror_axes(3)


def test_probabilities_sum_to_one_and_tta_is_consistent():
    torch.manual_seed(0)
    model = Pointwise(3)
    x = torch.randn(1, 1, 20, 24, 18)
    p = predict_probabilities(model, x, (16, 16, 16), overlap=0.25)
    assert p.shape == (1, 3, 20, 24, 18)
    torch.testing.assert_close(p.sum(1), torch.ones(1, 20, 24, 18))
    p_tta = predict_probabilities(model, x, (16, 16, 16), overlap=0.25, tta=True)
    torch.testing.assert_close(p_tta, p, atol=1e-5, rtol=1e-4)


def test_2d_model_runs_slice_wise_on_a_volume():
    model = Pointwise(2)
    x = torch.randn(1, 1, 16, 16, 5)
    p = predict_probabilities(model, x, (16, 16), model_spatial_dims=2)
    assert p.shape == (1, 3, 16, 16, 5)
    # slice k of the result is the 2D model applied to slice k
    expected = torch.softmax(model(x[..., 3]), 1)
    torch.testing.assert_close(p[..., 3], expected, atol=1e-5, rtol=1e-4)


def test_roi_must_fit():
    with pytest.raises(ValueError, match="roi_size"):
        predict_probabilities(Pointwise(3), torch.randn(1, 1, 8, 8, 8), (8, 8))


def test_largest_component_keeps_the_biggest_blob_per_class():
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[2:8, 2:8, 2:8] = 1        # big organ blob
    lab[15:17, 15:17, 15:17] = 1  # small organ speck
    lab[10:12, 2:4, 2:4] = 2      # single lesion: untouched
    out = keep_largest_component(lab, [1, 2])
    assert (out[2:8, 2:8, 2:8] == 1).all() and (out[15:17, 15:17, 15:17] == 0).all()
    assert (out == 2).sum() == 8
