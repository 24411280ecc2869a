"""Dataset fingerprint and federated plan: the nnU-Net idea, computed where the data lives.

Data flow::

    each site:  compute_site_fingerprint(site) -> fingerprint (aggregates only, JSON)
    server:     merge_fingerprints([fp, ...])  -> merged fingerprint (pure function)
                make_plan(merged)              -> plan.json (target spacing, patch size, normalisation)
    each site:  build_transforms(plan, ...)    (medseg_core.data.transforms)

**What leaves a site.** A fingerprint holds only aggregates: per-case spacing and shape (header
values, no voxels), per channel a foreground-intensity histogram with count / sum / sum of squares /
min / max, the whole-image min / max, the fraction of non-zero voxels per image (summarised), and class
voxel counts. It never
holds a voxel array or a case id; its size does not grow with the image size.

**Axes.** Spacings and shapes are recorded in RAS axis order (the order the transforms resample in,
after ``Orientationd(axcodes="RAS")``), so sites that store their volumes in different orientations
agree on which axis is which.

**Histogram grid (mergeable, no range to agree on beforehand).** Intensities are binned on a fixed grid
that is uniform in ``asinh(x)`` with step :data:`HIST_BIN_WIDTH`: bin ``k`` covers
``[sinh(k*w), sinh((k+1)*w))``, ``w = 0.01``. Near zero the bins are ``w`` wide (fine for data scaled to
[0, 1]); for large ``|x|`` they are ``w*|x|`` wide (1 % relative: 2 HU at 200 HU, 10 HU at 1000 HU), so
the whole CT range [-1024, 3071] HU has at most ~1,600 bins whatever the number of voxels. Every site
uses the same grid, so the sum of the site histograms *is* the histogram of the pooled voxels, and any
percentile read from it is the pooled one to within the width of the bin it falls in
(:func:`histogram_bin_width`). A fixed-range, fixed-width grid would need every site to agree on a
range and resolution before seeing the data (HU, MR arbitrary units and [0, 1] data differ by orders
of magnitude); the ``asinh`` grid needs neither. Only non-empty bins are stored. nnU-Net itself
subsamples 10,000 foreground voxels per case; the histogram uses all of them.

**Normalisation across sites with different modalities.** The scheme follows the *declared* modality
of a channel (``dataset.json`` ``channel_names``), site by site: statistics are merged per
(channel index, modality), never across modalities. CT values are in Hounsfield units, an absolute
scale shared by every scanner, so a CT channel is clipped to the federation-wide foreground
[0.5, 99.5] percentiles and z-scored with the federation-wide foreground mean / std (global statistics,
as nnU-Net does for its pooled dataset). Any other modality (MR, ...) has no absolute scale: it is
z-scored per image over its non-zero voxels at transform time, so no shared statistics are needed. A
federation whose channel 0 is CT at one site and MR at another therefore gets a plan with both entries
for channel 0, and each site applies the one matching its own declaration. Merging fingerprints with
different label sets or channel counts is refused.

**Channel order: matched by name.** Hospitals list the same sequences in different orders (one site's
``dataset.json`` says ``{"0": "T1", "1": "T2"}``, another's ``{"0": "T2", "1": "T1"}``). Taken by index,
the model would read T2 where it learnt T1 at one site: nothing fails, the federation just learns a
worse model. So the model's input channels are the declared channels sorted by modality name (stable for
repeats such as two CT phases, :func:`model_channel_order`): both sites above feed T1 then T2. A site's
fingerprint is recorded in that order, plans say so (``"channel_order": "by-name"``), and
:func:`medseg_core.data.transforms.build_transforms` reorders every image on loading. When a site's
declared order is already sorted nothing moves. Plans written before this rule (no ``channel_order``)
keep the declared order, so older checkpoints predict as before. Channels whose names differ between
sites (CT at one, MR at another) stay matched by position, as before.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg_core.data.dataset import Case, SiteDataset
from medseg_core.data.problems import WARNING, Problem, problem

FINGERPRINT_VERSION = 1
PLAN_VERSION = 1
FINGERPRINT_KIND = "fingerprint"
PLAN_KIND = "plan"

#: step of the intensity histogram grid in asinh space (see the module docstring)
HIST_BIN_WIDTH = 1e-2
HIST_TRANSFORM = "asinh"

SCHEME_CT = "ct"
SCHEME_NONZERO = "nonzero"
SCHEMES = (SCHEME_CT, SCHEME_NONZERO)

DEFAULT_PERCENTILES = (0.5, 99.5)
DEFAULT_MAX_PATCH_VOXELS = 128**3
DEFAULT_MAX_PATCH_PIXELS_2D = 512**2
DEFAULT_NUM_POOL = 4
DEFAULT_ANISOTROPY_THRESHOLD = 3.0
AXES = "RAS"
#: plans and fingerprints whose channels are in :func:`model_channel_order` (see the module docstring)
CHANNEL_ORDER_BY_NAME = "by-name"
#: a CT image whose minimum is above this holds no air: probably not in HU (rescale intercept missing)
CT_AIR_MAX_HU = -500.0


class PlanError(ValueError):
    """A plan or fingerprint file/dict is malformed; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------
# histogram on the asinh grid


def histogram_bin_index(values: np.ndarray, bin_width: float = HIST_BIN_WIDTH) -> np.ndarray:
    """Index of the asinh-grid bin holding each value (same shape as ``values``, int64)."""
    return np.floor(np.arcsinh(np.asarray(values, dtype=np.float64)) / bin_width).astype(np.int64)


def histogram_bin_edges(index: int | np.ndarray, bin_width: float = HIST_BIN_WIDTH) -> tuple[Any, Any]:
    """Lower and upper edge of bin(s) ``index``."""
    index = np.asarray(index, dtype=np.float64)
    return np.sinh(index * bin_width), np.sinh((index + 1) * bin_width)


def histogram_bin_width(value: float, bin_width: float = HIST_BIN_WIDTH) -> float:
    """Width of the bin that holds ``value``: the accuracy of a percentile read from the histogram."""
    lo, hi = histogram_bin_edges(histogram_bin_index(np.asarray([value]), bin_width)[0], bin_width)
    return float(hi - lo)


def _histogram(values: np.ndarray, bin_width: float) -> dict[int, int]:
    if values.size == 0:
        return {}
    idx = histogram_bin_index(values, bin_width)
    uniq, counts = np.unique(idx, return_counts=True)
    return {int(k): int(c) for k, c in zip(uniq, counts, strict=True)}


def _hist_to_json(hist: Mapping[int, int]) -> dict[str, list[int]]:
    keys = sorted(hist)
    return {"index": keys, "count": [int(hist[k]) for k in keys]}


def _hist_from_json(hist: Mapping[str, Sequence[int]]) -> dict[int, int]:
    return {int(k): int(c) for k, c in zip(hist["index"], hist["count"], strict=True)}


def histogram_percentile(hist: Mapping[str, Sequence[int]], q: float, bin_width: float = HIST_BIN_WIDTH,
                         vmin: float | None = None, vmax: float | None = None) -> float:
    """The ``q``-th percentile (0..100) of the values summarised by a stored histogram.

    Uses numpy's default definition (rank ``q/100 * (n-1)`` in the sorted values) and places the
    values of a bin evenly inside it. The result lies in the bin that holds the value of that rank, so
    it is within :func:`histogram_bin_width` of the exact percentile when that rank's neighbours share
    the bin (always the case away from gaps in the data).

    Args:
        hist: ``{"index": [...], "count": [...]}`` as stored in a fingerprint.
        q: percentile in [0, 100].
        bin_width: grid step the histogram was made with.
        vmin, vmax: exact minimum / maximum of the data, to clamp the estimate.

    Raises:
        ValueError: ``q`` outside [0, 100] or an empty histogram.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    index = np.asarray(hist["index"], dtype=np.int64)
    count = np.asarray(hist["count"], dtype=np.int64)
    n = int(count.sum())
    if n == 0:
        raise ValueError("cannot take a percentile of an empty histogram")
    order = np.argsort(index)
    index, count = index[order], count[order]
    rank = q / 100.0 * (n - 1)
    cum = np.cumsum(count)  # cum[i] = number of values in bins 0..i
    i = int(np.searchsorted(cum, rank, side="right"))
    i = min(i, len(count) - 1)
    before = cum[i] - count[i]
    lo, hi = histogram_bin_edges(index[i], bin_width)
    value = float(lo + (rank - before + 0.5) / count[i] * (hi - lo))
    if vmin is not None:
        value = max(value, vmin)
    if vmax is not None:
        value = min(value, vmax)
    return value


# --------------------------------------------------------------------------------------------------
# site fingerprint


def scheme_for_modality(modality: str) -> str:
    """Normalisation scheme of a declared modality: ``"ct"`` for CT (any case), else ``"nonzero"``."""
    return SCHEME_CT if str(modality).strip().upper() == "CT" else SCHEME_NONZERO


def canonical_modality(modality: str) -> str:
    """The key a modality is merged under: ``"CT"`` for any spelling of CT, else the stripped name."""
    name = str(modality).strip()
    return "CT" if name.upper() == "CT" else name


def model_channel_order(modalities: Sequence[str]) -> list[int]:
    """Which declared channel feeds each model input channel: the declared channels sorted by name.

    Sorting is by :func:`canonical_modality` (case-insensitive) and stable, so repeated names (two CT
    phases) keep their declared order. ``["T2", "T1"]`` gives ``[1, 0]``; a sorted list gives the identity.
    """
    names = [canonical_modality(m).casefold() for m in modalities]
    return sorted(range(len(names)), key=lambda c: (names[c], c))


def ras_permutation(affine: np.ndarray) -> list[int]:
    """For each voxel axis, the RAS axis it maps to most closely (from the affine's direction)."""
    ornt = nib.orientations.io_orientation(np.asarray(affine))
    return [int(a) for a in ornt[:, 0]]


def _to_ras_order(values: Sequence[float], perm: Sequence[int]) -> list:
    out = [0] * len(perm)
    for voxel_axis, ras_axis in enumerate(perm):
        out[ras_axis] = values[voxel_axis]
    return out


def _load_case(case: Case, num_channels: int) -> tuple[list[np.ndarray], np.ndarray, nib.Nifti1Image]:
    """Voxel arrays (channels, label) and the first image of one case, checked for shape agreement and
    finite values."""
    if case.label_path is None:
        raise ValueError(f"case '{case.case_id}' ({case.image_paths[0]}) has no label")
    try:
        label_img = nib.load(str(case.label_path))
        label = np.asarray(label_img.dataobj)
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise ValueError(f"{case.label_path}: cannot read label ({exc})") from exc
    channels: list[np.ndarray] = []
    sources: list[Path] = []  # the file each channel came from, for error messages
    first_img = None
    for path in case.image_paths:
        try:
            img = nib.load(str(path))
            data = img.get_fdata(dtype=np.float32)
        except Exception as exc:
            raise ValueError(f"{path}: cannot read image ({exc})") from exc
        first_img = first_img or img
        if data.ndim == label.ndim + 1:  # MSD: channels along a trailing 4th axis
            channels.extend(data[..., c] for c in range(data.shape[-1]))
            sources.extend([path] * data.shape[-1])
        else:
            channels.append(data)
            sources.append(path)
    if len(channels) != num_channels:
        raise ValueError(f"{case.image_paths[0]}: case '{case.case_id}' has {len(channels)} channel(s), "
                         f"dataset.json declares {num_channels}")
    for path, data in zip(sources, channels, strict=True):
        if data.shape != label.shape:
            raise ValueError(f"{path}: image shape {data.shape} differs from label shape {label.shape} "
                             f"({case.label_path})")
        if not np.isfinite(data).all():
            raise ValueError(f"{path}: image holds NaN or Inf voxels")
    assert first_img is not None
    return channels, label, first_img


def _empty_channel_stats() -> dict[str, Any]:
    return {
        "num_cases": 0,
        "foreground": {"count": 0, "sum": 0.0, "sum_sq": 0.0, "min": None, "max": None,
                       "histogram": {"index": [], "count": []}},
        "nonzero_fraction": {"count": 0, "sum": 0.0, "min": None, "max": None},
        "image_min": None,
        "image_max": None,
    }


def _opt(fn, a, b):
    if a is None:
        return b
    if b is None:
        return a
    return fn(a, b)


def compute_site_fingerprint(site: SiteDataset, *, progress: bool = False) -> dict[str, Any]:
    """Fingerprint of a site's labelled training cases, computed locally (aggregates only).

    Args:
        site: the site (its ``train_cases`` are read; test and unlabelled cases are not).
        progress: show a progress bar.

    Returns:
        A JSON-serialisable dict (see the module docstring)::

            {"version", "kind": "fingerprint", "sites": [name], "num_cases", "spatial_dims",
             "labels", "histogram": {"transform", "bin_width"},
             "cases": [{"spacing_mm": [x, y, z], "shape": [X, Y, Z]}, ...],   # RAS order, sorted
             "channel_order": "by-name",   # "channels" below are in model_channel_order
             "declared_channels": ["T2", "T1"],   # the site's own order (names only)
             "channels": {"0": {"CT": {"num_cases", "foreground": {count, sum, sum_sq, min, max,
                                                                   histogram},
                                       "nonzero_fraction": {count, sum, min, max},
                                       "image_min", "image_max"}}},
             "classes": {"0": {"voxels", "cases"}, ...}}

    Raises:
        ValueError: the site has no labelled training case, a file cannot be read, image and label
            shapes differ, an image holds NaN/Inf, or a label holds a value not declared in
            ``dataset.json`` (the message names the file).
    """
    cases = site.train_cases
    if not cases:
        raise ValueError(f"site {site.name} ({site.root}) has no labelled training case to fingerprint")
    num_channels = site.num_channels
    if num_channels < 1:
        raise ValueError(f"site {site.name} ({site.root}): dataset.json declares no channel")
    declared = set(site.labels.values())
    modalities = [canonical_modality(site.modality(c)) for c in range(num_channels)]

    case_geoms: list[dict[str, list]] = []
    stats = [_empty_channel_stats() for _ in range(num_channels)]
    hists: list[dict[int, int]] = [{} for _ in range(num_channels)]
    fg_sums: list[list[float]] = [[] for _ in range(num_channels)]
    fg_sqs: list[list[float]] = [[] for _ in range(num_channels)]
    nz_fracs: list[list[float]] = [[] for _ in range(num_channels)]
    class_voxels: dict[int, int] = dict.fromkeys(sorted(declared), 0)
    class_cases: dict[int, int] = dict.fromkeys(sorted(declared), 0)
    spatial_dims = None

    iterator: Iterable[Case] = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc=f"fingerprint {site.name}", unit="case")
    for case in iterator:
        channels, label, img = _load_case(case, num_channels)
        spatial_dims = spatial_dims or label.ndim
        if label.ndim != spatial_dims:
            raise ValueError(f"{case.label_path}: {label.ndim}D label in a {spatial_dims}D dataset")
        if label.dtype.kind in "ui" and label.min() >= 0:  # bincount: ~10x faster than unique on 10M voxels
            counts_all = np.bincount(label.ravel())
            values = np.flatnonzero(counts_all)
            counts = counts_all[values]
        else:
            values, counts = np.unique(label, return_counts=True)
        if not np.all(np.equal(np.mod(values, 1), 0)):
            raise ValueError(f"{case.label_path}: label holds non-integer values")
        unknown = sorted({int(v) for v in values} - declared)
        if unknown:
            raise ValueError(f"{case.label_path}: label values {unknown} are not declared in dataset.json "
                             f"(declared: {sorted(declared)})")
        for v, n in zip(values, counts, strict=True):
            class_voxels[int(v)] += int(n)
            class_cases[int(v)] += 1

        # rounded to 1e-6 mm: headers store float32, whose noise (0.800000011920929) is not information
        zooms = [round(float(z), 6) for z in img.header.get_zooms()[:spatial_dims]]
        perm = ras_permutation(img.affine) if spatial_dims == 3 else list(range(spatial_dims))
        case_geoms.append({"spacing_mm": _to_ras_order(zooms, perm),
                           "shape": _to_ras_order([int(s) for s in label.shape], perm)})

        fg = label > 0
        for c, data in enumerate(channels):
            v = data[fg].astype(np.float64)  # [N_fg] foreground intensities of this case
            s = stats[c]
            s["num_cases"] += 1
            f = s["foreground"]
            f["count"] += int(v.size)
            fg_sums[c].append(float(v.sum()))
            fg_sqs[c].append(float(np.square(v).sum()))
            if v.size:
                f["min"] = _opt(min, f["min"], float(v.min()))
                f["max"] = _opt(max, f["max"], float(v.max()))
            for k, n in _histogram(v, HIST_BIN_WIDTH).items():
                hists[c][k] = hists[c].get(k, 0) + n
            nz_fracs[c].append(float(np.count_nonzero(data)) / data.size)
            s["image_min"] = _opt(min, s["image_min"], float(data.min()))
            s["image_max"] = _opt(max, s["image_max"], float(data.max()))

    channel_entries: dict[str, dict[str, Any]] = {}
    for position, c in enumerate(model_channel_order(modalities)):  # the model's channel order
        s = stats[c]
        s["foreground"]["sum"] = math.fsum(fg_sums[c])
        s["foreground"]["sum_sq"] = math.fsum(fg_sqs[c])
        s["foreground"]["histogram"] = _hist_to_json(hists[c])
        s["nonzero_fraction"] = {"count": len(nz_fracs[c]), "sum": math.fsum(nz_fracs[c]),
                                 "min": min(nz_fracs[c]), "max": max(nz_fracs[c])}
        channel_entries[str(position)] = {modalities[c]: s}

    return {
        "version": FINGERPRINT_VERSION,
        "kind": FINGERPRINT_KIND,
        "sites": [site.name],
        "num_cases": len(cases),
        "spatial_dims": int(spatial_dims or 3),
        "axes": AXES,
        "channel_order": CHANNEL_ORDER_BY_NAME,
        "declared_channels": modalities,  # names only, in the site's file order (for the plan's notes)
        "labels": {name: int(v) for name, v in sorted(site.labels.items(), key=lambda kv: kv[1])},
        "histogram": {"transform": HIST_TRANSFORM, "bin_width": HIST_BIN_WIDTH},
        "cases": sorted(case_geoms, key=_geom_key),
        "channels": channel_entries,
        "classes": {str(v): {"voxels": class_voxels[v], "cases": class_cases[v]} for v in sorted(declared)},
    }


def _geom_key(g: Mapping[str, Sequence[float]]) -> tuple:
    return tuple(g["spacing_mm"]) + tuple(g["shape"])


def fingerprint_problems(fp: Mapping[str, Any]) -> list[Problem]:
    """Plausibility checks on a *site* fingerprint (run where the per-site detail still exists).

    Currently: a channel declared CT whose images never go below :data:`CT_AIR_MAX_HU` contains no air,
    so its values are probably not Hounsfield units (e.g. stored without the DICOM rescale intercept,
    air at +24 instead of -1000). Merged CT statistics would mix two scales, so the site should fix its
    files (or declare the channel as non-CT) before planning.

    Returns:
        Warnings, with the site name(s) as ``path``.
    """
    found = []
    where = ", ".join(fp.get("sites", [])) or "fingerprint"
    for ch, by_modality in fp.get("channels", {}).items():
        for modality, s in by_modality.items():
            lowest = s.get("image_min")
            if scheme_for_modality(modality) == SCHEME_CT and lowest is not None and lowest > CT_AIR_MAX_HU:
                found.append(problem(
                    WARNING, "ct-not-hu", where,
                    f"channel {ch} is declared {modality} but its lowest value is {lowest:.0f} (air is -1000 HU): "
                    f"the images are probably not in Hounsfield units (missing rescale intercept?)"))
    return found


# --------------------------------------------------------------------------------------------------
# merge


def check_fingerprint(fp: Mapping[str, Any], where: str | Path | None = None) -> None:
    """Check that ``fp`` is a fingerprint this code can read.

    Raises:
        PlanError: naming ``where`` (a file) and the first problem found.
    """
    name = f"fingerprint {where}" if where is not None else "fingerprint"
    if not isinstance(fp, Mapping):
        raise PlanError(f"{name}: expected a JSON object, got {type(fp).__name__}")
    if fp.get("kind") != FINGERPRINT_KIND:
        raise PlanError(f"{name}: 'kind' must be {FINGERPRINT_KIND!r}, got {fp.get('kind')!r}")
    if fp.get("version") != FINGERPRINT_VERSION:
        raise PlanError(f"{name}: version {fp.get('version')!r} is not supported (this code reads "
                        f"version {FINGERPRINT_VERSION})")
    for key in ("sites", "num_cases", "spatial_dims", "labels", "histogram", "cases", "channels", "classes"):
        if key not in fp:
            raise PlanError(f"{name}: missing key {key!r}")
    if len(fp["cases"]) != fp["num_cases"]:
        raise PlanError(f"{name}: {len(fp['cases'])} case geometries for num_cases={fp['num_cases']}")


def _merge_stats(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    fa, fb = a["foreground"], b["foreground"]
    hist = _hist_from_json(fa["histogram"])
    for k, n in _hist_from_json(fb["histogram"]).items():
        hist[k] = hist.get(k, 0) + n
    na, nb = a["nonzero_fraction"], b["nonzero_fraction"]
    return {
        "num_cases": a["num_cases"] + b["num_cases"],
        "foreground": {
            "count": fa["count"] + fb["count"],
            "sum": math.fsum([fa["sum"], fb["sum"]]),
            "sum_sq": math.fsum([fa["sum_sq"], fb["sum_sq"]]),
            "min": _opt(min, fa["min"], fb["min"]),
            "max": _opt(max, fa["max"], fb["max"]),
            "histogram": _hist_to_json(hist),
        },
        "nonzero_fraction": {
            "count": na["count"] + nb["count"],
            "sum": math.fsum([na["sum"], nb["sum"]]),
            "min": _opt(min, na["min"], nb["min"]),
            "max": _opt(max, na["max"], nb["max"]),
        },
        "image_min": _opt(min, a["image_min"], b["image_min"]),
        "image_max": _opt(max, a["image_max"], b["image_max"]),
    }


def merge_fingerprints(fps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge site (or already merged) fingerprints into one; a pure function.

    Histograms, counts and class voxels are summed (exact); sums of intensities and squares are summed
    with :func:`math.fsum`; per-case geometries are concatenated and sorted; site names are sorted.
    The result does not depend on the order of ``fps`` (up to the last bit of the float sums when more
    than two fingerprints are merged) and has the same format as its inputs, so merging is associative.
    The inputs are not modified.

    Raises:
        ValueError: empty list, or fingerprints that disagree on labels, channel count, channel-order
            convention (``channel_order``), spatial dimensions or histogram grid.
        PlanError: an input is not a fingerprint.
    """
    if not fps:
        raise ValueError("merge_fingerprints needs at least one fingerprint, got an empty list")
    for i, fp in enumerate(fps):
        check_fingerprint(fp, where=f"#{i} ({', '.join(fp.get('sites', []))})" if isinstance(fp, Mapping) else i)
    first = fps[0]
    for fp in fps[1:]:
        if fp.get("channel_order") != first.get("channel_order"):
            raise ValueError(f"cannot merge fingerprints of sites {first['sites']} and {fp['sites']}: one has its "
                             f"channels in declared order, the other by name (channel_order "
                             f"{first.get('channel_order')!r} vs {fp.get('channel_order')!r}); fingerprint "
                             f"every site with the same version")
        for key in ("labels", "spatial_dims", "histogram"):
            if fp[key] != first[key]:
                raise ValueError(f"cannot merge fingerprints of sites {first['sites']} and {fp['sites']}: "
                                 f"'{key}' differs ({first[key]!r} vs {fp[key]!r})")
        if set(fp["channels"]) != set(first["channels"]):
            raise ValueError(f"cannot merge fingerprints of sites {first['sites']} and {fp['sites']}: "
                             f"channels {sorted(first['channels'])} vs {sorted(fp['channels'])}")
    channels: dict[str, dict[str, Any]] = {}
    for fp in fps:
        for ch, by_modality in fp["channels"].items():
            target = channels.setdefault(ch, {})
            for modality, s in by_modality.items():
                target[modality] = _merge_stats(target.get(modality, _empty_channel_stats()), s)
    classes: dict[str, dict[str, int]] = {}
    for fp in fps:
        for v, c in fp["classes"].items():
            t = classes.setdefault(v, {"voxels": 0, "cases": 0})
            t["voxels"] += int(c["voxels"])
            t["cases"] += int(c["cases"])
    sites = sorted(s for fp in fps for s in fp["sites"])
    if len(set(sites)) != len(sites):
        raise ValueError(f"a site appears in more than one fingerprint: {sites}")
    order = {"channel_order": first["channel_order"]} if first.get("channel_order") else {}
    return {
        "version": FINGERPRINT_VERSION,
        "kind": FINGERPRINT_KIND,
        "sites": sites,
        "num_cases": sum(int(fp["num_cases"]) for fp in fps),
        "spatial_dims": first["spatial_dims"],
        "axes": AXES,
        **order,
        "labels": dict(first["labels"]),
        "histogram": dict(first["histogram"]),
        "cases": sorted(({"spacing_mm": [float(s) for s in g["spacing_mm"]], "shape": [int(s) for s in g["shape"]]}
                         for fp in fps for g in fp["cases"]), key=_geom_key),
        "channels": {ch: {m: channels[ch][m] for m in sorted(channels[ch])} for ch in sorted(channels, key=int)},
        "classes": {v: classes[v] for v in sorted(classes, key=int)},
    }


# --------------------------------------------------------------------------------------------------
# plan




def target_spacing(spacings_mm: np.ndarray, anisotropy_threshold: float = DEFAULT_ANISOTROPY_THRESHOLD
                   ) -> tuple[list[float], int | None]:
    """nnU-Net's target spacing: the median spacing per axis, with the anisotropic rule.

    If the largest median spacing exceeds ``anisotropy_threshold`` times the smallest, the low-resolution
    axis gets the 10th percentile of its spacings instead (so most cases are upsampled a little along it
    rather than thin-slice cases being thrown away), but never finer than the other axes' targets.

    Args:
        spacings_mm: ``[N, D]`` per-case spacings (RAS order).
        anisotropy_threshold: ratio above which the rule applies (nnU-Net: 3).

    Returns:
        The target spacing (mm, per axis) and the low-resolution axis the rule changed, or ``None``.
    """
    spacings_mm = np.asarray(spacings_mm, dtype=np.float64)
    target = np.median(spacings_mm, axis=0)
    worst = int(np.argmax(target))
    if target[worst] > anisotropy_threshold * target.min():
        others = np.delete(target, worst)
        target[worst] = max(float(np.percentile(spacings_mm[:, worst], 10)), float(others.max()))
        return [float(t) for t in target], worst
    return [float(t) for t in target], None


def fit_patch_size(median_shape: Sequence[int], spacing_mm: Sequence[float], max_voxels: int,
                   divisor: int) -> list[int]:
    """Largest patch that fits in ``median_shape``, is divisible by ``divisor`` and has ``<= max_voxels``.

    Starts from the median shape rounded down to multiples of ``divisor`` (at least ``divisor``: smaller
    volumes are padded), then repeatedly shortens the axis with the largest physical extent (mm) by
    ``divisor`` until the voxel budget holds, which keeps the patch's field of view roughly isotropic,
    like nnU-Net's planner.

    Raises:
        ValueError: ``divisor`` < 1 or a budget smaller than one ``divisor``-cube.
    """
    if divisor < 1:
        raise ValueError(f"divisor must be >= 1, got {divisor}")
    if max_voxels < divisor ** len(median_shape):
        raise ValueError(f"voxel budget {max_voxels} is below the smallest patch {divisor}^{len(median_shape)}")
    patch = [max(divisor, (int(s) // divisor) * divisor) for s in median_shape]
    while math.prod(patch) > max_voxels:
        axis = max((i for i in range(len(patch)) if patch[i] > divisor),
                   key=lambda i: (patch[i] * spacing_mm[i], patch[i], -i))
        patch[axis] -= divisor
    return patch


def make_plan(merged: Mapping[str, Any], *, max_patch_voxels: int = DEFAULT_MAX_PATCH_VOXELS,
              max_patch_pixels_2d: int = DEFAULT_MAX_PATCH_PIXELS_2D, num_pool: int = DEFAULT_NUM_POOL,
              anisotropy_threshold: float = DEFAULT_ANISOTROPY_THRESHOLD,
              percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> dict[str, Any]:
    """Plan preprocessing for the whole federation from a (merged) fingerprint.

    Args:
        merged: a fingerprint (usually :func:`merge_fingerprints` of every site's).
        max_patch_voxels: voxel budget of the 3D training patch.
        max_patch_pixels_2d: pixel budget of the 2D (axial-slice) patch.
        num_pool: patch sides are multiples of ``2**num_pool``.
        anisotropy_threshold: see :func:`target_spacing`.
        percentiles: CT clipping percentiles of the foreground intensities.

    Returns:
        A JSON-serialisable plan::

            {"version", "kind": "plan", "sites", "num_cases", "spatial_dims", "axes": "RAS",
             "labels", "num_classes", "num_channels", "channel_order": "by-name",
             "target_spacing_mm", "anisotropic_axis", "median_shape", "patch_size", "patch_size_2d",
             "divisor", "max_patch_voxels", "max_patch_pixels_2d",
             "normalization": {"0": {"CT": {"scheme": "ct", "clip": [lo, hi], "mean", "std",
                                            "percentiles", "clip_tolerance"},
                                     "MR": {"scheme": "nonzero", "nonzero_fraction_mean"}}},
             "class_frequencies": {"0": f0, ...}}

        ``median_shape`` is the median case shape after resampling to the target spacing (RAS order);
        ``clip_tolerance`` is the width of the histogram bins the clip values were read from.

    Raises:
        ValueError: bad arguments, or a CT channel without foreground voxels.
        PlanError: ``merged`` is not a fingerprint.
    """
    check_fingerprint(merged)
    if num_pool < 0:
        raise ValueError(f"num_pool must be >= 0, got {num_pool}")
    lo_q, hi_q = percentiles
    if not 0.0 <= lo_q < hi_q <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    if anisotropy_threshold <= 1.0:
        raise ValueError(f"anisotropy_threshold must be > 1, got {anisotropy_threshold}")
    if merged["num_cases"] < 1:
        raise ValueError("the fingerprint holds no case")
    divisor = 2**num_pool
    spacings = np.asarray([g["spacing_mm"] for g in merged["cases"]], dtype=np.float64)  # [N, D]
    shapes = np.asarray([g["shape"] for g in merged["cases"]], dtype=np.float64)  # [N, D]
    target, aniso_axis = target_spacing(spacings, anisotropy_threshold)
    resampled = np.round(shapes * spacings / np.asarray(target))  # [N, D] shapes at the target spacing
    median_shape = [int(s) for s in np.median(resampled, axis=0)]
    patch = fit_patch_size(median_shape, target, max_patch_voxels, divisor)
    patch_2d = fit_patch_size(median_shape[:2], target[:2], max_patch_pixels_2d, divisor)

    bin_width = float(merged["histogram"]["bin_width"])
    normalization: dict[str, dict[str, Any]] = {}
    for ch, by_modality in merged["channels"].items():
        entry: dict[str, Any] = {}
        for modality, s in by_modality.items():
            scheme = scheme_for_modality(modality)
            if scheme == SCHEME_CT:
                f = s["foreground"]
                n = int(f["count"])
                if n == 0:
                    raise ValueError(f"channel {ch} ({modality}) has no foreground voxel in sites "
                                     f"{merged['sites']}: cannot compute CT normalisation statistics")
                mean = f["sum"] / n
                var = max(f["sum_sq"] / n - mean * mean, 0.0)
                lo = histogram_percentile(f["histogram"], lo_q, bin_width, f["min"], f["max"])
                hi = histogram_percentile(f["histogram"], hi_q, bin_width, f["min"], f["max"])
                entry[modality] = {
                    "scheme": SCHEME_CT, "clip": [lo, hi], "mean": mean, "std": max(math.sqrt(var), 1e-8),
                    "percentiles": [lo_q, hi_q],
                    "clip_tolerance": [histogram_bin_width(lo, bin_width), histogram_bin_width(hi, bin_width)],
                }
            else:
                nz = s["nonzero_fraction"]
                entry[modality] = {"scheme": SCHEME_NONZERO,
                                   "nonzero_fraction_mean": nz["sum"] / nz["count"] if nz["count"] else None}
        normalization[ch] = entry

    total = sum(c["voxels"] for c in merged["classes"].values())
    labels = dict(merged["labels"])
    return {
        "version": PLAN_VERSION,
        "kind": PLAN_KIND,
        "sites": list(merged["sites"]),
        "num_cases": int(merged["num_cases"]),
        "spatial_dims": int(merged["spatial_dims"]),
        "axes": AXES,
        "labels": labels,
        "num_classes": max(labels.values()) + 1,
        "num_channels": len(merged["channels"]),
        **({"channel_order": merged["channel_order"]} if merged.get("channel_order") else {}),
        "target_spacing_mm": target,
        "anisotropic_axis": aniso_axis,
        "median_shape": median_shape,
        "patch_size": patch,
        "patch_size_2d": patch_2d,
        "divisor": divisor,
        "max_patch_voxels": int(max_patch_voxels),
        "max_patch_pixels_2d": int(max_patch_pixels_2d),
        "normalization": normalization,
        "class_frequencies": {v: (c["voxels"] / total if total else 0.0) for v, c in merged["classes"].items()},
    }


def channel_order_notes(fps: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What a federation's channels mean, in words, for ``plan.json`` and the run's report.

    One line per site whose channels the model takes in another order than the site lists them, and
    one per model channel that carries different modalities at different sites (CT at one, MR at
    another: allowed, each normalised by its own scheme, but the model learns them as one input).

    Args:
        fps: site name -> that site's fingerprint (merged fingerprints hold no declared order).
    """
    notes = []
    for site, fp in sorted(fps.items()):
        declared = fp.get("declared_channels")
        if not declared or fp.get("channel_order") != CHANNEL_ORDER_BY_NAME:
            continue
        order = model_channel_order(declared)
        if order != sorted(order):
            notes.append(f"{site} lists its channels as {', '.join(declared)}; they are matched to the model's "
                         f"channels by name: {', '.join(declared[c] for c in order)}")
    if len(fps) > 1:
        channels = sorted({ch for fp in fps.values() for ch in fp.get("channels", {})}, key=int)
        for ch in channels:
            at = {site: ", ".join(fp["channels"].get(ch, {})) for site, fp in sorted(fps.items())}
            if len(set(at.values())) > 1:
                notes.append(f"model channel {ch} is " + ", ".join(f"{m} at {site}" for site, m in at.items())
                             + ": one input for different modalities (each normalised by its own scheme)")
    return notes


def plan_federation(sites: Sequence[SiteDataset], **plan_kwargs: Any) -> tuple[list[dict], dict, dict]:
    """Fingerprint every site, merge and plan, in one process (simulation, tests, ``medseg-data``).

    In a real deployment each site runs :func:`compute_site_fingerprint` itself and sends only the
    result; this helper does the same steps in order.

    Returns:
        ``(site_fingerprints, merged_fingerprint, plan)``.

    Problems found by :func:`fingerprint_problems` are listed in ``plan["warnings"]``; reordered sites
    and channels that carry different modalities at different sites (:func:`channel_order_notes`) in
    ``plan["notes"]``.
    """
    fps = [compute_site_fingerprint(s) for s in sites]
    merged = merge_fingerprints(fps)
    plan = make_plan(merged, **plan_kwargs)
    found = [str(p) for fp in fps for p in fingerprint_problems(fp)]
    if found:
        plan["warnings"] = found
    notes = channel_order_notes({s.name: fp for s, fp in zip(sites, fps, strict=True)})
    if notes:
        plan["notes"] = notes
    return fps, merged, plan


# --------------------------------------------------------------------------------------------------
# JSON artefacts


def _dumps(obj: Any, indent: int = 0) -> str:
    """JSON with nested objects indented and lists of scalars on one line (readable plans)."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(obj, Mapping):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {_dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if all(not isinstance(v, (Mapping, list, tuple)) for v in obj):
            return json.dumps(list(obj), allow_nan=False)
        return "[\n" + ",\n".join(inner + _dumps(v, indent + 1) for v in obj) + "\n" + pad + "]"
    if isinstance(obj, np.generic):
        obj = obj.item()
    return json.dumps(obj, allow_nan=False)


def save_json(obj: Mapping[str, Any], path: str | Path) -> Path:
    """Write a fingerprint or plan as readable JSON (atomically: a temporary file renamed into place).

    Raises:
        ValueError: ``obj`` holds NaN/Inf or non-JSON values.
    """
    path = Path(path)
    text = _dumps(obj) + "\n"
    json.loads(text)  # fail before writing if the text is not valid JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def _read_json(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError as exc:
        raise PlanError(f"{what} {path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{what} {path} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise PlanError(f"{what} {path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def load_fingerprint(path: str | Path) -> dict[str, Any]:
    """Read and check a fingerprint JSON file.

    Raises:
        PlanError: missing, unreadable or malformed file (the message names it).
    """
    fp = _read_json(path, "fingerprint")
    check_fingerprint(fp, where=path)
    return fp


def _positive_list(plan: Mapping[str, Any], key: str, n: int, name: str, integer: bool = False) -> None:
    value = plan.get(key)
    ok = isinstance(value, list) and len(value) == n and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)
    if ok and integer:
        ok = all(float(v).is_integer() for v in value)
    if not ok:
        kind = "integers" if integer else "numbers"
        raise PlanError(f"{name}: {key!r} must be a list of {n} positive {kind}, got {value!r}")


def check_plan(plan: Mapping[str, Any], where: str | Path | None = None) -> None:
    """Check that ``plan`` has every key the transforms need, with sane values.

    Raises:
        PlanError: naming ``where`` and the problem (wrong version, missing key, bad spacing, patch size
            not divisible by ``divisor``, unknown normalisation scheme, CT clip range empty, ...).
    """
    name = f"plan {where}" if where is not None else "plan"
    if not isinstance(plan, Mapping):
        raise PlanError(f"{name}: expected a JSON object, got {type(plan).__name__}")
    if plan.get("kind") != PLAN_KIND:
        raise PlanError(f"{name}: 'kind' must be {PLAN_KIND!r}, got {plan.get('kind')!r}")
    if plan.get("version") != PLAN_VERSION:
        raise PlanError(f"{name}: version {plan.get('version')!r} is not supported (this code reads "
                        f"version {PLAN_VERSION}); re-plan with `medseg-data fingerprint`")
    required = ("spatial_dims", "labels", "num_classes", "num_channels", "target_spacing_mm", "patch_size",
                "patch_size_2d", "divisor", "normalization")
    missing = [k for k in required if k not in plan]
    if missing:
        raise PlanError(f"{name}: missing key(s) {missing}")
    dims = plan["spatial_dims"]
    if dims not in (2, 3):
        raise PlanError(f"{name}: 'spatial_dims' must be 2 or 3, got {dims!r}")
    _positive_list(plan, "target_spacing_mm", dims, name)
    _positive_list(plan, "patch_size", dims, name, integer=True)
    _positive_list(plan, "patch_size_2d", 2, name, integer=True)
    div = plan["divisor"]
    if not isinstance(div, int) or div < 1:
        raise PlanError(f"{name}: 'divisor' must be a positive integer, got {div!r}")
    for key in ("patch_size", "patch_size_2d"):
        if any(int(p) % div for p in plan[key]):
            raise PlanError(f"{name}: {key!r} {plan[key]} is not divisible by divisor {div}")
    labels = plan["labels"]
    if not isinstance(labels, Mapping) or not labels or 0 not in labels.values():
        raise PlanError(f"{name}: 'labels' must map class names to integers, with background 0; got {labels!r}")
    order = plan.get("channel_order")
    if order is not None and order != CHANNEL_ORDER_BY_NAME:
        raise PlanError(f"{name}: 'channel_order' must be {CHANNEL_ORDER_BY_NAME!r} (or absent: declared "
                        f"order, plans written before channels were matched by name), got {order!r}")
    norm = plan["normalization"]
    n_ch = plan["num_channels"]
    if not isinstance(norm, Mapping) or sorted(norm, key=str) != sorted(str(c) for c in range(n_ch)):
        raise PlanError(f"{name}: 'normalization' must have one entry per channel 0..{n_ch - 1}, "
                        f"got keys {list(norm) if isinstance(norm, Mapping) else norm!r}")
    for ch, by_modality in norm.items():
        if not isinstance(by_modality, Mapping) or not by_modality:
            raise PlanError(f"{name}: normalization of channel {ch} must map modality -> settings")
        for modality, entry in by_modality.items():
            scheme = entry.get("scheme") if isinstance(entry, Mapping) else None
            if scheme not in SCHEMES:
                raise PlanError(f"{name}: channel {ch} ({modality}): unknown scheme {scheme!r}; "
                                f"expected one of {SCHEMES}")
            if scheme == SCHEME_CT:
                clip, std = entry.get("clip"), entry.get("std")
                if (not isinstance(clip, list) or len(clip) != 2 or not clip[0] < clip[1]
                        or not isinstance(entry.get("mean"), (int, float))):
                    raise PlanError(f"{name}: channel {ch} ({modality}): CT needs 'clip': [low, high] with "
                                    f"low < high and a 'mean', got clip={clip!r}")
                if not isinstance(std, (int, float)) or std <= 0:
                    raise PlanError(f"{name}: channel {ch} ({modality}): 'std' must be > 0, got {std!r}")


def load_plan(path: str | Path) -> dict[str, Any]:
    """Read and check a plan JSON file (see :func:`check_plan`).

    Raises:
        PlanError: missing, unreadable or malformed file (the message names it).
    """
    plan = _read_json(path, "plan")
    check_plan(plan, where=path)
    return plan
