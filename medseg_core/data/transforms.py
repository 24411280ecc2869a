"""MONAI dictionary-transform pipelines built from the federated plan.

Every pipeline starts with the same deterministic part (what :class:`monai.data.CacheDataset` caches)::

    LoadImaged (channels stacked, channel first) [-> ReorderChannelsd: the model's order, by name]
      -> Orientationd("RAS") -> NormalizeByPland
      -> Spacingd(plan target spacing; bilinear image, nearest label) -> label as uint8
      -> SpatialPadd(plan patch size) [training: -> SampleCropCentresd]

Training then samples and augments::

    RandCropByLabelClassesd(patch size, centre class: background with weight neg, each foreground class
      with pos / (K - 1), classes absent from the case skipped; num_samples)
      [crop.by_class false: RandCropByPosNegLabeld(pos/neg) on any foreground]
      (RandSpatialCropSamplesd without labels)
      [2D: a one-slice patch, squeezed]  -> RandFlipd per axis -> RandAffined (rotation + zoom)
      -> RandScaleIntensityd -> RandShiftIntensityd -> RandGaussianNoised -> float32 image, int64 label

Validation / inference stops after the deterministic part (whole volumes, for sliding-window
inference) and keeps MONAI's meta-data and applied-operation trace, so ``monai.transforms.Invertd`` can
map a prediction back to the original voxel grid.

Intensity normalisation is applied on the acquired grid (after reorientation, before resampling), as
nnU-Net does: the non-zero mask of the ``nonzero`` scheme is then the scanner's, not an interpolated one.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensity,
    Orientationd,
    RandAffined,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
    Spacingd,
    SpatialPadd,
    SqueezeDimd,
)

from medseg_core.data.fingerprint import (
    CHANNEL_ORDER_BY_NAME,
    SCHEME_CT,
    SCHEME_NONZERO,
    canonical_modality,
    check_plan,
    model_channel_order,
    scheme_for_modality,
)

IMAGE, LABEL = "image", "label"
FG_INDICES, BG_INDICES, CLASS_INDICES = "fg_indices", "bg_indices", "class_indices"
#: foreground / background voxels kept per case as candidate patch centres (nnU-Net keeps 10,000)
MAX_CROP_CENTRES = 10_000

#: defaults of ``configs/transforms/default.yaml`` (used when no config is passed)
DEFAULT_AUGMENTATION: dict[str, dict[str, float]] = {
    "crop": {"pos": 1.0, "neg": 1.0, "num_samples": 2, "by_class": True},
    "flip": {"prob": 0.5},
    "affine": {"prob": 0.2, "rotate_deg": 15.0, "scale": 0.1},
    "intensity": {"scale_prob": 0.15, "scale": 0.1, "shift_prob": 0.15, "shift": 0.1},
    "noise": {"prob": 0.1, "std": 0.1},
}
_FLAGS = {("crop", "by_class")}
_PROBABILITIES = {("flip", "prob"), ("affine", "prob"), ("intensity", "scale_prob"),
                  ("intensity", "shift_prob"), ("noise", "prob")}


def augmentation_settings(cfg: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Augmentation settings: :data:`DEFAULT_AUGMENTATION` updated with ``cfg`` (a dict or DictConfig).

    Raises:
        ValueError: an unknown group or key (typos), a probability outside [0, 1], a negative range, or
            ``num_samples`` < 1, naming the offending entry and value.
    """
    out = {group: dict(values) for group, values in DEFAULT_AUGMENTATION.items()}
    for group, values in (cfg or {}).items():
        if group not in out:
            raise ValueError(f"unknown transforms setting {group!r}; expected one of {sorted(out)}")
        if values is not None and not isinstance(values, Mapping):
            raise ValueError(f"transforms.{group} must be a mapping of settings, got {values!r}")
        for key, value in (values or {}).items():
            if key not in out[group]:
                raise ValueError(f"unknown transforms setting {group}.{key}; expected one of {sorted(out[group])}")
            if (group, key) in _FLAGS:
                if not isinstance(value, bool):
                    raise ValueError(f"transforms.{group}.{key} must be true or false, got {value!r}")
                out[group][key] = value
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"transforms.{group}.{key} must be a number, got {value!r}")
            out[group][key] = float(value)
    for group, key in _PROBABILITIES:
        if not 0.0 <= out[group][key] <= 1.0:
            raise ValueError(f"transforms.{group}.{key} is a probability in [0, 1], got {out[group][key]}")
    for group, key in (("crop", "pos"), ("crop", "neg"), ("affine", "rotate_deg"), ("affine", "scale"),
                       ("intensity", "scale"), ("intensity", "shift"), ("noise", "std")):
        if out[group][key] < 0:
            raise ValueError(f"transforms.{group}.{key} must be >= 0, got {out[group][key]}")
    if out["crop"]["pos"] + out["crop"]["neg"] <= 0:
        raise ValueError("transforms.crop.pos and transforms.crop.neg cannot both be 0")
    n = out["crop"]["num_samples"]
    if n < 1 or not float(n).is_integer():
        raise ValueError(f"transforms.crop.num_samples must be an integer >= 1, got {n}")
    if out["affine"]["scale"] >= 1:
        raise ValueError(f"transforms.affine.scale must be < 1, got {out['affine']['scale']}")
    return out


def _modality_names(plan: Mapping[str, Any], modalities: Mapping[int, str] | Sequence[str] | None) -> list[str]:
    """One modality name per channel, from a ``channel_names`` mapping, a list, or (``None``) the plan."""
    norm = plan["normalization"]
    n = int(plan["num_channels"])
    if modalities is None:
        names = []
        for c in range(n):
            options = list(norm[str(c)])
            if len(options) != 1:
                raise ValueError(f"channel {c} has several modalities in the plan ({options}); pass "
                                 f"modalities= (the site's channel_names) to choose")
            names.append(options[0])
    elif isinstance(modalities, Mapping):
        names = [str(modalities[c]) if c in modalities else str(modalities.get(str(c), "")) for c in range(n)]
    else:
        names = [str(m) for m in modalities]
    if len(names) != n or "" in names:
        raise ValueError(f"the plan has {n} channel(s), got modalities {modalities!r}")
    return names


def input_channel_order(plan: Mapping[str, Any],
                        modalities: Mapping[int, str] | Sequence[str] | None = None) -> tuple[list[int], list[str]]:
    """How one site's declared channels map onto the model's: ``(order, names in the model's order)``.

    ``order[i]`` is the declared channel that feeds model channel ``i``. With a plan whose
    ``channel_order`` is ``"by-name"`` this is :func:`medseg_core.data.fingerprint.model_channel_order`
    (``["T2", "T1"]`` -> ``[1, 0]``); with an older plan, or ``modalities=None`` (the plan's own names,
    already in the model's order), it is the identity.
    """
    names = _modality_names(plan, modalities)
    if modalities is None or plan.get("channel_order") != CHANNEL_ORDER_BY_NAME:
        return list(range(len(names))), names
    order = model_channel_order(names)
    return order, [names[c] for c in order]


def input_channel_names(plan: Mapping[str, Any], sites: Sequence[Any]) -> dict[int, str]:
    """The input channels a checkpoint trained on ``sites`` expects, for ``medseg-predict``'s default.

    The sites' own order when they all list the same names in the same order (a single site always);
    else the model's order when the names match by name; else ``{}`` (mixed modalities: predict needs
    ``--modality``).
    """
    declared = [[s.channel_names[c] for c in sorted(s.channel_names)] for s in sites]
    if all(d == declared[0] for d in declared):
        return dict(enumerate(declared[0]))
    model_names = [input_channel_order(plan, d)[1] for d in declared]
    if plan.get("channel_order") == CHANNEL_ORDER_BY_NAME and all(
            [canonical_modality(n) for n in m] == [canonical_modality(n) for n in model_names[0]] for m in model_names):
        return dict(enumerate(model_names[0]))
    return {}


class ReorderChannelsd(MapTransform):
    """Put a loaded image's channels in the model's order (``order[i]`` feeds channel ``i``).

    Not invertible on purpose: it changes no voxel grid, so ``Invertd`` (which maps predictions back to
    the input's grid) has nothing to undo; MONAI's meta-data and applied operations are kept.
    """

    def __init__(self, keys: Any, order: Sequence[int]) -> None:
        super().__init__(keys)
        self.order = [int(c) for c in order]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(self.order):
                raise ValueError(f"expected {len(self.order)} channel(s) to reorder, got {img.shape[0]} "
                                 f"({getattr(img, 'meta', {}).get('filename_or_obj', key)})")
            d[key] = torch.index_select(img, 0, torch.as_tensor(self.order, device=img.device))
        return d


def channel_normalization(plan: Mapping[str, Any],
                          modalities: Mapping[int, str] | Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The normalisation settings to apply to each channel at one site.

    The scheme follows the site's *declared* modality of each channel (see
    :mod:`medseg_core.data.fingerprint`): CT uses the plan's federation-wide clip range and foreground
    mean / std; any other modality is z-scored per image over its non-zero voxels, which needs no plan
    statistics (so a modality the plan has not seen is fine unless it is CT).

    Args:
        plan: the plan.
        modalities: one name per *model* channel (``{0: "CT"}`` or a list; see
            :func:`input_channel_order` for a site's declared order); ``None`` takes the plan's modality
            when each channel has exactly one.

    Returns:
        One dict per channel: ``{"scheme": "ct", "clip": [lo, hi], "mean", "std"}`` or
        ``{"scheme": "nonzero"}``.

    Raises:
        ValueError: wrong number of channels, ``modalities=None`` with a channel that has several
            modalities in the plan, or a CT channel the plan has no CT statistics for.
    """
    norm = plan["normalization"]
    names = _modality_names(plan, modalities)
    out = []
    for c, name in enumerate(names):
        entries = norm[str(c)]
        entry = entries.get(canonical_modality(name))
        if scheme_for_modality(name) == SCHEME_CT:
            if entry is None or entry.get("scheme") != SCHEME_CT:
                raise ValueError(f"channel {c} is {name} here, but the plan has no CT statistics for channel {c} "
                                 f"(it was planned from {sorted(entries)} data); re-plan including this site")
            out.append({"scheme": SCHEME_CT, "clip": [float(v) for v in entry["clip"]],
                        "mean": float(entry["mean"]), "std": float(entry["std"])})
        else:
            out.append({"scheme": SCHEME_NONZERO})
    return out


class NormalizeByPland(MapTransform):
    """Per-channel intensity normalisation as the plan says (dictionary transform).

    - ``ct``: clip to ``[lo, hi]`` then ``(x - mean) / std`` (what MONAI's
      ``ScaleIntensityRange(lo, hi, (lo - mean) / std, (hi - mean) / std, clip=True)`` computes, done in
      place with torch: 3x faster on a 256x256x160 volume).
    - ``nonzero``: MONAI ``NormalizeIntensity(nonzero=True)`` on that channel (z-score over its non-zero
      voxels; zeros stay 0).

    Ours because MONAI's dictionary transforms apply one setting to every channel, and a multi-modal
    case (CT + PET, or CT at one channel and MR at another) needs one scheme per channel.

    Args:
        keys: image key(s), tensors ``[C, *spatial]``.
        channels: one dict per channel, from :func:`channel_normalization`.

    Raises:
        ValueError: at construction for an unknown scheme or ``std <= 0``; at call time for an image
            whose channel count differs from the plan's (naming the file).
    """

    def __init__(self, keys: Hashable | Sequence[Hashable], channels: Sequence[Mapping[str, Any]],
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not channels:
            raise ValueError("channels must list one normalisation per channel, got an empty list")
        self.channels: list[dict[str, Any]] = []
        for c, ch in enumerate(channels):
            scheme = ch.get("scheme")
            if scheme == SCHEME_CT:
                lo, hi = (float(v) for v in ch["clip"])
                mean, std = float(ch["mean"]), float(ch["std"])
                if not (std > 0 and lo < hi):
                    raise ValueError(f"channel {c}: CT normalisation needs std > 0 and clip low < high, got {ch}")
                self.channels.append({"scheme": scheme, "clip": (lo, hi), "mean": mean, "std": std})
            elif scheme == SCHEME_NONZERO:
                self.channels.append({"scheme": scheme})
            else:
                raise ValueError(f"channel {c}: unknown normalisation scheme {scheme!r}")
        self._nonzero = NormalizeIntensity(nonzero=True)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(self.channels):
                source = getattr(img, "meta", {}).get("filename_or_obj", key)
                raise ValueError(f"{source}: image has {img.shape[0]} channel(s), the plan expects "
                                 f"{len(self.channels)}")
            out = img.clone() if img.dtype == torch.float32 else img.float()  # keeps meta, applied operations
            for c, ch in enumerate(self.channels):
                if ch["scheme"] == SCHEME_CT:
                    out[c].clamp_(*ch["clip"]).sub_(ch["mean"]).div_(ch["std"])
                else:
                    out[c] = torch.as_tensor(self._nonzero(img[c:c + 1]))[0]
            d[key] = out
        return d


class SampleCropCentresd(MapTransform):
    """Store up to ``max_centres`` foreground and background voxel indices of the label for
    ``RandCropByPosNegLabeld`` (keys ``fg_indices`` / ``bg_indices``, flattened spatial indices) or, with
    ``num_classes``, up to ``max_centres`` indices of every class for ``RandCropByLabelClassesd`` (key
    ``class_indices``: a list, entry ``c`` for label value ``c``, empty when the class is absent). The
    crop consumes (pops) the keys it uses.

    Ours; the idea is nnU-Net's ``class_locations``. Without pre-computed indices MONAI's crop rescans
    the whole label at every draw (~0.1 s for 256x256x160), and MONAI's ``FgBgToIndicesd`` keeps every
    index: 8 bytes per voxel, 80 MB per such volume in the cache. 10,000 of each are plenty of distinct
    patch centres and cost 160 kB per case. The subsample uses a fixed seed, so the transform is
    deterministic and ``CacheDataset`` caches its output.

    Args:
        keys: the label key; labels are ``[1, *spatial]``.
        max_centres: indices kept per kind.
        seed: seed of the subsampling.
        num_classes: store per-class indices for label values ``0..num_classes-1`` (single-channel
            integer labels) instead of foreground/background ones.

    Raises:
        ValueError: ``max_centres`` < 1 or ``num_classes`` < 2.
    """

    def __init__(self, keys: Hashable = LABEL, max_centres: int = MAX_CROP_CENTRES, seed: int = 0,
                 num_classes: int | None = None) -> None:
        super().__init__(keys)
        if max_centres < 1:
            raise ValueError(f"max_centres must be >= 1, got {max_centres}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.max_centres = int(max_centres)
        self.seed = int(seed)
        self.num_classes = num_classes

    def _subsample(self, rng: np.random.Generator, mask: np.ndarray, count: int) -> np.ndarray:
        n = self.max_centres
        if count <= n:
            return np.flatnonzero(mask)
        if count >= mask.size // 2:  # common for background: draw positions instead of listing ~all voxels
            picked = np.empty(0, dtype=np.int64)
            while picked.size < n:
                cand = rng.integers(0, mask.size, size=2 * n)
                picked = np.unique(np.concatenate([picked, cand[mask[cand]]]))
            return np.sort(rng.choice(picked, size=n, replace=False))
        return np.sort(rng.choice(np.flatnonzero(mask), size=n, replace=False))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = np.asarray(torch.as_tensor(d[key]).detach().cpu())
            rng = np.random.default_rng(self.seed)
            if self.num_classes is not None:
                flat = label.reshape(-1)
                masks = [flat == c for c in range(self.num_classes)]
                d[CLASS_INDICES] = [self._subsample(rng, m, int(m.sum())) for m in masks]
                continue
            fg = label.reshape(label.shape[0], -1).any(axis=0)
            n_fg = int(fg.sum())
            d[FG_INDICES] = self._subsample(rng, fg, n_fg)
            d[BG_INDICES] = self._subsample(rng, ~fg, fg.size - n_fg)
        return d


def _label_storage_dtype(plan: Mapping[str, Any]) -> torch.dtype:
    return torch.uint8 if int(plan["num_classes"]) <= 256 else torch.int32


def deterministic_transforms(plan: Mapping[str, Any], *, with_label: bool = True,
                             modalities: Mapping[int, str] | Sequence[str] | None = None,
                             spatial_dims: int = 3) -> list:
    """The cacheable prefix of every pipeline (load, RAS, normalise, resample, pad); see the module doc.

    Labels leave it as ``uint8`` (4x less cache memory than float32). For ``spatial_dims=2`` only the
    in-plane axes are padded (patches are axial slices).
    """
    keys = [IMAGE, LABEL] if with_label else [IMAGE]
    pad_size = list(plan["patch_size"]) if spatial_dims == 3 else [*plan["patch_size_2d"], -1]
    order, names = input_channel_order(plan, modalities)
    steps: list = [LoadImaged(keys=keys, reader="NibabelReader", ensure_channel_first=True, image_only=True)]
    if order != sorted(order):
        steps.append(ReorderChannelsd(keys=IMAGE, order=order))
    steps += [
        Orientationd(keys=keys, axcodes="RAS", labels=None),  # labels=None: follow the reader's space (RAS)
        NormalizeByPland(keys=IMAGE, channels=channel_normalization(plan, names)),
        Spacingd(keys=keys, pixdim=list(plan["target_spacing_mm"]),
                 mode=["bilinear", "nearest"] if with_label else "bilinear"),
    ]
    if with_label:
        steps.append(EnsureTyped(keys=LABEL, dtype=_label_storage_dtype(plan)))
    steps.append(SpatialPadd(keys=keys, spatial_size=pad_size, mode="constant"))
    return steps


def _class_balanced(plan: Mapping[str, Any], aug: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether training crops are centred class by class (only meaningful with 2+ foreground classes)."""
    return bool(aug["crop"]["by_class"]) and int(plan["num_classes"]) > 2


def random_transforms(plan: Mapping[str, Any], cfg: Mapping[str, Any] | None = None, *, with_label: bool = True,
                      spatial_dims: int = 3) -> list:
    """Patch sampling and augmentation applied after the cached prefix (training only)."""
    aug = augmentation_settings(cfg)
    keys = [IMAGE, LABEL] if with_label else [IMAGE]
    patch = list(plan["patch_size"]) if spatial_dims == 3 else [*plan["patch_size_2d"], 1]
    num_samples = int(aug["crop"]["num_samples"])
    num_classes = int(plan["num_classes"])
    if with_label and _class_balanced(plan, aug):
        # nnU-Net's foreground sampling: a foreground centre is drawn from a class chosen uniformly, so a
        # small class (a lesion) is centred as often as a large one (the organ). Classes absent from a
        # case are skipped (MONAI renormalises the ratios per case).
        fg_share = aug["crop"]["pos"] / (num_classes - 1)
        crop = RandCropByLabelClassesd(keys=keys, label_key=LABEL, spatial_size=patch,
                                       ratios=[aug["crop"]["neg"]] + [fg_share] * (num_classes - 1),
                                       num_classes=num_classes, num_samples=num_samples,
                                       indices_key=CLASS_INDICES, warn=False)
    elif with_label:  # crop centres from SampleCropCentresd (run before, in the cached part)
        crop = RandCropByPosNegLabeld(keys=keys, label_key=LABEL, spatial_size=patch, pos=aug["crop"]["pos"],
                                      neg=aug["crop"]["neg"], num_samples=num_samples,
                                      fg_indices_key=FG_INDICES, bg_indices_key=BG_INDICES)
    else:
        crop = RandSpatialCropSamplesd(keys=keys, roi_size=patch, num_samples=num_samples, random_size=False)
    steps: list = [crop]
    if spatial_dims == 2:
        steps.append(SqueezeDimd(keys=keys, dim=3))  # [C, H, W, 1] -> [C, H, W]
    interp = ["bilinear", "nearest"] if with_label else "bilinear"
    rot = math.radians(aug["affine"]["rotate_deg"])
    steps += [RandFlipd(keys=keys, prob=aug["flip"]["prob"], spatial_axis=a) for a in range(spatial_dims)]
    steps += [
        RandAffined(keys=keys, prob=aug["affine"]["prob"], rotate_range=[rot] * (3 if spatial_dims == 3 else 1),
                    scale_range=[aug["affine"]["scale"]] * spatial_dims, mode=interp, padding_mode="zeros"),
        RandScaleIntensityd(keys=IMAGE, factors=aug["intensity"]["scale"], prob=aug["intensity"]["scale_prob"]),
        RandShiftIntensityd(keys=IMAGE, offsets=aug["intensity"]["shift"], prob=aug["intensity"]["shift_prob"]),
        RandGaussianNoised(keys=IMAGE, prob=aug["noise"]["prob"], std=aug["noise"]["std"]),
    ]
    return steps


def build_transforms(plan: Mapping[str, Any], *, train: bool, cfg: Mapping[str, Any] | None = None,
                     spatial_dims: int = 3, with_label: bool = True,
                     modalities: Mapping[int, str] | Sequence[str] | None = None) -> Compose:
    """The MONAI pipeline for one site: training (patches, augmented) or validation (whole volumes).

    Args:
        plan: the federated plan (:func:`medseg_core.data.fingerprint.load_plan`); checked here.
        train: random patches + augmentation (``True``) or deterministic whole volumes (``False``).
        cfg: augmentation settings (``configs/transforms/*.yaml``: ``crop``, ``flip``, ``affine``,
            ``intensity``, ``noise``); missing keys take :data:`DEFAULT_AUGMENTATION`.
        spatial_dims: 3 (3D patches), or 2: training patches are axial slices ``[C, H, W]`` of
            ``plan["patch_size_2d"]``; validation still yields whole volumes (infer slice-wise).
        with_label: ``False`` for unlabelled cases (pretraining): ``keys=["image"]`` only, random
            spatial crops instead of label-balanced ones.
        modalities: the site's ``channel_names`` in its declared order (the files' order); with a
            ``"by-name"`` plan the channels are reordered to the model's (:func:`input_channel_order`).

    Returns:
        A ``Compose`` over dicts ``{"image": [paths], "label": path, ...}`` (``Case.as_dict()``). Training
        output: a list of ``num_samples`` dicts with ``image`` float32 ``[C, *patch]`` and ``label`` int64
        ``[1, *patch]`` (plain tensors). Validation output: one dict with ``image`` float32
        ``[C, X, Y, Z]`` and ``label`` int64 ``[1, X, Y, Z]`` as MetaTensors on the plan's grid
        (RAS, target spacing, padded to at least the patch size), invertible with ``Invertd``.

    Raises:
        PlanError: a malformed plan.
        ValueError: ``spatial_dims`` not 2 or 3, bad augmentation settings, or modalities that do not
            fit the plan.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    check_plan(plan)
    keys = [IMAGE, LABEL] if with_label else [IMAGE]
    dtypes = [torch.float32, torch.int64] if with_label else [torch.float32]
    steps = deterministic_transforms(plan, with_label=with_label, modalities=modalities, spatial_dims=spatial_dims)
    if train:
        if with_label:
            by_class = _class_balanced(plan, augmentation_settings(cfg))
            steps.append(SampleCropCentresd(LABEL, num_classes=int(plan["num_classes"]) if by_class else None))
        steps += random_transforms(plan, cfg, with_label=with_label, spatial_dims=spatial_dims)
    else:
        augmentation_settings(cfg)  # validate the settings even when unused
    steps.append(EnsureTyped(keys=keys, dtype=dtypes, track_meta=not train))
    return Compose(steps)

