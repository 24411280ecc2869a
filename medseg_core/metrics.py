"""Segmentation metrics per case and per class, their aggregation, and a fast batched Dice.

Metrics (names are the constants below): ``dice``, ``iou``, ``hd95_mm`` (95th-percentile symmetric
Hausdorff distance in mm) and ``nsd`` (normalised surface Dice at a tolerance in mm). The values come
from MONAI's ``compute_dice``, ``compute_iou``, ``compute_hausdorff_distance(percentile=95)`` and
``compute_surface_dice``, always with the voxel spacing, on binary masks of each class. MONAI's HD95 is
``max(P95(d(pred -> gt)), P95(d(gt -> pred)))`` over boundary voxels, which is what is reported here.

Empty masks: our convention
---------------------------
MONAI's own outputs for empty masks depend on flags (``ignore_empty``) and differ between metrics, so
each case/class is classified first and the convention below is applied explicitly. It follows
nnU-Net (and the Metrics Reloaded advice to report such cases rather than hide them):

============================  ======================  ==========  ===============================
ground truth / prediction     dice, iou, nsd          hd95_mm     reason recorded when NaN
============================  ======================  ==========  ===============================
non-empty / non-empty         computed                computed    -
non-empty / empty (missed)    0                       NaN         ``pred_empty``
empty / non-empty (false +)   0                       NaN         ``gt_empty``
empty / empty (true negative) NaN                     NaN         ``both_empty``
============================  ======================  ==========  ===============================

So a true-negative case is *excluded* from the overlap means (it says nothing about overlap), a false
positive on an empty scan counts as 0, and HD95 is undefined (excluded) whenever either mask is empty.
Every case carries ``empty_gt`` / ``empty_pred`` flags, and :func:`aggregate` reports, for every class
and metric, how many cases were excluded and why, so nothing is scored silently.

Aggregation (:func:`aggregate`) is NaN-aware: per class the (optionally case-weighted) mean, std,
median and count ``n`` of defined values; ``mean`` is the mean over foreground classes of the per-class
means (nnU-Net's "foreground mean"), ignoring classes with no defined value.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou, compute_surface_dice
from monai.networks.utils import one_hot

DICE = "dice"
IOU = "iou"
HD95 = "hd95_mm"
NSD = "nsd"
METRICS = (DICE, IOU, HD95, NSD)
EMPTY_GT = "empty_gt"
EMPTY_PRED = "empty_pred"
GT_VOLUME = "gt_volume_mm3"
PRED_VOLUME = "pred_volume_mm3"
# Why a metric is NaN for a case (keys of aggregate()'s "excluded").
BOTH_EMPTY = "both_empty"
GT_ONLY_EMPTY = "gt_empty"
PRED_ONLY_EMPTY = "pred_empty"
NOT_COMPUTED = "not_computed"


def _as_label_array(x: np.ndarray | torch.Tensor, what: str, where: str) -> np.ndarray:
    """An integer numpy label map from an array or tensor; rejects probabilities."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype == bool or np.issubdtype(x.dtype, np.integer):
        return x
    if not np.issubdtype(x.dtype, np.floating) or not np.array_equal(x, np.round(x)):
        raise ValueError(
            f"{where}: {what} must be an integer label map (argmax of the prediction), got dtype {x.dtype} "
            "with non-integer values"
        )
    return x.astype(np.int64)


def _class_mask(labels: np.ndarray, values: int | Sequence[int]) -> np.ndarray:
    """Binary mask of a class (one label value) or a region (several values, e.g. BraTS whole tumour)."""
    if isinstance(values, (int, np.integer)):
        return labels == values
    return np.isin(labels, list(values))


def _tolerances(nsd_tolerance_mm: float | Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    if isinstance(nsd_tolerance_mm, Mapping):
        missing = [n for n in names if n not in nsd_tolerance_mm]
        if missing:
            raise ValueError(f"nsd_tolerance_mm has no tolerance for class(es) {missing}")
        tol = {n: float(nsd_tolerance_mm[n]) for n in names}
    else:
        tol = {n: float(nsd_tolerance_mm) for n in names}
    bad = {n: t for n, t in tol.items() if not math.isfinite(t) or t < 0}
    if bad:
        raise ValueError(f"nsd_tolerance_mm must be >= 0, got {bad}")
    return tol


def case_metrics(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    spacing_mm: Sequence[float],
    class_values: Mapping[str, int | Sequence[int]],
    nsd_tolerance_mm: float | Mapping[str, float] = 1.0,
    hd95: bool = True,
    nsd: bool = True,
    case_id: str | None = None,
) -> dict[str, dict[str, float | bool]]:
    """Dice, IoU, HD95 (mm) and surface Dice of one case, per foreground class.

    Args:
        pred: predicted label map ``[H, W]`` or ``[H, W, D]`` (integers; a float array is accepted when
            its values are integral, e.g. from ``nibabel``'s ``get_fdata``).
        gt: ground-truth label map, same shape.
        spacing_mm: voxel spacing per axis, in mm.
        class_values: foreground class name -> label value (or list of values, for a region).
        nsd_tolerance_mm: surface-Dice tolerance in mm, one for all classes or a dict per class name.
        hd95: compute HD95 (a distance transform per class; ``False`` reports NaN, reason
            ``not_computed``).
        nsd: compute the surface Dice (likewise).
        case_id: used in error messages.

    Returns:
        ``{class_name: {"dice", "iou", "hd95_mm", "nsd": float, "empty_gt", "empty_pred": bool,
        "gt_volume_mm3", "pred_volume_mm3": float}}``, with the empty-mask convention of the module
        docstring.

    Raises:
        ValueError: shapes differ, not 2D/3D, ``spacing_mm`` of the wrong length or not positive,
            non-integer labels, no classes, bad tolerances.
    """
    where = f"case {case_id}" if case_id is not None else "case"
    pred = _as_label_array(pred, "prediction", where)
    gt = _as_label_array(gt, "ground truth", where)
    if pred.shape != gt.shape:
        raise ValueError(f"{where}: prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"{where}: label maps must be 2D or 3D (no batch/channel axis), got shape {pred.shape}")
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != pred.ndim or any(not math.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"{where}: spacing_mm must be {pred.ndim} positive numbers, got {tuple(spacing_mm)}")
    if not class_values:
        raise ValueError(f"{where}: class_values is empty; give at least one foreground class")
    names = list(class_values)
    tolerance = _tolerances(nsd_tolerance_mm, names)
    voxel_mm3 = float(np.prod(spacing))

    pred_masks = np.stack([_class_mask(pred, class_values[n]) for n in names])  # [K, *spatial]
    gt_masks = np.stack([_class_mask(gt, class_values[n]) for n in names])
    axes = tuple(range(1, pred_masks.ndim))
    pred_voxels, gt_voxels = pred_masks.sum(axis=axes), gt_masks.sum(axis=axes)  # [K]
    y_pred = torch.from_numpy(pred_masks[None]).double()  # [1, K, *spatial]; float64 so Dice/IoU are exact
    y = torch.from_numpy(gt_masks[None]).double()

    dice = compute_dice(y_pred, y, include_background=True, ignore_empty=False)[0].tolist()  # [K]
    iou = compute_iou(y_pred, y, include_background=True, ignore_empty=False)[0].tolist()
    both = [k for k in range(len(names)) if pred_voxels[k] > 0 and gt_voxels[k] > 0]
    hd = dict.fromkeys(range(len(names)), math.nan)
    sd = dict.fromkeys(range(len(names)), math.nan)
    if both and (hd95 or nsd):
        idx = torch.tensor(both)
        with warnings.catch_warnings():
            # MONAI 1.5+ passes its own deprecated argument internally; not our call to fix.
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            if hd95:
                values = compute_hausdorff_distance(
                    y_pred[:, idx], y[:, idx], include_background=True, percentile=95, spacing=list(spacing)
                )[0].tolist()
                hd.update(zip(both, values, strict=True))
            if nsd:
                values = compute_surface_dice(
                    y_pred[:, idx], y[:, idx], class_thresholds=[tolerance[names[k]] for k in both],
                    include_background=True, spacing=list(spacing),
                )[0].tolist()
                sd.update(zip(both, values, strict=True))

    result: dict[str, dict[str, float | bool]] = {}
    for k, name in enumerate(names):
        empty_gt, empty_pred = bool(gt_voxels[k] == 0), bool(pred_voxels[k] == 0)
        if empty_gt and empty_pred:
            overlap = {DICE: math.nan, IOU: math.nan, NSD: math.nan}
        elif empty_gt or empty_pred:
            overlap = {DICE: 0.0, IOU: 0.0, NSD: 0.0}  # by convention, nothing to compute
        else:
            overlap = {DICE: float(dice[k]), IOU: float(iou[k]), NSD: float(sd[k])}
        result[name] = {
            DICE: overlap[DICE],
            IOU: overlap[IOU],
            HD95: float(hd[k]),
            NSD: overlap[NSD],
            EMPTY_GT: empty_gt,
            EMPTY_PRED: empty_pred,
            GT_VOLUME: float(gt_voxels[k]) * voxel_mm3,
            PRED_VOLUME: float(pred_voxels[k]) * voxel_mm3,
        }
    return result


def _nan_reason(entry: Mapping[str, Any]) -> str:
    empty_gt, empty_pred = bool(entry.get(EMPTY_GT, False)), bool(entry.get(EMPTY_PRED, False))
    if empty_gt and empty_pred:
        return BOTH_EMPTY
    if empty_gt:
        return GT_ONLY_EMPTY
    if empty_pred:
        return PRED_ONLY_EMPTY
    return NOT_COMPUTED


def _summary(values: np.ndarray, weights: np.ndarray) -> dict[str, float | int]:
    """Weighted mean/std (population), median and count of the finite ``values``."""
    ok = np.isfinite(values) & (weights > 0)
    if not ok.any():
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "n": 0}
    v, w = values[ok], weights[ok]
    mean = float(np.sum(w * v) / np.sum(w))
    std = float(math.sqrt(np.sum(w * (v - mean) ** 2) / np.sum(w)))
    return {"mean": mean, "std": std, "median": float(np.median(v)), "n": int(ok.sum())}


def aggregate(
    cases: Sequence[Mapping[str, Mapping[str, Any]]],
    weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Aggregate :func:`case_metrics` results over cases, NaN-aware.

    Args:
        cases: one ``case_metrics`` dict per case (classes missing from a case count as excluded,
            reason ``missing``).
        weights: optional non-negative weight per case (e.g. to pool sites); default 1 each.

    Returns:
        ``{"per_class": {class: {metric: {"mean", "std", "median", "n", "n_excluded",
        "excluded": {reason: count}}}}, "mean": {metric: mean over classes of the class means},
        "num_cases": int}``. ``std`` is the (weighted) population standard deviation. With no cases,
        ``per_class`` is empty and every ``mean`` is NaN.

    Raises:
        ValueError: ``weights`` of the wrong length, negative or not finite.
    """
    n_cases = len(cases)
    if weights is None:
        w = np.ones(n_cases)
    else:
        w = np.asarray(list(weights), dtype=np.float64)
        if w.shape != (n_cases,) or not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"weights must be {n_cases} finite numbers >= 0, got {list(weights)}")
    class_names: list[str] = []
    for case in cases:
        class_names.extend(n for n in case if n not in class_names)

    per_class: dict[str, dict[str, Any]] = {}
    for name in class_names:
        per_class[name] = {}
        for metric in METRICS:
            values = np.full(n_cases, math.nan)
            excluded: dict[str, int] = {}
            for i, case in enumerate(cases):
                entry = case.get(name)
                value = math.nan if entry is None else float(entry.get(metric, math.nan))
                values[i] = value
                if not math.isfinite(value):
                    reason = "missing" if entry is None else _nan_reason(entry)
                    excluded[reason] = excluded.get(reason, 0) + 1
            summary = _summary(values, w)
            summary["n_excluded"] = sum(excluded.values())
            summary["excluded"] = excluded
            per_class[name][metric] = summary

    mean: dict[str, float] = {}
    for metric in METRICS:
        class_means = [per_class[n][metric]["mean"] for n in class_names]
        finite = [m for m in class_means if math.isfinite(m)]
        mean[metric] = float(np.mean(finite)) if finite else math.nan
    return {"per_class": per_class, "mean": mean, "num_cases": n_cases}


def flat_summary(aggregated: Mapping[str, Any]) -> dict[str, float]:
    """Flatten :func:`aggregate` output to scalars for logs and history files.

    Keys: ``"{metric}"`` (foreground mean), ``"{metric}/{class}"`` (class mean) and
    ``"{metric}/{class}/n"`` (number of cases behind that mean).
    """
    flat: dict[str, float] = {m: float(v) for m, v in aggregated.get("mean", {}).items()}
    for name, metrics in aggregated.get("per_class", {}).items():
        for metric, summary in metrics.items():
            flat[f"{metric}/{name}"] = float(summary["mean"])
            flat[f"{metric}/{name}/n"] = float(summary["n"])
    return flat


def dice_per_class(logits_or_labels: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Batched hard Dice per sample and foreground class, on the input's device (for validation).

    Same empty-mask convention as :func:`case_metrics`: NaN when a class is absent from both the
    prediction and the target, 0 when it is absent from only one. Use ``torch.nanmean`` to average.

    Args:
        logits_or_labels: logits/probabilities ``[B, C, *spatial]`` with ``C == num_classes`` (argmax is
            taken), or a label map ``[B, 1, *spatial]``.
        target: label map ``[B, 1, *spatial]``.
        num_classes: number of classes including background (``>= 2``).

    Returns:
        ``[B, num_classes - 1]`` Dice of classes ``1..num_classes-1``.

    Raises:
        ValueError: ``num_classes < 2``, or shapes that do not fit the above.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    x = logits_or_labels
    if x.dim() not in (4, 5) or target.dim() != x.dim() or target.shape[1] != 1:
        raise ValueError(
            f"expected input [B, C, *spatial] and target [B, 1, *spatial] (2D or 3D), got "
            f"{tuple(x.shape)} and {tuple(target.shape)}"
        )
    if x.shape[0] != target.shape[0] or x.shape[2:] != target.shape[2:]:
        raise ValueError(f"input {tuple(x.shape)} and target {tuple(target.shape)} differ in batch or spatial size")
    if x.shape[1] == num_classes:
        labels = x.argmax(dim=1, keepdim=True)
    elif x.shape[1] == 1:
        labels = x.long()
    else:
        raise ValueError(f"input has {x.shape[1]} channels; expected {num_classes} (logits) or 1 (labels)")
    pred_1h = one_hot(labels, num_classes=num_classes)  # [B, C, *spatial]
    gt_1h = one_hot(target.long(), num_classes=num_classes)
    dice = compute_dice(pred_1h, gt_1h, include_background=False, ignore_empty=False)  # [B, C-1]
    dims = tuple(range(2, pred_1h.dim()))
    both_empty = (pred_1h[:, 1:].sum(dim=dims) == 0) & (gt_1h[:, 1:].sum(dim=dims) == 0)
    return dice.masked_fill(both_empty, math.nan)
