"""Which images self-supervised pretraining reads: never a label.

Per site (after the same validation as ``medseg-train``): the images without a label, the test images
(``imagesTs``; their labels are dropped), optionally the labelled training images (images only), plus
optional extra folders of NIfTI files. Every case handed to the loaders has ``label_path=None``, so the
pipeline (``build_unlabelled_loader``, ``keys=["image"]``) cannot open a label file.

Extra folders hold ``CASE_XXXX<ending>`` files (XXXX = 4-digit channel index, as ``imagesTr``), or, for
single-channel data, any ``<name><ending>`` file (one case each). Ours: the site contract
(:mod:`medseg_core.data.dataset`) needs a ``dataset.json``, which a plain folder of scans does not have.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg_core.data.dataset import Case, SiteDataset
from medseg_core.data.loaders import split_train_val
from medseg_core.data.problems import ERROR, DatasetError, Problem, problem

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def image_only(case: Case) -> Case:
    """The case without its label path (so nothing downstream can read the label)."""
    return dataclasses.replace(case, label_path=None)


def pretraining_cases(site: SiteDataset, *, unlabelled: bool = True, test: bool = True,
                      train: bool = False) -> list[Case]:
    """A site's images for pretraining, labels stripped, sorted by case id.

    Args:
        site: a validated site.
        unlabelled: images without a label (``imagesTr`` / ``imagesTs`` without label file).
        test: labelled test images (``imagesTs``); leave out when the test cases are evaluation patients
            of a later comparison.
        train: labelled training images.
    """
    chosen: list[Case] = []
    if unlabelled:
        chosen += site.unlabelled_cases
    if test:
        chosen += site.test_cases
    if train:
        chosen += site.train_cases
    return sorted((image_only(c) for c in chosen), key=lambda c: c.case_id)


def split_images(cases: Sequence[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Training and held-out images (validation loss); none held out with ``val_fraction <= 0`` or one image.

    Deterministic by case id (:func:`medseg_core.data.loaders.split_train_val`), so ``medseg-pretrain`` and a
    federated site holding the same images split them the same way.
    """
    if val_fraction <= 0 or len(cases) < 2:
        return list(cases), []
    return split_train_val(cases, val_fraction, seed)


def _read_image(path: Path, problems: list[Problem]) -> tuple[tuple[int, ...], np.ndarray] | None:
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        problems.append(problem(ERROR, "unreadable-image", path, f"cannot read image ({type(exc).__name__}: {exc})"))
        return None
    if data.ndim not in (2, 3):
        problems.append(problem(ERROR, "bad-dimensions", path, f"image must be 2D or 3D, got shape {data.shape}"))
        return None
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        problems.append(problem(ERROR, "non-finite-image", path, f"image has {int((~np.isfinite(data)).sum())} "
                                                                 "NaN/Inf voxel(s)"))
        return None
    return tuple(int(s) for s in data.shape), np.asarray(img.affine)


def image_folder_cases(folder: str | Path, *, num_channels: int, file_ending: str = ".nii.gz",
                       check: bool = True) -> list[Case]:
    """Cases of a plain folder of scans (see the module docstring), checked like a site's images.

    Args:
        folder: the folder.
        num_channels: channels every case must have (the federation's).
        file_ending: e.g. ``".nii.gz"``.
        check: read every file (readable, 2D/3D, finite, channels on one grid).

    Raises:
        DatasetError: the folder is missing or empty, a case lacks a channel, or a file fails a check;
            every problem is listed with its file.
    """
    folder = Path(folder).expanduser()
    problems: list[Problem] = []
    if not folder.is_dir():
        raise DatasetError([problem(ERROR, "missing-folder", folder, "extra image folder does not exist")], folder)
    channels: dict[str, dict[int, Path]] = {}
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith(".") or not f.name.endswith(file_ending):
            continue
        stem = f.name[: -len(file_ending)]
        m = _CHANNEL_RE.match(stem)
        if m is not None:
            channels.setdefault(m["case"], {})[int(m["channel"])] = f
        elif num_channels == 1:
            channels.setdefault(stem, {})[0] = f
        else:
            problems.append(problem(ERROR, "bad-filename", f, f"with {num_channels} channels, images must be named "
                                                              f"CASE_XXXX{file_ending} (XXXX = channel index)"))
    if not channels and not problems:
        problems.append(problem(ERROR, "empty-dataset", folder, f"no '{file_ending}' image found"))
    cases = []
    for case_id, chans in sorted(channels.items()):
        if sorted(chans) != list(range(num_channels)):
            problems.append(problem(ERROR, "missing-channel", next(iter(chans.values())),
                                    f"case '{case_id}' has channel(s) {sorted(chans)}, expected 0..{num_channels - 1}"))
            continue
        case = Case(case_id, tuple(chans[i] for i in range(num_channels)), None)
        if check:
            read = [_read_image(p, problems) for p in case.image_paths]
            if any(r is None for r in read):
                continue
            shapes = {r[0] for r in read}
            if len(shapes) > 1:
                problems.append(problem(ERROR, "channel-mismatch", case.image_paths[0],
                                        f"case '{case_id}' channels have different shapes {sorted(shapes)}"))
                continue
        cases.append(case)
    errors = [p for p in problems if p.severity == ERROR]
    if errors:
        raise DatasetError(errors, folder)
    return cases


def image_folder_site(folder: str | Path, reference: SiteDataset, name: str | None = None) -> SiteDataset:
    """A pseudo-site over an extra folder, with the reference site's channels (same normalisation)."""
    folder = Path(folder).expanduser()
    cases = image_folder_cases(folder, num_channels=reference.num_channels, file_ending=reference.file_ending)
    return SiteDataset(name=name or f"extra-{folder.name}", root=folder, layout="folder",
                       channel_names=dict(reference.channel_names), labels=dict(reference.labels),
                       file_ending=reference.file_ending, cases=cases)


def manifest(cases_by_site: dict[str, Sequence[Case]]) -> dict[str, list[dict[str, object]]]:
    """JSON-able list of the images each site pretrains on (case id and image files; no label)."""
    return {site: [{"case_id": c.case_id, "images": [str(p) for p in c.image_paths]} for c in cases]
            for site, cases in cases_by_site.items()}
