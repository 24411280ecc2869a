"""Post-processing of label maps chosen on validation cases: drop small connected components per class.

nnU-Net decides its post-processing empirically: a step is kept only if it improves the validation
Dice. Here the step is "remove the connected components of class *c* smaller than *s* mm³", with *s*
chosen per class from a list of candidates on the validation predictions (0 = keep everything, the
default unless a larger size is strictly better). Sizes are in mm³, so one choice applies to any voxel
grid (the plan's during evaluation, the scan's own in ``medseg-predict``). No size above the class's
smallest true structure in the training labels is tried: nine validation patients can otherwise pick a
size that deletes real small lesions in the next patient.

A removed component takes, voxel by voxel, the label of the nearest voxel of another class, so a
spurious lesion speck inside the organ becomes organ again rather than a hole (one distance transform
per class, however many components are removed: an untrained model's noise has thousands).

Ours: MONAI's ``RemoveSmallObjects`` drops objects to background and has no per-class choice on
validation data; scipy's ``ndimage.label`` does the labelling.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

#: component sizes tried per class (mm³); 0 keeps every component
DEFAULT_CANDIDATES_MM3: tuple[float, ...] = (0.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)
#: the largest size tried for a class, as a fraction of its smallest true structure in the labelled data: a
#: size above the smallest real lesion deletes real lesions of that size (0.5 leaves a margin for
#: under-segmentation; on the synthetic federation it also keeps every false speck, see docs/benchmarks.md)
SAFE_FRACTION_OF_SMALLEST = 1.0


def remove_small_components(label_map: np.ndarray, class_value: int, min_size_mm3: float,
                            spacing_mm: Sequence[float]) -> np.ndarray:
    """Components of ``class_value`` smaller than ``min_size_mm3`` relabelled with their surroundings.

    Args:
        label_map: integer labels ``[X, Y(, Z)]``.
        class_value: the label whose components are filtered.
        min_size_mm3: components with a smaller volume (voxel count x voxel volume) are removed.
        spacing_mm: voxel spacing, one value per axis of ``label_map``.

    Returns:
        A new label map (the input is not modified).

    Raises:
        ValueError: negative size, or ``spacing_mm`` that does not match the map's dimensions.
    """
    if min_size_mm3 < 0:
        raise ValueError(f"min_size_mm3 must be >= 0, got {min_size_mm3}")
    if len(spacing_mm) != label_map.ndim or any(not s > 0 for s in spacing_mm):
        raise ValueError(f"spacing_mm {tuple(spacing_mm)} does not fit a {label_map.ndim}-D label map")
    out = np.array(label_map, copy=True)
    if min_size_mm3 == 0:
        return out
    mask = out == class_value
    components, n = ndimage.label(mask)
    if n == 0:
        return out
    voxel_mm3 = float(np.prod(spacing_mm))
    small_ids = np.zeros(n + 1, dtype=bool)
    small_ids[1:] = np.bincount(components.ravel(), minlength=n + 1)[1:] * voxel_mm3 < min_size_mm3  # [n + 1]
    small = small_ids[components]
    if small.all():  # nothing else in the map to take a label from
        out[small] = 0
    elif small.any():  # every removed voxel takes the label of the nearest voxel of another class (one pass)
        _, nearest = ndimage.distance_transform_edt(mask, return_indices=True)  # [3, X, Y, Z]
        out[small] = out[tuple(ix[small] for ix in nearest)]
    return out


@dataclass
class PostProcessing:
    """Per-class minimum component sizes (mm³) to apply to label maps.

    Attributes:
        min_size_mm3: class value -> minimum component volume; classes not listed are left alone.
        chosen_on: what the choice was based on (e.g. validation Dice before/after per class).
    """

    min_size_mm3: dict[int, float] = field(default_factory=dict)
    chosen_on: dict[str, Any] = field(default_factory=dict)

    def __call__(self, label_map: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
        """Apply every class's filter to ``label_map`` (``[X, Y(, Z)]``) with voxels of ``spacing_mm``."""
        out = label_map
        for value, size in sorted(self.min_size_mm3.items()):
            out = remove_small_components(out, int(value), float(size), spacing_mm)
        return out

    @property
    def active(self) -> bool:
        """Whether any class is filtered."""
        return any(size > 0 for size in self.min_size_mm3.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe form (stored in checkpoints and ``history.json``)."""
        return {"min_size_mm3": {str(k): float(v) for k, v in self.min_size_mm3.items()}, "chosen_on": self.chosen_on}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PostProcessing:
        """Inverse of :meth:`as_dict` (``None`` or empty: no post-processing).

        Raises:
            ValueError: a size that is not a non-negative number.
        """
        sizes = dict((data or {}).get("min_size_mm3") or {})
        parsed = {}
        for k, v in sizes.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"post-processing: min_size_mm3 of class {k} must be a number >= 0, got {v!r}")
            parsed[int(k)] = float(v)
        return cls(parsed, dict((data or {}).get("chosen_on") or {}))


def smallest_structures_mm3(label_maps: Iterable[tuple[np.ndarray, Sequence[float]]],
                            class_values: Mapping[str, int]) -> dict[str, float]:
    """The volume of the smallest connected component of each class over some ground-truth label maps.

    Components are counted as :func:`remove_small_components` counts them (face connectivity).

    Args:
        label_maps: ``(label map, spacing_mm)`` pairs, e.g. every labelled training case.
        class_values: foreground class name -> label value.

    Returns:
        class name -> smallest component volume in mm³; classes that never occur are left out.
    """
    smallest: dict[str, float] = {}
    for label_map, spacing in label_maps:
        label_map = np.asarray(label_map)
        voxel_mm3 = float(np.prod(spacing))
        for name, value in class_values.items():
            components, n = ndimage.label(label_map == value)
            if n:
                volume = float(np.bincount(components.ravel())[1:].min()) * voxel_mm3
                smallest[name] = min(volume, smallest.get(name, math.inf))
    return smallest


def _class_dice(cases: Sequence[tuple[np.ndarray, np.ndarray, Sequence[float]]], name: str, value: int) -> float:
    """Mean Dice of one class over cases, with :mod:`medseg_core.metrics`' empty-mask convention (both
    empty: excluded; one empty: 0). Counted with NumPy here: the choice scores every candidate size on
    every case, and the full metric suite per call made it ~30 s for 9 noisy 64³ cases."""
    scores = []
    for pred, gt, _spacing in cases:
        p, g = pred == value, gt == value
        denom = int(p.sum()) + int(g.sum())
        if denom:
            scores.append(2.0 * int(np.logical_and(p, g).sum()) / denom)
    return float(np.mean(scores)) if scores else math.nan


def choose_postprocessing(cases: Sequence[tuple[np.ndarray, np.ndarray, Sequence[float]]],
                          class_values: Mapping[str, int],
                          candidates_mm3: Sequence[float] = DEFAULT_CANDIDATES_MM3,
                          smallest_true_mm3: Mapping[str, float] | None = None,
                          safe_fraction: float = SAFE_FRACTION_OF_SMALLEST) -> PostProcessing:
    """For each foreground class, the component size that maximises the class's mean validation Dice.

    Classes are chosen one after another (each on the maps already filtered for the previous ones); a
    size other than 0 is kept only if it is strictly better than keeping everything.

    A handful of validation cases can favour a size that removes real structures elsewhere: one false
    speck of 30 mm³ on a lesion-free patient makes 50 mm³ "best", and a test patient's true 53 mm³ lesion,
    predicted at 48 mm³, is then deleted. With ``smallest_true_mm3`` (see :func:`smallest_structures_mm3`;
    the labelled training data) no size above ``safe_fraction`` of the class's smallest true structure is
    tried, and that limit itself is (the largest size that keeps a structure as large as a real one).

    Args:
        cases: ``(prediction, ground truth, spacing_mm)`` per validation case, label maps on one grid.
        class_values: foreground class name -> label value.
        candidates_mm3: sizes to try (0 is always tried).
        smallest_true_mm3: class name -> smallest true structure (mm³); classes not listed are not capped.
        safe_fraction: the largest size tried, as a fraction of the smallest true structure.

    Raises:
        ValueError: no case, a negative candidate, or a ``safe_fraction`` that is not positive.
    """
    if not safe_fraction > 0:
        raise ValueError(f"safe_fraction must be > 0, got {safe_fraction}")
    if not cases:
        raise ValueError("choose_postprocessing needs at least one validation case")
    if any(c < 0 for c in candidates_mm3):
        raise ValueError(f"candidate sizes must be >= 0, got {list(candidates_mm3)}")
    sizes = sorted({0.0, *map(float, candidates_mm3)})
    current = [(np.asarray(p), np.asarray(g), s) for p, g, s in cases]
    chosen: dict[int, float] = {}
    report: dict[str, Any] = {"num_cases": len(current), "candidates_mm3": sizes, "dice": {}}
    caps = {name: safe_fraction * float(v) for name, v in (smallest_true_mm3 or {}).items()}
    if caps:
        report["max_size_mm3"] = caps
    for name, value in class_values.items():
        scores = {}
        cap = caps.get(name, math.inf)
        # below the cap, and the cap itself: the largest size that keeps every structure as large as a real one
        for size in sorted({z for z in sizes if z <= cap} | ({cap} if 0 < cap < math.inf else set())):
            trial = [(remove_small_components(p, value, size, s), g, s) for p, g, s in current]
            scores[size] = _class_dice(trial, name, value)
        base = scores[0.0]
        best = max(scores, key=lambda z: (scores[z] if math.isfinite(scores[z]) else -math.inf, -z))
        if best > 0 and math.isfinite(scores[best]) and (not math.isfinite(base) or scores[best] > base):
            chosen[int(value)] = best
            current = [(remove_small_components(p, value, best, s), g, s) for p, g, s in current]
        report["dice"][name] = {"before": base, "after": scores[chosen.get(int(value), 0.0)],
                                "min_size_mm3": chosen.get(int(value), 0.0)}
    return PostProcessing(chosen, report)
