"""Segmentation losses with per-sample reduction, the U-Net border-weighted cross-entropy, deep supervision.

Conventions: the network returns logits ``[B, C, *spatial]`` (``C`` classes including background, 2D
or 3D); targets are integer label maps ``[B, 1, *spatial]`` with values ``0..C-1``.

**Per-sample reduction.** Every loss here first computes one value per sample, ``[B]``, and only then
reduces: ``reduction="none"`` returns that ``[B]`` vector, ``"mean"`` (default) its mean and ``"sum"``
its sum. Dice-type terms are computed per sample (MONAI ``batch=False``), never pooled over the batch,
so under DP-SGD each patient's gradient depends on that patient only and clipping is per patient.

**Where MONAI is used.** Dice, Tversky, generalised Dice and focal terms are MONAI losses built with
``reduction="none"`` and reduced to ``[B]`` here (mean over classes and voxels, which is what MONAI's
``"mean"`` gives for one sample). MONAI's compound ``DiceCELoss`` / ``DiceFocalLoss`` are not used
directly: they refuse ``reduction="none"``, and ``DiceFocalLoss`` applies a *sigmoid* focal term even
when the Dice term uses softmax; the compound losses here sum the same MONAI parts per sample instead.

**Ours.** MONAI has no border-weighted cross-entropy of the U-Net paper (Ronneberger et al., 2015),
so :func:`unet_weight_map` and :class:`BorderWeightedCELoss` implement it with scipy's connected
components and Euclidean distance transforms. :class:`DeepSupervisionLoss` replaces MONAI's class of the
same name (see its docstring for why) but keeps MONAI's level weights.

Build everything through :func:`build_loss` (the ``configs/loss/*.yaml`` targets).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss, GeneralizedDiceLoss, TverskyLoss
from scipy import ndimage
from torch import nn

REDUCTIONS = ("mean", "sum", "none")
DS_WEIGHT_MODES = ("exp", "two", "same")


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _check_non_negative(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce a ``[B]`` vector of per-sample losses."""
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _check_pair(logits: torch.Tensor, target: torch.Tensor) -> None:
    """Validate ``logits [B, C, *spatial]`` against ``target [B, 1, *spatial]``."""
    if isinstance(logits, (list, tuple)):
        raise ValueError(
            f"the model returned {len(logits)} outputs (deep supervision) but the loss takes one: build the "
            "loss with deep_supervision=True (config: loss.deep_supervision=true, the default when "
            "model.deep_supervision is true)"
        )
    if logits.dim() not in (4, 5):
        raise ValueError(f"logits must be [B, C, H, W] or [B, C, H, W, D], got shape {tuple(logits.shape)}")
    if target.dim() != logits.dim() or target.shape[1] != 1:
        raise ValueError(
            f"target must be a label map [B, 1, *spatial] matching logits {tuple(logits.shape)}, "
            f"got shape {tuple(target.shape)}"
        )
    if target.shape[0] != logits.shape[0] or target.shape[2:] != logits.shape[2:]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)} "
            "(batch and spatial sizes must agree)"
        )


class SegLoss(nn.Module):
    """Base class: a loss computed per sample, then reduced.

    Subclasses implement :meth:`per_sample`. ``uses_weight_map`` tells wrappers (deep supervision) that
    the loss accepts a voxel weight map.

    Args:
        reduction: ``"mean"`` (mean of the per-sample losses), ``"sum"`` or ``"none"`` (``[B]``).

    Raises:
        ValueError: unknown ``reduction``.
    """

    uses_weight_map: bool = False

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)

    def per_sample(
        self, logits: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Loss of each sample, ``[B]``."""
        raise NotImplementedError

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Args:
            logits: ``[B, C, *spatial]``.
            target: ``[B, 1, *spatial]`` integer labels.
            weight_map: optional ``[B, *spatial]`` or ``[B, 1, *spatial]`` voxel weights, for losses with
                ``uses_weight_map``; ignored by the others.

        Returns:
            A scalar (``"mean"``/``"sum"``) or ``[B]`` (``"none"``).
        """
        return _reduce(self.per_sample(logits, target, weight_map), self.reduction)


class MonaiLoss(SegLoss):
    """A MONAI loss built with ``reduction="none"``, ``batch=False``, reduced to one value per sample.

    The per-sample value is the mean of MONAI's unreduced output over all non-batch dimensions (classes,
    and voxels for voxel-wise terms), i.e. exactly what MONAI's ``reduction="mean"`` gives for one sample.

    Args:
        loss: e.g. ``monai.losses.DiceLoss(to_onehot_y=True, softmax=True, reduction="none")``.
        reduction: see :class:`SegLoss`.

    Raises:
        ValueError: ``loss`` reduces over the batch (``reduction`` other than ``"none"`` or ``batch=True``).
    """

    def __init__(self, loss: nn.Module, reduction: str = "mean") -> None:
        super().__init__(reduction)
        if getattr(loss, "reduction", "none") != "none":
            raise ValueError(
                f"{type(loss).__name__} must be built with reduction='none', got {loss.reduction!r}"
            )
        if getattr(loss, "batch", False):
            raise ValueError(
                f"{type(loss).__name__} must be built with batch=False: a batch Dice mixes patients, "
                "which breaks per-patient DP clipping"
            )
        self.loss = loss

    def per_sample(self, logits, target, weight_map=None):
        _check_pair(logits, target)
        out = self.loss(logits, target)  # [B, ...] unreduced
        return out.reshape(out.shape[0], -1).mean(dim=1)  # [B]


class PresentClassLoss(MonaiLoss):
    """A MONAI class-wise overlap loss averaged, per sample, over the classes present in that sample.

    Ours: MONAI's Dice/Tversky losses average every class of a sample. For a class absent from a
    sample's ground truth the per-sample Dice is ``1 - s/(sum(p) + s)`` with a tiny smoothing ``s``: its
    gradient ``s / (sum(p) + s)^2`` becomes enormous exactly when the network predicts little of that
    class, and drives a small, often-absent class (a lesion) to zero probability everywhere. nnU-Net
    avoids this with a *batch* Dice, which mixes patients and so breaks per-patient DP clipping. Here
    the overlap term of each sample covers only the classes in its own ground truth; the cross-entropy
    term of a compound loss still penalises false positives of absent classes. A sample with no
    foreground class at all contributes 0 to the overlap term.

    Args:
        loss: MONAI ``DiceLoss``/``TverskyLoss`` built with ``reduction="none"``, ``batch=False``,
            ``to_onehot_y=True`` (its output is ``[B, C', 1, ...]``).
        include_background: the same value the MONAI loss was built with.
    """

    def __init__(self, loss: nn.Module, include_background: bool, reduction: str = "mean") -> None:
        super().__init__(loss, reduction)
        self.include_background = bool(include_background)

    def per_sample(self, logits, target, weight_map=None):
        _check_pair(logits, target)
        out = self.loss(logits, target)  # [B, C', 1, ...] per-sample, per-class loss
        per_class = out.reshape(out.shape[0], -1)  # [B, C']
        num_classes = logits.shape[1]
        t = target.reshape(target.shape[0], -1).long()  # [B, N]
        present = torch.stack([(t == c).any(dim=1) for c in range(num_classes)], dim=1)  # [B, C]
        if not self.include_background:
            present = present[:, 1:]
        present = present.to(per_class.dtype)
        return (per_class * present).sum(dim=1) / present.sum(dim=1).clamp_min(1.0)  # [B]


class CrossEntropyLoss(SegLoss):
    """Softmax cross-entropy averaged over the voxels of each sample.

    Args:
        label_smoothing: in ``[0, 1]``, as in ``torch.nn.CrossEntropyLoss``.
        reduction: see :class:`SegLoss`.

    Raises:
        ValueError: ``label_smoothing`` outside ``[0, 1]``, unknown ``reduction``.
    """

    def __init__(self, label_smoothing: float = 0.0, reduction: str = "mean") -> None:
        super().__init__(reduction)
        if not 0.0 <= _check_non_negative("label_smoothing", label_smoothing) <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)

    def voxel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every voxel, ``[B, *spatial]``."""
        _check_pair(logits, target)
        return F.cross_entropy(
            logits.float(), target[:, 0].long(), reduction="none", label_smoothing=self.label_smoothing
        )

    def per_sample(self, logits, target, weight_map=None):
        ce = self.voxel_loss(logits, target)  # [B, *spatial]
        return ce.reshape(ce.shape[0], -1).mean(dim=1)


def unet_weight_map(
    label_np: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    spacing_mm: Sequence[float] | None = None,
    class_balance: bool = True,
) -> np.ndarray:
    """The U-Net paper's weight map ``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))``.

    MONAI has no such weight map; this is ours. ``d1``/``d2`` are the distances from a voxel to the
    nearest and second-nearest foreground object. Objects are the connected components (face
    connectivity, ``scipy.ndimage.label``) of each foreground class separately, so two touching objects
    of different classes are still separated. As in the paper's figure, the border term is applied to
    background voxels only (the gaps between objects); inside objects ``w = w_c``. With fewer than two
    objects the border term is zero.

    ``w_c`` balances class frequencies within this label map: ``w_c(x) = N / (K * N_c(x))`` with ``N``
    voxels, ``K`` classes present and ``N_c`` voxels of class ``c`` ("balanced" weights, whose mean over
    the image is 1); ``class_balance=False`` uses ``w_c = 1``.

    Cost: one Euclidean distance transform over the whole image per object, i.e. ``O(K_objects * N)``
    time and ``O(N)`` extra memory, on CPU (about 0.1-0.3 s per object for a 128^3 volume). Precompute
    the map in the data pipeline if a label map has many objects.

    Args:
        label_np: integer label map ``[H, W]`` or ``[H, W, D]`` (0 = background).
        w0: border weight (paper: 10). Must be ``>= 0``.
        sigma: border width (paper: 5 pixels), in voxels, or in mm when ``spacing_mm`` is given.
        spacing_mm: voxel spacing per axis; distances are then physical (mm). ``None``: voxel units.
        class_balance: use the class-frequency map ``w_c`` (else 1).

    Returns:
        ``float32`` weight map with the shape of ``label_np``.

    Raises:
        ValueError: not 2D/3D, non-integer labels, ``w0 < 0``, ``sigma <= 0``, bad ``spacing_mm``.
    """
    label_np = np.asarray(label_np)
    if label_np.ndim not in (2, 3):
        raise ValueError(f"label map must be 2D or 3D, got shape {label_np.shape}")
    if not (np.issubdtype(label_np.dtype, np.integer) or label_np.dtype == bool):
        if not np.array_equal(label_np, np.round(label_np)):
            raise ValueError(f"label map must hold integer labels, got non-integer values ({label_np.dtype})")
        label_np = label_np.astype(np.int64)
    w0 = _check_non_negative("w0", w0)
    if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    if spacing_mm is not None:
        spacing_mm = tuple(float(s) for s in spacing_mm)
        if len(spacing_mm) != label_np.ndim or any(not math.isfinite(s) or s <= 0 for s in spacing_mm):
            raise ValueError(f"spacing_mm must be {label_np.ndim} positive numbers, got {spacing_mm!r}")

    if class_balance:
        classes, inverse, counts = np.unique(label_np, return_inverse=True, return_counts=True)
        per_class = label_np.size / (len(classes) * counts)  # [K]
        weight = per_class[inverse.reshape(label_np.shape)].astype(np.float64)
    else:
        weight = np.ones(label_np.shape, dtype=np.float64)
    if w0 == 0.0:
        return weight.astype(np.float32)

    # Objects: connected components of each foreground class, numbered 1..n_objects across classes.
    objects = np.zeros(label_np.shape, dtype=np.int32)
    n_objects = 0
    for value in np.unique(label_np):
        if value == 0:
            continue
        components, n = ndimage.label(label_np == value)
        objects[components > 0] = components[components > 0] + n_objects
        n_objects += n
    if n_objects < 2:
        return weight.astype(np.float32)

    # Running nearest (d1) and second-nearest (d2) object distances: O(N) memory whatever the count.
    d1 = np.full(label_np.shape, np.inf)
    d2 = np.full(label_np.shape, np.inf)
    for k in range(1, n_objects + 1):
        dist = ndimage.distance_transform_edt(objects != k, sampling=spacing_mm)  # distance to object k
        d2 = np.minimum(d2, np.maximum(d1, dist))
        d1 = np.minimum(d1, dist)
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
    weight += np.where(label_np == 0, border, 0.0)
    return weight.astype(np.float32)


class BorderWeightedCELoss(CrossEntropyLoss):
    """Border-weighted cross-entropy of the U-Net paper: ``mean_x w(x) * CE(x)`` per sample.

    MONAI has no such loss; see :func:`unet_weight_map` for ``w``. The weight map is taken from the
    ``weight_map`` argument when given (precomputed in the data pipeline: free at training time), else
    computed from the target on CPU with numpy/scipy for every sample of every batch, which costs one
    distance transform per object (see :func:`unet_weight_map`) and a device-to-host copy of the target.

    Args:
        w0: border weight, ``>= 0`` (paper: 10).
        sigma: border width, ``> 0``; voxels, or mm when ``spacing_mm`` is given (paper: 5 pixels).
        spacing_mm: voxel spacing of the training grid, for physical distances.
        class_balance: include the class-frequency term ``w_c``.
        label_smoothing: as in :class:`CrossEntropyLoss`.
        reduction: see :class:`SegLoss`.

    Raises:
        ValueError: ``w0 < 0``, ``sigma <= 0``, bad ``spacing_mm``, unknown ``reduction``.
    """

    uses_weight_map = True

    def __init__(
        self,
        w0: float = 10.0,
        sigma: float = 5.0,
        spacing_mm: Sequence[float] | None = None,
        class_balance: bool = True,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(label_smoothing=label_smoothing, reduction=reduction)
        self.w0 = _check_non_negative("w0", w0)
        if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        self.sigma = float(sigma)
        if spacing_mm is not None:
            spacing_mm = tuple(float(s) for s in spacing_mm)
            if any(not math.isfinite(s) or s <= 0 for s in spacing_mm):
                raise ValueError(f"spacing_mm must be positive numbers, got {spacing_mm!r}")
        self.spacing_mm = spacing_mm
        self.class_balance = bool(class_balance)

    def compute_weight_map(self, target: torch.Tensor) -> torch.Tensor:
        """Weight map of every sample of ``target [B, 1, *spatial]`` -> ``[B, *spatial]`` (CPU compute)."""
        labels = target[:, 0].detach().cpu().numpy()
        maps = [
            unet_weight_map(lab, self.w0, self.sigma, self.spacing_mm, self.class_balance) for lab in labels
        ]
        return torch.from_numpy(np.stack(maps)).to(target.device)

    def per_sample(self, logits, target, weight_map=None):
        ce = self.voxel_loss(logits, target)  # [B, *spatial]
        if weight_map is None:
            weight_map = self.compute_weight_map(target)
        elif weight_map.dim() == target.dim():
            weight_map = weight_map[:, 0]
        if weight_map.shape != ce.shape:
            raise ValueError(
                f"weight_map shape {tuple(weight_map.shape)} does not match target {tuple(target.shape)}"
            )
        weighted = ce * weight_map.to(ce.dtype)
        return weighted.reshape(weighted.shape[0], -1).mean(dim=1)


class CompoundLoss(SegLoss):
    """Weighted sum of per-sample losses: ``sum_i lambda_i * term_i`` (e.g. Dice + CE).

    Args:
        terms: name -> (loss, lambda); every loss a :class:`SegLoss`, every lambda ``>= 0``.
        reduction: see :class:`SegLoss` (the terms' own reductions are not used).

    Raises:
        ValueError: no terms, a term that is not a :class:`SegLoss`, a negative lambda.
    """

    def __init__(self, terms: Mapping[str, tuple[SegLoss, float]], reduction: str = "mean") -> None:
        super().__init__(reduction)
        if not terms:
            raise ValueError("CompoundLoss needs at least one term, got none")
        for name, (loss, lam) in terms.items():
            if not isinstance(loss, SegLoss):
                raise ValueError(f"term {name!r} must be a SegLoss, got {type(loss).__name__}")
            _check_non_negative(f"lambda of term {name!r}", lam)
        self.terms = nn.ModuleDict({name: loss for name, (loss, _) in terms.items()})
        self.lambdas = {name: float(lam) for name, (_, lam) in terms.items()}
        self.uses_weight_map = any(t.uses_weight_map for t in self.terms.values())

    def compute_weight_map(self, target: torch.Tensor) -> torch.Tensor:
        """Weight map of the (first) weight-map term, ``[B, *spatial]``."""
        for term in self.terms.values():
            if term.uses_weight_map:
                return term.compute_weight_map(target)
        raise ValueError("no term of this loss uses a weight map")

    def components(
        self, logits: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Unweighted per-sample value of every term, ``{name: [B]}`` (for logging)."""
        if weight_map is None and self.uses_weight_map:
            weight_map = self.compute_weight_map(target)
        return {name: term.per_sample(logits, target, weight_map) for name, term in self.terms.items()}

    def per_sample(self, logits, target, weight_map=None):
        parts = self.components(logits, target, weight_map)
        return sum(self.lambdas[name] * value for name, value in parts.items())


class DeepSupervisionLoss(SegLoss):
    """Deep supervision: weighted sum of a loss over several network outputs, per sample.

    Accepts a list/tuple of logits ``[B, C, *spatial_l]`` at decreasing resolution (first = full
    resolution), MONAI DynUNet's training-mode stacked tensor ``[B, S, C, *spatial]`` (heads already
    upsampled to full size), or a single ``[B, C, *spatial]`` tensor (plain loss, e.g. in eval mode).
    The target (and a weight map) is downsampled to each output's size with nearest-neighbour
    interpolation (``"nearest-exact"``, as MONAI). Loss-level weights are MONAI's: ``"exp"`` =
    ``max(0.5**l, 0.0625)``, ``"two"`` = 1, 0.5, 0.5, ..., ``"same"`` = 1; ``weights`` overrides them.
    Weights are not normalised (MONAI's convention).

    MONAI's ``monai.losses.DeepSupervisionLoss`` is not used because it accumulates into a scalar (so
    ``reduction="none"`` breaks), does not unbind DynUNet's stacked tensor, cannot route a weight map,
    and silently treats an unknown ``weight_mode`` as ``"same"``.

    For a weight-map loss without a given map, the map is computed once at full resolution and
    downsampled, rather than recomputed from each coarse target.

    Args:
        loss: the per-level loss (its own reduction is not used).
        weight_mode: ``"exp"``, ``"two"`` or ``"same"``.
        weights: explicit per-level weights (``>= 0``), at least one per output; overrides
            ``weight_mode``.
        reduction: see :class:`SegLoss`.

    Raises:
        ValueError: ``loss`` not a :class:`SegLoss`, unknown ``weight_mode``, negative or empty
            ``weights``, unknown ``reduction``; in the call, fewer ``weights`` than outputs or an
            output larger than the target.
    """

    def __init__(
        self,
        loss: SegLoss,
        weight_mode: str = "exp",
        weights: Sequence[float] | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction)
        if not isinstance(loss, SegLoss):
            raise ValueError(f"loss must be a SegLoss, got {type(loss).__name__}")
        if weight_mode not in DS_WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {DS_WEIGHT_MODES}, got {weight_mode!r}")
        if weights is not None:
            weights = [_check_non_negative("deep-supervision weight", float(w)) for w in weights]
            if not weights:
                raise ValueError("weights must not be empty, got []")
        self.loss = loss
        self.weight_mode = weight_mode
        self.weights = weights
        self.uses_weight_map = loss.uses_weight_map
        self.interp_mode = "nearest-exact"

    def level_weights(self, levels: int) -> list[float]:
        """Weight of each output level (MONAI's ``DeepSupervisionLoss.get_weights`` formulas)."""
        levels = max(1, levels)
        if self.weights is not None:
            if len(self.weights) < levels:
                # MONAI silently falls back to weight_mode here; a config error is more likely.
                raise ValueError(f"{levels} deep-supervision outputs but only {len(self.weights)} weights")
            return list(self.weights[:levels])
        if self.weight_mode == "exp":
            return [max(0.5**level, 0.0625) for level in range(levels)]
        if self.weight_mode == "two":
            return [1.0 if level == 0 else 0.5 for level in range(levels)]
        return [1.0] * levels

    def _resize(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Nearest-neighbour resize of ``[B, 1, *spatial]`` (labels or weights) to ``size``."""
        if tuple(x.shape[2:]) == tuple(size):
            return x
        if any(s > t for s, t in zip(size, x.shape[2:], strict=True)):
            raise ValueError(
                f"deep-supervision output size {tuple(size)} is larger than the target {tuple(x.shape[2:])}"
            )
        return F.interpolate(x.float(), size=tuple(size), mode=self.interp_mode).to(x.dtype)

    def per_sample(self, logits, target, weight_map=None):
        if isinstance(logits, (list, tuple)):
            outputs = list(logits)
        elif isinstance(logits, torch.Tensor) and logits.dim() == target.dim() + 1:
            outputs = list(torch.unbind(logits, dim=1))  # DynUNet: [B, S, C, *spatial] -> S x [B, C, *spatial]
        else:
            outputs = [logits]
        if not outputs:
            raise ValueError("deep supervision got an empty list of outputs")
        if self.loss.uses_weight_map:
            if weight_map is None:
                weight_map = self.loss.compute_weight_map(target)
            if weight_map.dim() == target.dim() - 1:
                weight_map = weight_map[:, None]  # [B, 1, *spatial]
        total = None
        for w, out in zip(self.level_weights(len(outputs)), outputs, strict=True):
            size = out.shape[2:]
            level_map = self._resize(weight_map, size)[:, 0] if weight_map is not None else None
            value = w * self.loss.per_sample(out, self._resize(target, size), level_map)  # [B]
            total = value if total is None else total + value
        return total


# --------------------------------------------------------------------------- registry


def _dice_args(include_background: bool, smooth_nr: float, smooth_dr: float) -> dict[str, Any]:
    return {
        "include_background": bool(include_background),
        "to_onehot_y": True,
        "softmax": True,
        "reduction": "none",
        "batch": False,
        "smooth_nr": _check_non_negative("smooth_nr", smooth_nr),
        "smooth_dr": _check_non_negative("smooth_dr", smooth_dr),
    }


def _overlap(loss: nn.Module, include_background: bool, ignore_empty: bool) -> SegLoss:
    return PresentClassLoss(loss, include_background) if ignore_empty else MonaiLoss(loss)


def _dice(
    include_background: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    squared_pred: bool = False,
    jaccard: bool = False,
    ignore_empty: bool = False,
) -> SegLoss:
    args = _dice_args(include_background, smooth_nr, smooth_dr)
    return _overlap(DiceLoss(squared_pred=squared_pred, jaccard=jaccard, **args), include_background, ignore_empty)


def _dice_ce(
    include_background: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    squared_pred: bool = False,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    label_smoothing: float = 0.0,
    ignore_empty: bool = False,
) -> SegLoss:
    dice = _dice(include_background, smooth_nr, smooth_dr, squared_pred, ignore_empty=ignore_empty)
    return CompoundLoss({"dice": (dice, lambda_dice), "ce": (CrossEntropyLoss(label_smoothing), lambda_ce)})


def _dice_focal(
    include_background: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    squared_pred: bool = False,
    lambda_dice: float = 1.0,
    lambda_focal: float = 1.0,
    gamma: float = 2.0,
    ignore_empty: bool = False,
) -> SegLoss:
    dice = _dice(include_background, smooth_nr, smooth_dr, squared_pred, ignore_empty=ignore_empty)
    # Softmax focal over all classes: dropping the background channel before a softmax would change
    # the distribution, so include_background only applies to the Dice term (as CE in Dice+CE).
    focal = FocalLoss(
        include_background=True,
        to_onehot_y=True,
        use_softmax=True,
        gamma=_check_non_negative("gamma", gamma),
        reduction="none",
    )
    return CompoundLoss({"dice": (dice, lambda_dice), "focal": (MonaiLoss(focal), lambda_focal)})


def _tversky(
    include_background: bool = False,
    alpha: float = 0.3,
    beta: float = 0.7,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    ignore_empty: bool = False,
) -> SegLoss:
    args = _dice_args(include_background, smooth_nr, smooth_dr)
    alpha, beta = _check_non_negative("alpha", alpha), _check_non_negative("beta", beta)
    return _overlap(TverskyLoss(alpha=alpha, beta=beta, **args), include_background, ignore_empty)


def _generalized_dice(
    include_background: bool = False,
    w_type: str = "square",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
) -> SegLoss:
    if w_type not in ("square", "simple", "uniform"):
        raise ValueError(f"w_type must be 'square', 'simple' or 'uniform', got {w_type!r}")
    args = _dice_args(include_background, smooth_nr, smooth_dr)
    return MonaiLoss(GeneralizedDiceLoss(w_type=w_type, **args))


def _border_ce(
    w0: float = 10.0,
    sigma: float = 5.0,
    spacing_mm: Sequence[float] | None = None,
    class_balance: bool = True,
    label_smoothing: float = 0.0,
) -> SegLoss:
    return BorderWeightedCELoss(w0, sigma, spacing_mm, class_balance, label_smoothing)


def _dice_border_ce(
    include_background: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    w0: float = 10.0,
    sigma: float = 5.0,
    spacing_mm: Sequence[float] | None = None,
    class_balance: bool = True,
    ignore_empty: bool = False,
) -> SegLoss:
    dice = _dice(include_background, smooth_nr, smooth_dr, ignore_empty=ignore_empty)
    border = BorderWeightedCELoss(w0, sigma, spacing_mm, class_balance)
    return CompoundLoss({"dice": (dice, lambda_dice), "border_ce": (border, lambda_ce)})


_BUILDERS: dict[str, Callable[..., SegLoss]] = {
    "dice": _dice,
    "dice_ce": _dice_ce,
    "dice_focal": _dice_focal,
    "tversky": _tversky,
    "generalized_dice": _generalized_dice,
    "border_ce": _border_ce,
    "dice_border_ce": _dice_border_ce,
}


def list_losses() -> list[str]:
    """Names accepted by :func:`build_loss`, sorted."""
    return sorted(_BUILDERS)


def loss_arguments(name: str) -> dict[str, Any]:
    """The loss-specific keyword arguments of ``name`` with their defaults.

    Raises:
        ValueError: unknown ``name``.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(list_losses())}")
    return {p.name: p.default for p in inspect.signature(_BUILDERS[name]).parameters.values()}


def build_loss(
    name: str,
    reduction: str = "mean",
    deep_supervision: bool = False,
    ds_weight_mode: str = "exp",
    ds_weights: Sequence[float] | None = None,
    **kwargs: Any,
) -> SegLoss:
    """Build a segmentation loss by name (the ``configs/loss/*.yaml`` ``_target_``).

    Names: ``dice``, ``dice_ce``, ``dice_focal``, ``tversky``, ``generalized_dice`` (MONAI parts, softmax
    over logits, one-hot targets), ``border_ce`` (U-Net border-weighted CE) and ``dice_border_ce``
    (Dice + border-weighted CE). ``include_background`` (Dice-type terms only) defaults to ``False``, as
    in nnU-Net; MONAI's own default is ``True``. Call :func:`loss_arguments` for each name's options.

    Args:
        name: one of :func:`list_losses`.
        reduction: ``"mean"`` (mean of per-sample losses), ``"sum"`` or ``"none"`` (``[B]``).
        deep_supervision: wrap in :class:`DeepSupervisionLoss` (for networks returning several outputs).
        ds_weight_mode: level weights of the wrapper, ``"exp"``, ``"two"`` or ``"same"``.
        ds_weights: explicit level weights of the wrapper.
        **kwargs: loss-specific options (see :func:`loss_arguments`).

    Returns:
        A :class:`SegLoss`: ``loss(logits [B, C, *spatial], target [B, 1, *spatial])``.

    Raises:
        ValueError: unknown name, unknown or invalid option, unknown reduction.
    """
    defaults = loss_arguments(name)
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for loss {name!r}; accepted: {sorted(defaults)}")
    _check_reduction(reduction)
    loss = _BUILDERS[name](**kwargs)
    if deep_supervision:
        return DeepSupervisionLoss(loss, weight_mode=ds_weight_mode, weights=ds_weights, reduction=reduction)
    loss.reduction = reduction
    return loss
