"""Metrics: known answers, spacing in mm, the empty-mask convention, aggregation, batched Dice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medseg_core.metrics import (
    DICE,
    HD95,
    IOU,
    METRICS,
    NSD,
    aggregate,
    case_metrics,
    dice_per_class,
    flat_summary,
)


def _ellipsoid(shape, centre_vox, radius_mm, spacing_mm) -> np.ndarray:
    """A physical sphere of ``radius_mm`` on a grid with ``spacing_mm`` (an ellipsoid in voxels)."""
    grid = np.indices(shape).astype(np.float64)
    dist2 = sum(((grid[i] - centre_vox[i]) * spacing_mm[i]) ** 2 for i in range(len(shape)))
    return (dist2 <= radius_mm**2).astype(np.int64)


def _cubes(ndim: int):
    """Two 8-voxel cubes overlapping over 6/8 along axis 0: |A| = |B| = 8^n, |A & B| = 6 * 8^(n-1)."""
    gt = np.zeros((32,) * ndim, dtype=np.int64)
    pred = np.zeros_like(gt)
    gt[(slice(8, 16),) * ndim] = 1
    pred[(slice(10, 18),) + (slice(8, 16),) * (ndim - 1)] = 1
    return pred, gt


@pytest.mark.parametrize("ndim", [2, 3])
def test_cubes_known_overlap(ndim):
    pred, gt = _cubes(ndim)
    m = case_metrics(pred, gt, spacing_mm=(1.0,) * ndim, class_values={"lesion": 1})["lesion"]
    assert m[DICE] == pytest.approx(0.75, abs=1e-12)  # 2 * 6 / (8 + 8)
    assert m[IOU] == pytest.approx(0.6, abs=1e-12)  # 6 / 10
    assert m[HD95] == pytest.approx(2.0)  # the faces parallel to the shift are 2 voxels apart
    assert m["empty_gt"] is False and m["empty_pred"] is False
    assert m["gt_volume_mm3"] == 8.0**ndim and m["pred_volume_mm3"] == 8.0**ndim
    # Torch tensors and float label maps with integral values are accepted too.
    again = case_metrics(torch.from_numpy(pred), gt.astype(np.float32), (1.0,) * ndim, {"lesion": 1})
    assert again["lesion"][DICE] == m[DICE]


def test_sphere_shift_hd95_in_mm_with_anisotropic_spacing():
    spacing = (1.0, 1.0, 2.5)
    gt = _ellipsoid((32, 32, 32), (16, 16, 14), 10.0, spacing)
    pred = _ellipsoid((32, 32, 32), (16, 16, 16), 10.0, spacing)  # 2 voxels along z = 5 mm
    m = case_metrics(pred, gt, spacing, {"organ": 1}, nsd_tolerance_mm=1.0)["organ"]
    assert 4.0 <= m[HD95] <= 5.0 + 1e-6
    # The same voxels read with isotropic 1 mm spacing: the shift is 2 mm, not 5.
    iso = case_metrics(pred, gt, (1.0, 1.0, 1.0), {"organ": 1})["organ"]
    assert 1.5 <= iso[HD95] <= 2.0 + 1e-6
    # Shift along x (1 mm voxels) by 3 voxels = 3 mm.
    pred_x = _ellipsoid((32, 32, 32), (19, 16, 14), 10.0, spacing)
    mx = case_metrics(pred_x, gt, spacing, {"organ": 1}, nsd_tolerance_mm=3.0)["organ"]
    assert 2.5 <= mx[HD95] <= 3.0 + 1e-6


def test_surface_dice_tolerance():
    spacing = (1.0, 1.0, 2.5)
    gt = _ellipsoid((32, 32, 32), (16, 16, 16), 10.0, spacing)
    pred = _ellipsoid((32, 32, 32), (18, 16, 16), 10.0, spacing)  # 2 mm along x
    within = case_metrics(pred, gt, spacing, {"organ": 1}, nsd_tolerance_mm=2.0)["organ"]
    assert within[NSD] == pytest.approx(1.0)
    tight = case_metrics(pred, gt, spacing, {"organ": 1}, nsd_tolerance_mm=0.5)["organ"]
    assert 0.0 < tight[NSD] < 0.9
    assert case_metrics(gt, gt, spacing, {"organ": 1}, nsd_tolerance_mm=0.0)["organ"][NSD] == pytest.approx(1.0)
    # Class-wise tolerances.
    two = np.where(pred > 0, 1, 0)
    two[:4, :4, :4] = 2
    ref = np.where(gt > 0, 1, 0)
    ref[:4, :4, :4] = 2
    per = case_metrics(two, ref, spacing, {"organ": 1, "cube": 2}, nsd_tolerance_mm={"organ": 0.5, "cube": 1.0})
    assert per["organ"][NSD] == pytest.approx(tight[NSD], abs=0.05) and per["cube"][NSD] == 1.0


EMPTY_CASES = {
    # name: (gt_has_object, pred_has_object, expected overlap value, empty_gt, empty_pred)
    "both_present": (True, True, 1.0, False, False),
    "missed": (True, False, 0.0, False, True),
    "false_positive": (False, True, 0.0, True, False),
    "true_negative": (False, False, math.nan, True, True),
}


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("case", list(EMPTY_CASES))
def test_empty_mask_convention(case, ndim):
    has_gt, has_pred, overlap, empty_gt, empty_pred = EMPTY_CASES[case]
    obj = np.zeros((16,) * ndim, dtype=np.int64)
    obj[(slice(4, 9),) * ndim] = 1
    none = np.zeros_like(obj)
    m = case_metrics(obj if has_pred else none, obj if has_gt else none, (1.0,) * ndim, {"lesion": 1})["lesion"]
    assert m["empty_gt"] is empty_gt and m["empty_pred"] is empty_pred
    for metric in (DICE, IOU, NSD):
        assert m[metric] == pytest.approx(overlap, nan_ok=True), metric
    if has_gt and has_pred:
        assert m[HD95] == 0.0
    else:
        assert math.isnan(m[HD95])


def test_region_classes_and_skipping_distances():
    gt = np.zeros((16, 16, 16), dtype=np.int64)
    gt[4:8, 4:8, 4:8] = 1
    gt[8:12, 4:8, 4:8] = 2
    pred = gt.copy()
    pred[8:12, 4:8, 4:8] = 1  # class 2 labelled as 1: the region {1, 2} is still perfect
    m = case_metrics(pred, gt, (1.0, 1.0, 1.0), {"one": 1, "both": [1, 2]}, hd95=False, nsd=False)
    assert m["one"][DICE] == pytest.approx(2 * 64 / (64 + 128))
    assert m["both"][DICE] == 1.0 and m["both"][IOU] == 1.0
    assert math.isnan(m["both"][HD95]) and math.isnan(m["both"][NSD])
    agg = aggregate([m])
    assert agg["per_class"]["both"][HD95]["excluded"] == {"not_computed": 1}


@pytest.mark.parametrize(
    "pred, gt, spacing, classes, kwargs, match",
    [
        (np.zeros((4, 4), int), np.zeros((4, 5), int), (1, 1), {"a": 1}, {}, r"case c7: .*\(4, 4\).*\(4, 5\)"),
        (np.zeros((4,), int), np.zeros((4,), int), (1,), {"a": 1}, {}, "2D or 3D"),
        (np.zeros((4, 4), int), np.zeros((4, 4), int), (1, 1, 1), {"a": 1}, {}, r"spacing_mm.*\(1, 1, 1\)"),
        (np.zeros((4, 4), int), np.zeros((4, 4), int), (1, -1), {"a": 1}, {}, "positive"),
        (np.full((4, 4), 0.3), np.zeros((4, 4), int), (1, 1), {"a": 1}, {}, "integer label map"),
        (np.zeros((4, 4), int), np.zeros((4, 4), int), (1, 1), {}, {}, "class_values is empty"),
        (np.zeros((4, 4), int), np.zeros((4, 4), int), (1, 1), {"a": 1}, {"nsd_tolerance_mm": {"b": 1}}, r"\['a'\]"),
        (np.zeros((4, 4), int), np.zeros((4, 4), int), (1, 1), {"a": 1}, {"nsd_tolerance_mm": -1.0}, "-1.0"),
    ],
)
def test_case_metrics_rejects_bad_input(pred, gt, spacing, classes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        case_metrics(pred, gt, spacing, classes, case_id="c7", **kwargs)


def _case(dice, hd, empty_gt=False, empty_pred=False):
    return {DICE: dice, IOU: dice, HD95: hd, NSD: dice, "empty_gt": empty_gt, "empty_pred": empty_pred}


def test_aggregate_is_nan_aware_and_counts_exclusions():
    cases = [
        {"liver": _case(0.8, 2.0), "tumour": _case(0.5, 4.0)},
        {"liver": _case(0.6, 4.0), "tumour": _case(math.nan, math.nan, True, True)},  # true negative
        {"liver": _case(0.0, math.nan, False, True), "tumour": _case(0.0, math.nan, True, False)},
    ]
    agg = aggregate(cases)
    assert agg["num_cases"] == 3
    liver, tumour = agg["per_class"]["liver"], agg["per_class"]["tumour"]
    assert liver[DICE]["mean"] == pytest.approx(1.4 / 3) and liver[DICE]["n"] == 3
    assert liver[DICE]["n_excluded"] == 0 and liver[DICE]["excluded"] == {}
    assert liver[HD95]["mean"] == pytest.approx(3.0) and liver[HD95]["std"] == pytest.approx(1.0)
    assert liver[HD95]["excluded"] == {"pred_empty": 1}
    assert tumour[DICE]["mean"] == pytest.approx(0.25) and tumour[DICE]["n"] == 2
    assert tumour[DICE]["excluded"] == {"both_empty": 1}
    assert tumour[HD95]["mean"] == 4.0 and tumour[HD95]["n"] == 1
    assert tumour[HD95]["excluded"] == {"both_empty": 1, "gt_empty": 1} and tumour[HD95]["n_excluded"] == 2
    assert agg["mean"][DICE] == pytest.approx((1.4 / 3 + 0.25) / 2)
    assert agg["mean"][HD95] == pytest.approx((3.0 + 4.0) / 2)
    flat = flat_summary(agg)
    assert flat["dice"] == agg["mean"][DICE] and flat["dice/tumour/n"] == 2.0 and flat["hd95_mm/liver"] == 3.0


def test_aggregate_weights_missing_classes_and_empty_input():
    cases = [{"a": _case(1.0, 1.0)}, {"a": _case(0.0, 3.0), "b": _case(0.5, 1.0)}]
    agg = aggregate(cases, weights=[3.0, 1.0])
    assert agg["per_class"]["a"][DICE]["mean"] == pytest.approx(0.75)
    assert agg["per_class"]["a"][HD95]["mean"] == pytest.approx(1.5)
    assert agg["per_class"]["b"][DICE]["excluded"] == {"missing": 1}
    empty = aggregate([])
    assert empty["per_class"] == {} and all(math.isnan(empty["mean"][m]) for m in METRICS)
    with pytest.raises(ValueError, match=r"2 finite numbers >= 0, got \[1.0\]"):
        aggregate(cases, weights=[1.0])
    with pytest.raises(ValueError, match="-1"):
        aggregate(cases, weights=[1.0, -1.0])


def test_aggregate_of_real_case_metrics():
    pred, gt = _cubes(3)
    none = np.zeros_like(gt)
    cases = [case_metrics(p, g, (1.0, 1.0, 1.0), {"lesion": 1}) for p, g in [(pred, gt), (none, none), (none, gt)]]
    agg = aggregate(cases)["per_class"]["lesion"]
    assert agg[DICE]["mean"] == pytest.approx(0.375) and agg[DICE]["excluded"] == {"both_empty": 1}
    assert agg[HD95]["n"] == 1 and agg[HD95]["excluded"] == {"both_empty": 1, "pred_empty": 1}


@pytest.mark.parametrize("ndim", [2, 3])
def test_dice_per_class_matches_case_metrics(ndim):
    g = torch.Generator().manual_seed(0)
    spatial = (16,) * ndim
    target = torch.zeros(3, 1, *spatial, dtype=torch.long)
    target[0, 0][(slice(2, 9),) * ndim] = 1
    target[0, 0][(slice(9, 14),) * ndim] = 2
    target[1, 0][(slice(3, 7),) * ndim] = 1  # class 2 absent from sample 1
    logits = torch.randn(3, 3, *spatial, generator=g)
    logits[:, 1] += 3.0 * (target[:, 0] == 1)
    logits[1, 2] = -10.0  # sample 1 predicts no class 2: true negative
    logits[2] = 0.0
    logits[2, 0] = 1.0  # sample 2: all background everywhere, both empty
    dice = dice_per_class(logits, target, num_classes=3)
    assert dice.shape == (3, 2)
    labels = logits.argmax(1)
    for b in range(3):
        ref = case_metrics(labels[b], target[b, 0], (1.0,) * ndim, {"c1": 1, "c2": 2}, hd95=False, nsd=False)
        torch.testing.assert_close(
            dice[b], torch.tensor([ref["c1"][DICE], ref["c2"][DICE]], dtype=dice.dtype), equal_nan=True
        )
    assert math.isnan(dice[1, 1]) and torch.isnan(dice[2]).all()
    torch.testing.assert_close(dice_per_class(labels[:, None], target, 3), dice, equal_nan=True)


def test_dice_per_class_rejects_bad_input():
    target = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2, got 1"):
        dice_per_class(torch.zeros(2, 1, 8, 8), target, 1)
    with pytest.raises(ValueError, match="4 channels"):
        dice_per_class(torch.zeros(2, 4, 8, 8), target, 3)
    with pytest.raises(ValueError, match="differ"):
        dice_per_class(torch.zeros(2, 3, 8, 4), target, 3)
    with pytest.raises(ValueError, match="expected input"):
        dice_per_class(torch.zeros(2, 3, 8), target[..., 0], 3)
