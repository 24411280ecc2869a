"""Seeded block masks and masked reconstruction losses (2D/3D, any number of channels)."""

from __future__ import annotations

import pytest
import torch

from pretrain.losses import (
    denormalize_patches,
    masked_mse,
    masked_patch_loss,
    masked_voxel_loss,
    normalize_patches,
    patchify,
    unpatchify,
)
from pretrain.masking import MaskGenerator, block_mask, num_masked, upsample_mask


@pytest.mark.parametrize("grid,block", [((8, 8), 1), ((8, 8, 8), 2), ((6, 10, 4), (3, 5, 2))])
def test_block_mask_masks_exactly_the_ratio_of_blocks_in_every_sample(grid, block):
    mask = block_mask(4, grid, 0.75, block, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (4, *grid) and mask.dtype == torch.bool
    blocks = torch.tensor(grid) // torch.tensor(block if isinstance(block, tuple) else (block,) * len(grid))
    k = num_masked(int(blocks.prod()), 0.75)
    per_sample = mask.flatten(1).sum(1)
    cells = int(torch.tensor(block if isinstance(block, tuple) else (block,) * len(grid)).prod())
    assert per_sample.tolist() == [k * cells] * 4
    # constant inside every block: pooling the mask over blocks gives 0 or 1 only
    pooled = torch.nn.functional.avg_pool3d(mask[:, None].float().reshape(4, 1, *grid, *([1] * (3 - len(grid)))),
                                            kernel_size=tuple(block if isinstance(block, tuple) else (block,) * len(grid))
                                            + (1,) * (3 - len(grid)))
    assert set(pooled.unique().tolist()) <= {0.0, 1.0}


def test_masks_are_seeded_and_differ_between_samples_and_seeds():
    a = MaskGenerator(0.6, 2, seed=7)(3, (8, 8, 8))
    b = MaskGenerator(0.6, 2, seed=7)(3, (8, 8, 8))
    c = MaskGenerator(0.6, 2, seed=8)(3, (8, 8, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])
    gen = MaskGenerator(0.6, 2, seed=7)
    state = gen.state_dict()
    first = gen(2, (8, 8))
    gen.load_state_dict(state)
    assert torch.equal(first, gen(2, (8, 8)))
    gen.reseed(7)
    assert torch.equal(first, gen(2, (8, 8)))


def test_edge_blocks_are_cropped_to_the_grid_and_masks_upsample_to_voxels():
    mask = block_mask(2, (5, 7), 0.5, 4, generator=torch.Generator().manual_seed(1))
    assert mask.shape == (2, 5, 7)
    voxels = upsample_mask(mask, (2, 3))
    assert voxels.shape == (2, 1, 10, 21)
    assert torch.equal(voxels[:, 0, ::2, ::3].bool(), mask)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, True, "0.5"])
def test_bad_ratios_are_refused(bad):
    with pytest.raises(ValueError, match="ratio"):
        MaskGenerator(bad)


def test_bad_mask_arguments_are_refused():
    with pytest.raises(ValueError, match="block_size"):
        MaskGenerator(0.5, 0)
    with pytest.raises(ValueError, match="block_size"):
        MaskGenerator(0.5, (2, 2, 2, 2))
    with pytest.raises(ValueError, match="seed"):
        MaskGenerator(0.5, 1, seed=1.5)
    with pytest.raises(ValueError, match="2 or 3 axes"):
        block_mask(1, (8,), 0.5)
    with pytest.raises(ValueError, match="batch_size"):
        block_mask(0, (8, 8), 0.5)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        block_mask(1, (4, 4), 0.5, 4)


@pytest.mark.parametrize("shape,patch", [((2, 1, 8, 12), (4, 3)), ((2, 2, 8, 8, 4), 2), ((1, 5, 4, 4, 4), 4)])
def test_patchify_roundtrips_for_any_channel_count(shape, patch):
    x = torch.randn(*shape)
    p = patchify(x, patch)
    size = (patch,) * (len(shape) - 2) if isinstance(patch, int) else patch
    grid = [s // q for s, q in zip(shape[2:], size, strict=False)]
    assert p.shape == (shape[0], int(torch.tensor(grid).prod()), int(torch.tensor(size).prod()) * shape[1])
    assert torch.equal(unpatchify(p, patch, grid, shape[1]), x)
    # the first token is the first patch, channel fastest
    first = x[0][(slice(None), *(slice(0, q) for q in size))]
    assert torch.equal(p[0, 0].reshape(*size, shape[1]).movedim(-1, 0), first)


def test_patchify_refuses_sizes_it_cannot_cut():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 1, 10, 8), 4)
    with pytest.raises(ValueError, match="expects"):
        patchify(torch.zeros(1, 8, 8), 4)
    with pytest.raises(ValueError, match="do not fit"):
        unpatchify(torch.zeros(1, 4, 16), 2, (2, 2), 3)


def test_loss_counts_masked_patches_only():
    torch.manual_seed(0)
    target = torch.randn(2, 6, 5)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    pred = target.clone()
    pred[~mask] += 100.0  # wrong everywhere visible: no effect
    assert masked_mse(pred, target, mask).item() == 0.0
    pred[mask] += 1.0  # off by one on every masked value
    assert masked_mse(pred, target, mask).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no patch is masked"):
        masked_mse(pred, target, torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="do not match"):
        masked_mse(pred, target[:, :5], mask)


def test_norm_pix_normalises_each_patch_and_channel():
    torch.manual_seed(0)
    image = torch.randn(2, 3, 8, 8, 8)
    image[:, 1] = image[:, 1] * 100 + 1000  # a channel on another scale (e.g. CT next to PET)
    target = patchify(image, 4)  # [B, 8, 64 * 3]
    norm = normalize_patches(target, 3).reshape(2, 8, 64, 3)
    assert torch.allclose(norm.mean(2), torch.zeros(2, 8, 3), atol=1e-5)
    assert torch.allclose(norm.var(2), torch.ones(2, 8, 3), atol=1e-3)
    assert torch.allclose(denormalize_patches(normalize_patches(target, 3), target, 3), target, rtol=1e-4, atol=1e-3)
    # the norm-pix loss ignores a per-patch affine change of the image
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :5] = True
    pred = torch.randn(2, 8, 192)
    scaled = unpatchify(target * 3.0 + 7.0, 4, (2, 2, 2), 3)
    a = masked_patch_loss(pred, image, mask, 4, norm_pix=True)
    b = masked_patch_loss(pred, scaled, mask, 4, norm_pix=True)
    assert a.item() == pytest.approx(b.item(), rel=1e-4)
    assert masked_patch_loss(pred, image, mask, 4, norm_pix=False).item() != pytest.approx(a.item(), rel=1e-2)


def test_voxel_loss_scores_the_reconstruction_on_masked_blocks():
    torch.manual_seed(0)
    image = torch.randn(1, 2, 8, 8)
    mask = torch.zeros(1, 2, 2, dtype=torch.bool)
    mask[0, 0, 1] = True  # one 4x4 block masked
    pred = image.clone()
    pred[..., :4, :4] += 5  # visible block wrong: ignored
    assert masked_voxel_loss(pred, image, mask, 4).item() == 0.0
    pred[..., :4, 4:] += 2  # the masked block (row 0, column 1)
    assert masked_voxel_loss(pred, image, mask, 4).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="differ"):
        masked_voxel_loss(pred[:, :1], image, mask, 4)
