"""Losses: per-sample reduction, agreement with MONAI, the U-Net weight map, deep supervision, configs."""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from monai.networks.nets import DynUNet
from omegaconf import OmegaConf

from medseg_core.losses import (
    BorderWeightedCELoss,
    CompoundLoss,
    CrossEntropyLoss,
    DeepSupervisionLoss,
    MonaiLoss,
    SegLoss,
    build_loss,
    list_losses,
    loss_arguments,
    unet_weight_map,
)

ALL_LOSSES = ["dice", "dice_ce", "dice_focal", "tversky", "generalized_dice", "border_ce", "dice_border_ce"]
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "loss"


def _batch(spatial: tuple[int, ...], batch: int = 3, classes: int = 3, seed: int = 0):
    """Random logits [B, C, *spatial] and a blobby label map [B, 1, *spatial] (all classes present)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, *spatial, generator=g)
    target = torch.zeros(batch, 1, *spatial, dtype=torch.long)
    for b in range(batch):
        for c in range(1, classes):
            lo = [int(torch.randint(0, s // 2, (1,), generator=g)) for s in spatial]
            target[(b, 0, *[slice(o, o + s // 3) for o, s in zip(lo, spatial, strict=True)])] = c
    return logits, target


def test_list_losses():
    assert list_losses() == sorted(ALL_LOSSES)
    assert "w0" in loss_arguments("border_ce") and "include_background" in loss_arguments("dice")


@pytest.mark.parametrize("spatial", [(16, 16), (12, 12, 12)], ids=["2d", "3d"])
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_reductions_and_per_sample_independence(name, spatial):
    logits, target = _batch(spatial)
    logits.requires_grad_(True)
    per_sample = build_loss(name, reduction="none")(logits, target)
    assert per_sample.shape == (3,) and torch.isfinite(per_sample).all()
    # Each sample's loss is the same alone as in the batch: nothing is pooled over the batch.
    alone = torch.stack([build_loss(name)(logits[i : i + 1], target[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(per_sample, alone, rtol=1e-5, atol=1e-6)
    mean = build_loss(name)(logits, target)
    torch.testing.assert_close(mean, per_sample.mean())
    torch.testing.assert_close(build_loss(name, reduction="sum")(logits, target), per_sample.sum())
    mean.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_per_sample_gradients_do_not_mix():
    """The gradient of sample 0's loss w.r.t. sample 1's logits is zero (per-patient DP clipping)."""
    logits, target = _batch((12, 12, 12))
    logits.requires_grad_(True)
    loss = build_loss("dice_ce", reduction="none")(logits, target)
    (grad,) = torch.autograd.grad(loss[0], logits)
    assert grad[0].abs().sum() > 0
    assert grad[1:].abs().sum() == 0


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("name", ["dice_ce", "dice_border_ce"])
def test_opacus_per_sample_gradients_match_one_at_a_time(name):
    """Opacus' per-sample gradients of our mean-reduced loss equal each patient's own gradient."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.GELU(), torch.nn.Conv3d(4, 3, 1))
    images = torch.randn(3, 1, 8, 8, 8)
    _, target = _batch((8, 8, 8))
    loss = build_loss(name)
    expected = []
    for i in range(3):
        net.zero_grad()
        loss(net(images[i : i + 1]), target[i : i + 1]).backward()
        expected.append([p.grad.clone() for p in net.parameters()])
    gsm = GradSampleModule(net, loss_reduction="mean")
    loss(gsm(images), target).backward()
    for j, p in enumerate(gsm.parameters()):
        for i in range(3):
            torch.testing.assert_close(p.grad_sample[i], expected[i][j], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("include_background", [True, False])
def test_dice_and_dice_ce_match_monai(include_background):
    logits, target = _batch((12, 12, 12))
    ours = build_loss("dice", include_background=include_background)(logits, target)
    ref = DiceLoss(include_background=include_background, to_onehot_y=True, softmax=True)(logits, target)
    torch.testing.assert_close(ours, ref)
    ours = build_loss("dice_ce", include_background=include_background, lambda_ce=0.5)(logits, target)
    ref = DiceCELoss(include_background=include_background, to_onehot_y=True, softmax=True, lambda_ce=0.5)
    torch.testing.assert_close(ours, ref(logits, target))


@pytest.mark.parametrize("name", ["dice", "dice_ce", "dice_focal", "tversky", "generalized_dice"])
def test_perfect_prediction_scores_better(name):
    _, target = _batch((12, 12, 12))
    perfect = 20.0 * F.one_hot(target[:, 0], 3).movedim(-1, 1).float()
    wrong = 20.0 * F.one_hot((target[:, 0] + 1) % 3, 3).movedim(-1, 1).float()
    loss = build_loss(name)
    assert loss(perfect, target) < 0.01
    assert loss(wrong, target) > 0.5


def test_compound_components_sum_to_loss():
    logits, target = _batch((12, 12, 12))
    loss = build_loss("dice_ce", lambda_dice=2.0, lambda_ce=0.5, reduction="none")
    parts = loss.components(logits, target)
    assert set(parts) == {"dice", "ce"}
    torch.testing.assert_close(loss(logits, target), 2.0 * parts["dice"] + 0.5 * parts["ce"])
    torch.testing.assert_close(parts["ce"], F.cross_entropy(logits, target[:, 0], reduction="none").mean((1, 2, 3)))


# ------------------------------------------------------------------ U-Net weight map


def _two_blobs_2d(gap: int = 2) -> np.ndarray:
    lab = np.zeros((48, 48), dtype=np.int64)
    lab[16:32, 8:22] = 1
    lab[16:32, 22 + gap : 36 + gap] = 1
    return lab


def test_weight_map_peaks_in_the_gap_2d():
    lab = _two_blobs_2d(gap=2)
    w = unet_weight_map(lab, w0=10.0, sigma=5.0)
    assert w.shape == lab.shape and w.dtype == np.float32
    peak = np.unravel_index(np.argmax(w), w.shape)
    assert 16 <= peak[0] < 32 and peak[1] in (22, 23)  # in the 2-pixel gap between the blobs
    assert lab[peak] == 0
    assert w[peak] > w[lab == 1].max()  # higher than any object voxel
    assert w[peak] > w[0, 0] + 5.0 and w[0, 0] < w[24, 22]  # far background is low
    # The border term decays with the distance between objects.
    assert unet_weight_map(_two_blobs_2d(gap=8)).max() < w.max() - 3.0


def test_weight_map_peaks_in_the_gap_3d():
    lab = np.zeros((32, 32, 32), dtype=np.int64)
    lab[8:24, 8:24, 4:14] = 1
    lab[8:24, 8:24, 16:26] = 2  # a different class across a 2-voxel gap at z = 14, 15
    w = unet_weight_map(lab, spacing_mm=(1.0, 1.0, 1.0))
    peak = np.unravel_index(np.argmax(w), w.shape)
    assert lab[peak] == 0 and peak[2] in (14, 15) and 8 <= peak[0] < 24
    assert w[peak] > w[lab > 0].max()
    assert w[peak] > w[0, 0, 0] + 5.0


def test_weight_map_components_classes_and_spacing():
    lab = _two_blobs_2d(gap=3)
    # Distances in mm: doubling the spacing and sigma gives the same map.
    np.testing.assert_allclose(
        unet_weight_map(lab, sigma=5.0), unet_weight_map(lab, sigma=10.0, spacing_mm=(2.0, 2.0)), rtol=1e-5
    )
    # Anisotropic spacing across the gap (axis 1) widens it physically: lower peak.
    assert unet_weight_map(lab, spacing_mm=(1.0, 3.0)).max() < unet_weight_map(lab).max() - 1.0
    # Class balance: mean 1, rare class weighted up; one object -> no border term.
    single = np.zeros((20, 20), dtype=np.int64)
    single[5:10, 5:10] = 1
    w = unet_weight_map(single)
    assert w.mean() == pytest.approx(1.0, rel=1e-5)
    assert w[7, 7] == pytest.approx(400 / (2 * 25))
    assert len(np.unique(w)) == 2
    np.testing.assert_array_equal(unet_weight_map(single, class_balance=False), np.ones((20, 20)))
    # Without class balance, w0=0 is all ones even with two objects.
    np.testing.assert_array_equal(unet_weight_map(lab, w0=0.0, class_balance=False), np.ones(lab.shape))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"w0": -1.0}, "w0"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -2.0}, "sigma"),
        ({"spacing_mm": (1.0,)}, "spacing_mm"),
        ({"spacing_mm": (1.0, 0.0)}, "spacing_mm"),
    ],
)
def test_weight_map_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        unet_weight_map(_two_blobs_2d(), **kwargs)


def test_weight_map_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"2D or 3D.*\(1, 4, 4, 4\)"):
        unet_weight_map(np.zeros((1, 4, 4, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        unet_weight_map(np.full((4, 4), 0.5))


def test_border_ce_uses_weight_map():
    logits, target = _batch((24, 24), batch=2, classes=2)
    target[:, 0] = torch.from_numpy(_two_blobs_2d(gap=2)[12:36, 4:28])
    loss = BorderWeightedCELoss(reduction="none")
    computed = loss(logits, target)
    maps = torch.from_numpy(np.stack([unet_weight_map(t[0].numpy()) for t in target]))
    torch.testing.assert_close(loss(logits, target, weight_map=maps), computed)
    torch.testing.assert_close(loss(logits, target, weight_map=maps[:, None]), computed)
    ce = F.cross_entropy(logits, target[:, 0], reduction="none")
    torch.testing.assert_close(computed, (ce * maps).mean(dim=(1, 2)))
    # w0 = 0 and no class balance: plain cross-entropy.
    plain = BorderWeightedCELoss(w0=0.0, class_balance=False)(logits, target)
    torch.testing.assert_close(plain, F.cross_entropy(logits, target[:, 0]))
    with pytest.raises(ValueError, match="weight_map shape"):
        loss(logits, target, weight_map=maps[:, :10])


# ------------------------------------------------------------------ deep supervision


def test_deep_supervision_hand_made_outputs():
    g = torch.Generator().manual_seed(1)
    _, target = _batch((16, 16, 16), batch=2)
    outputs = [torch.randn(2, 3, s, s, s, generator=g) for s in (16, 8, 4)]
    ds = build_loss("dice_ce", deep_supervision=True, reduction="none")
    assert isinstance(ds, DeepSupervisionLoss)
    base = build_loss("dice_ce", reduction="none")
    # nearest-exact downsampling by 2 and 4 picks the voxel centres 1::2 and 2::4 (written out by hand).
    expected = (
        1.0 * base(outputs[0], target)
        + 0.5 * base(outputs[1], target[:, :, 1::2, 1::2, 1::2])
        + 0.25 * base(outputs[2], target[:, :, 2::4, 2::4, 2::4])
    )
    torch.testing.assert_close(ds(outputs, target), expected)
    torch.testing.assert_close(ds(tuple(outputs), target), expected)
    # Mean reduction is the mean of the per-sample values; "same" weights are all 1.
    mean = build_loss("dice_ce", deep_supervision=True)(outputs, target)
    torch.testing.assert_close(mean, expected.mean())
    same = build_loss("dice_ce", deep_supervision=True, ds_weight_mode="same", reduction="none")
    torch.testing.assert_close(
        same(outputs, target),
        base(outputs[0], target)
        + base(outputs[1], target[:, :, 1::2, 1::2, 1::2])
        + base(outputs[2], target[:, :, 2::4, 2::4, 2::4]),
    )
    explicit = build_loss("dice", deep_supervision=True, ds_weights=[1.0, 0.0, 0.0], reduction="none")
    torch.testing.assert_close(explicit(outputs, target), build_loss("dice", reduction="none")(outputs[0], target))
    # A single tensor is the plain loss.
    torch.testing.assert_close(ds(outputs[0], target), base(outputs[0], target))


def test_deep_supervision_weights():
    ds = DeepSupervisionLoss(build_loss("dice"), weight_mode="exp")
    assert ds.level_weights(6) == [1.0, 0.5, 0.25, 0.125, 0.0625, 0.0625]
    assert DeepSupervisionLoss(build_loss("dice"), weight_mode="two").level_weights(3) == [1.0, 0.5, 0.5]
    assert DeepSupervisionLoss(build_loss("dice"), weights=[1, 0.3, 0.1, 9]).level_weights(3) == [1.0, 0.3, 0.1]
    with pytest.raises(ValueError, match="3 deep-supervision outputs but only 2 weights"):
        DeepSupervisionLoss(build_loss("dice"), weights=[1, 0.3]).level_weights(3)


def test_deep_supervision_with_dynunet_stacked_output():
    torch.manual_seed(0)
    net = DynUNet(
        spatial_dims=3, in_channels=1, out_channels=3, kernel_size=[3, 3, 3], strides=[1, 2, 2],
        upsample_kernel_size=[2, 2], filters=[4, 8, 8], deep_supervision=True, deep_supr_num=1,
    )
    net.train()
    _, target = _batch((16, 16, 16), batch=2)
    out = net(torch.randn(2, 1, 16, 16, 16))  # [B, S, C, *spatial], heads upsampled to full size
    assert out.shape == (2, 2, 3, 16, 16, 16)
    ds = build_loss("dice_ce", deep_supervision=True, reduction="none")
    base = build_loss("dice_ce", reduction="none")
    expected = base(out[:, 0], target) + 0.5 * base(out[:, 1], target)
    torch.testing.assert_close(ds(out, target), expected)
    ds.reduction = "mean"
    ds(out, target).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_deep_supervision_border_ce_downsamples_the_full_resolution_map():
    _, target = _batch((16, 16), batch=2, classes=2)
    g = torch.Generator().manual_seed(2)
    outputs = [torch.randn(2, 2, 16, 16, generator=g), torch.randn(2, 2, 8, 8, generator=g)]
    ds = build_loss("border_ce", deep_supervision=True, reduction="none")
    maps = BorderWeightedCELoss().compute_weight_map(target)  # [B, 16, 16]
    ce0 = F.cross_entropy(outputs[0], target[:, 0], reduction="none")
    ce1 = F.cross_entropy(outputs[1], target[:, 0, 1::2, 1::2], reduction="none")
    expected = (ce0 * maps).mean((1, 2)) + 0.5 * (ce1 * maps[:, 1::2, 1::2]).mean((1, 2))
    torch.testing.assert_close(ds(outputs, target), expected)
    torch.testing.assert_close(ds(outputs, target, weight_map=maps), expected)


def test_deep_supervision_rejects_bad_input():
    _, target = _batch((8, 8), batch=1)
    ds = build_loss("dice", deep_supervision=True)
    with pytest.raises(ValueError, match="larger than the target"):
        ds([torch.randn(1, 3, 16, 16)], target)
    with pytest.raises(ValueError, match="empty list"):
        ds([], target)


# ------------------------------------------------------------------ argument checks


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("nope", {}, "'nope'"),
        ("dice", {"reduction": "avg"}, "'avg'"),
        ("dice", {"w0": 1.0}, r"unknown argument\(s\) \['w0'\]"),
        ("border_ce", {"w0": -1.0}, "w0 must be .* -1.0"),
        ("border_ce", {"sigma": 0.0}, "sigma must be > 0, got 0.0"),
        ("border_ce", {"spacing_mm": [1.0, -1.0]}, "spacing_mm"),
        ("dice_border_ce", {"sigma": -1.0}, "sigma"),
        ("dice_ce", {"lambda_ce": -0.5}, "-0.5"),
        ("dice_ce", {"label_smoothing": 1.5}, "1.5"),
        ("dice_focal", {"gamma": -1.0}, "gamma"),
        ("tversky", {"alpha": -0.1}, "alpha"),
        ("generalized_dice", {"w_type": "cubic"}, "'cubic'"),
        ("dice", {"deep_supervision": True, "ds_weight_mode": "segments"}, "'segments'"),
        ("dice", {"deep_supervision": True, "ds_weights": [1.0, -1.0]}, "-1.0"),
        ("dice", {"deep_supervision": True, "ds_weights": []}, r"\[\]"),
    ],
)
def test_build_loss_rejects_bad_arguments(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_loss(name, **kwargs)


def test_classes_reject_bad_arguments():
    with pytest.raises(ValueError, match="reduction='none'"):
        MonaiLoss(DiceLoss(to_onehot_y=True, softmax=True))
    with pytest.raises(ValueError, match="batch=False"):
        MonaiLoss(DiceLoss(to_onehot_y=True, softmax=True, reduction="none", batch=True))
    with pytest.raises(ValueError, match="'max'"):
        CrossEntropyLoss(reduction="max")
    with pytest.raises(ValueError, match="at least one term"):
        CompoundLoss({})
    with pytest.raises(ValueError, match="SegLoss"):
        CompoundLoss({"dice": (DiceLoss(), 1.0)})
    with pytest.raises(ValueError, match="SegLoss"):
        DeepSupervisionLoss(DiceLoss())


def test_loss_rejects_mismatched_shapes():
    logits, target = _batch((8, 8, 8), batch=2)
    loss = build_loss("dice_ce")
    with pytest.raises(ValueError, match=r"\[B, 1, \*spatial\]"):
        loss(logits, target[:, 0])
    with pytest.raises(ValueError, match="does not match"):
        loss(logits, target[:, :, :4])


# ------------------------------------------------------------------ configs


def test_every_loss_config_instantiates():
    files = sorted(CONFIG_DIR.glob("*.yaml"))
    names = {f.stem for f in files}
    assert {"dice", "dice_ce", "dice_focal", "tversky", "generalized_dice", "border_ce"} <= names
    logits, target = _batch((8, 8, 8), batch=2)
    for path in files:
        cfg = OmegaConf.load(path)
        assert cfg._target_ == "medseg_core.losses.build_loss" and cfg.deep_supervision is False
        loss = hydra.utils.instantiate(cfg)
        assert isinstance(loss, SegLoss), path
        assert torch.isfinite(loss(logits, target)), path
        cfg.deep_supervision = True
        assert isinstance(hydra.utils.instantiate(cfg), DeepSupervisionLoss), path


def test_ignore_empty_dice_covers_only_the_classes_present_in_each_sample():
    """A class absent from a sample's ground truth adds nothing (and no gradient) to its overlap term,
    so a rarely present class is not driven to zero probability; per-sample values stay per sample."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    target[0, 0, 2:5, 2:5] = 1          # sample 0: class 1 only
    target[1, 0, 1:3, 1:3] = 1          # sample 1: classes 1 and 2
    target[1, 0, 5:7, 5:7] = 2
    plain = build_loss("dice", reduction="none")
    present = build_loss("dice", reduction="none", ignore_empty=True)
    per_class = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, reduction="none")(logits, target)
    per_class = per_class.reshape(2, 2)
    out = present(logits, target)
    torch.testing.assert_close(out[0], per_class[0, 0])            # class 2 absent: not averaged in
    torch.testing.assert_close(out[1], per_class[1].mean())        # both present: the plain mean
    torch.testing.assert_close(plain(logits, target)[1], out[1])
    out[0].backward()
    assert logits.grad[0, 2].abs().sum() > 0  # class 2 logits still move through the softmax of class 1...
    logits.grad = None
    empty = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    assert float(present(logits[:1], empty)) == 0.0  # no foreground class at all: no overlap term
    assert float(build_loss("dice_ce", ignore_empty=True)(logits[:1], empty)) > 0  # CE still penalises
