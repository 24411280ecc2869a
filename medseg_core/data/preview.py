"""Preview PNG of a federation: one column per site, so scanner differences are visible at a glance.

Rows: axial slice (grey), the same slice with the label overlay, a coronal slice with the overlay
(shows slice thickness), and the intensity histogram of background / organ / lesion voxels. Slices are
taken after reorienting to RAS with nibabel and drawn in radiological convention (patient's right on
the viewer's left, anterior up), with the true millimetre aspect ratio.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg_core.data.dataset import Case, SiteDataset, discover_site, site_dirs
from medseg_core.data.problems import ERROR, DatasetError, problem

_MAX_CANDIDATES = 8  # label files read per site when looking for a case with a lesion
_LABEL_COLOURS = ((0.1, 0.8, 0.2, 0.45), (1.0, 0.15, 0.1, 0.75), (0.2, 0.4, 1.0, 0.6), (1.0, 0.8, 0.0, 0.6))


def _pick_case(site: SiteDataset) -> tuple[Case, np.ndarray]:
    """The labelled case with the most voxels of the highest class among the first few (and its label)."""
    candidates = (site.train_cases + site.test_cases)[:_MAX_CANDIDATES]
    if not candidates:
        raise DatasetError([problem(ERROR, "empty-dataset", site.root, "no labelled case to preview")], site.root)
    best, best_key, best_label = None, None, None
    for case in candidates:
        lab = np.asanyarray(nib.as_closest_canonical(nib.load(str(case.label_path))).dataobj)
        counts = np.bincount(lab.astype(np.int64).ravel())
        key = (len(counts), int(counts[-1]) if len(counts) > 1 else 0)
        if best_key is None or key > best_key:
            best, best_key, best_label = case, key, lab
    return best, best_label  # type: ignore[return-value]


def _window(img: np.ndarray, label: np.ndarray, modality: str) -> tuple[float, float]:
    """Display range: CT soft-tissue window (W500) just below the labelled tissue; MR percentiles.

    The CT window follows the data rather than fixed HU so that CT stored without the rescale
    intercept still displays.
    """
    if modality.upper() == "CT":
        centre = float(np.median(img[label > 0])) if (label > 0).any() else float(np.median(img))
        return centre - 320.0, centre + 180.0
    lo, hi = np.percentile(img, [1.0, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def _overlay(ax, label2d: np.ndarray, extent: list[float]) -> None:
    rgba = np.zeros(label2d.shape + (4,), dtype=float)
    for value in range(1, int(label2d.max()) + 1):
        rgba[label2d == value] = _LABEL_COLOURS[(value - 1) % len(_LABEL_COLOURS)]
    ax.imshow(rgba, extent=extent, origin="lower", interpolation="nearest")


def render_preview(path: str | Path, out_png: str | Path, dpi: int = 110) -> Path:
    """Write one PNG previewing every site under ``path`` (a federation root or one site).

    For each site the labelled case with the most lesion voxels (among the first few) is shown; the
    axial and coronal slices pass through the centre of its highest label class (the middle slice if
    the label is empty).

    Args:
        path: federation root or site folder.
        out_png: output PNG file (parent folders are created).
        dpi: resolution.

    Returns:
        The PNG path.

    Raises:
        DatasetError: no site found, or a site without a labelled case.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dirs = site_dirs(path)
    if not dirs:
        raise DatasetError([problem(ERROR, "no-sites", path, "no site folder (with dataset.json or imagesTr/) found")],
                           path)
    fig, axes = plt.subplots(4, len(dirs), figsize=(3.3 * len(dirs), 12.5), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 1, 1, 0.7]})
    for col, d in enumerate(dirs):
        site = discover_site(d)
        case, label = _pick_case(site)
        img_nii = nib.as_closest_canonical(nib.load(str(case.image_paths[0])))
        img = np.asanyarray(img_nii.get_fdata(dtype=np.float32))
        if img.ndim == 4:  # MSD: channels last
            img = img[..., 0]
        sp = [float(s) for s in img_nii.header.get_zooms()[:3]]
        top = int(label.max())
        centre = (np.argwhere(label == top).mean(axis=0).round().astype(int) if top > 0
                  else np.asarray(label.shape) // 2)
        lo, hi = _window(img, label, site.modality(0))
        # Radiological view: flip x so the patient's right is on the viewer's left.
        ax_img, ax_lab = img[::-1, :, centre[2]].T, label[::-1, :, centre[2]].T  # [y, x]
        co_img, co_lab = img[::-1, centre[1], :].T, label[::-1, centre[1], :].T  # [z, x]
        ext_ax = [0.0, img.shape[0] * sp[0], 0.0, img.shape[1] * sp[1]]
        ext_co = [0.0, img.shape[0] * sp[0], 0.0, img.shape[2] * sp[2]]
        for row, (sl, lab, ext) in enumerate(((ax_img, None, ext_ax), (ax_img, ax_lab, ext_ax),
                                              (co_img, co_lab, ext_co))):
            ax = axes[row, col]
            ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi, extent=ext, origin="lower", interpolation="nearest")
            if lab is not None:
                _overlay(ax, lab, ext)
            ax.set_xticks([])
            ax.set_yticks([])
        meta = site.dataset_json
        desc = (meta.get("scanner") or {}).get("description") or meta.get("description") or ""
        orient = "".join(nib.aff2axcodes(nib.load(str(case.image_paths[0])).affine))
        stored_sp = "x".join(f"{s:g}" for s in nib.load(str(case.image_paths[0])).header.get_zooms()[:3])
        title = f"{site.name}: {site.modality(0)}\n" + "\n".join(textwrap.wrap(desc, 38))
        axes[0, col].set_title(title, fontsize=8)
        axes[0, col].set_ylabel(f"axial z={centre[2]} (RAS)", fontsize=7)
        axes[1, col].set_ylabel(f"{case.case_id}", fontsize=7)
        axes[2, col].set_ylabel(f"coronal; stored {orient}, {stored_sp} mm", fontsize=7)

        ax = axes[3, col]
        bins = np.linspace(float(np.percentile(img, 0.5)), float(np.percentile(img, 99.9)), 80)
        for value, name, colour in ((0, "background", "0.4"), (1, "organ", "tab:green"), (2, "lesion", "tab:red")):
            voxels = img[label == value]
            if voxels.size:
                ax.hist(voxels, bins=bins, histtype="step", color=colour, label=name, density=True)
        ax.set_yscale("log")
        ax.tick_params(labelsize=6)
        ax.set_xlabel("stored intensity", fontsize=7)
        if col == 0:
            ax.legend(fontsize=6)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
