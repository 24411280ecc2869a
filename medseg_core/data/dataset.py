"""The site dataset contract: one folder per hospital, nnU-Net v2 raw layout or MSD ``dataset.json``.

nnU-Net v2 raw layout::

    SITE/dataset.json            {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
                                  "file_ending": ".nii.gz", ...}
    SITE/imagesTr/CASE_0000.nii.gz   channel 0 of CASE (CASE_0001... for more channels)
    SITE/labelsTr/CASE.nii.gz        label map of CASE (absent: CASE is unlabelled)
    SITE/imagesTs/, SITE/labelsTs/   optional held-out test split, same naming

Medical Segmentation Decathlon layout: ``dataset.json`` with ``"training": [{"image", "label"}]``,
``"test": [...]``, ``"modality": {"0": "CT"}`` and ``"labels": {"0": "background", ...}``; one file per
case (several channels stacked along a 4th axis).

A *federation root* is a folder of site folders. Images without a label form the site's unlabelled
pool, used for self-supervised pretraining.

Discovery never raises on a malformed site: it returns the :class:`Problem` list so that validation can
report everything at once. :func:`load_site` raises :class:`DatasetError` when a site has errors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg_core.data.problems import ERROR, INFO, DatasetError, Problem, problem

DATASET_JSON = "dataset.json"
DEFAULT_FILE_ENDING = ".nii.gz"
TRAIN, TEST = "train", "test"
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of an image, read from the NIfTI header (no voxel data loaded).

    Attributes:
        shape: spatial shape (X, Y[, Z]); a trailing channel axis of MSD 4D files is excluded.
        spacing_mm: voxel size in millimetres along each spatial axis.
        affine: 4x4 voxel-to-world (RAS+, mm) matrix.
    """

    shape: tuple[int, ...]
    spacing_mm: tuple[float, ...]
    affine: np.ndarray

    @property
    def ndim(self) -> int:
        return len(self.shape)


def read_geometry(path: str | Path, spatial_ndim: int | None = None) -> Geometry:
    """Read shape, spacing and affine of a NIfTI file from its header.

    Args:
        path: NIfTI file.
        spatial_ndim: number of spatial axes; by default 3 for 4D files (channels last, MSD style),
            otherwise the file's dimensionality.

    Raises:
        nibabel.filebasedimages.ImageFileError, OSError: the file is not a readable NIfTI.
    """
    img = nib.load(str(path))
    shape = tuple(int(s) for s in img.shape)
    if spatial_ndim is None:
        spatial_ndim = 3 if len(shape) >= 4 else len(shape)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:spatial_ndim])
    return Geometry(shape=shape[:spatial_ndim], spacing_mm=zooms, affine=np.asarray(img.affine, dtype=float))


@dataclass(frozen=True)
class Case:
    """One patient case at a site.

    Attributes:
        case_id: identifier, unique within the site.
        image_paths: one file per channel (nnU-Net), or a single (possibly 4D) file (MSD).
        label_path: label map, or ``None`` for an unlabelled case.
        split: ``"train"`` or ``"test"``.
    """

    case_id: str
    image_paths: tuple[Path, ...]
    label_path: Path | None
    split: str = TRAIN

    @property
    def labelled(self) -> bool:
        return self.label_path is not None

    def geometry(self) -> Geometry:
        """Shape, spacing (mm) and affine of the first channel (header only)."""
        return read_geometry(self.image_paths[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.geometry().shape

    @property
    def spacing_mm(self) -> tuple[float, ...]:
        return self.geometry().spacing_mm

    @property
    def affine(self) -> np.ndarray:
        return self.geometry().affine

    def as_dict(self) -> dict[str, object]:
        """MONAI dictionary-transform input: ``{"image": [paths], "label": path, "case_id": id}``."""
        d: dict[str, object] = {"image": [str(p) for p in self.image_paths], "case_id": self.case_id}
        if self.label_path is not None:
            d["label"] = str(self.label_path)
        return d


@dataclass
class SiteDataset:
    """A hospital's dataset folder.

    Attributes:
        name: site name (the folder name).
        root: the site folder.
        layout: ``"nnunet"`` or ``"msd"``.
        channel_names: channel index -> modality name (e.g. ``{0: "CT"}``).
        labels: class name -> integer label value (background included).
        file_ending: e.g. ``".nii.gz"``.
        cases: every case found, train and test, labelled or not.
        problems: findings made while discovering the folder (see :mod:`medseg_core.data.validate`).
    """

    name: str
    root: Path
    layout: str
    channel_names: dict[int, str]
    labels: dict[str, int]
    file_ending: str
    cases: list[Case] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    dataset_json: dict = field(default_factory=dict, repr=False)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Number of output classes including background (max label value + 1)."""
        return max(self.labels.values()) + 1 if self.labels else 0

    @property
    def train_cases(self) -> list[Case]:
        """Labelled training cases."""
        return [c for c in self.cases if c.split == TRAIN and c.labelled]

    @property
    def test_cases(self) -> list[Case]:
        """Labelled held-out test cases."""
        return [c for c in self.cases if c.split == TEST and c.labelled]

    @property
    def unlabelled_cases(self) -> list[Case]:
        """Images without a label (train or test folder): the pretraining pool."""
        return [c for c in self.cases if not c.labelled]

    @cached_property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    def modality(self, channel: int = 0) -> str:
        return self.channel_names.get(channel, "unknown")


def is_site_dir(path: str | Path) -> bool:
    """True if ``path`` looks like a site folder (has ``dataset.json`` or ``imagesTr/``)."""
    p = Path(path)
    return p.is_dir() and ((p / DATASET_JSON).is_file() or (p / "imagesTr").is_dir())


def site_dirs(root: str | Path) -> list[Path]:
    """The site folders of a federation root (or ``[root]`` if ``root`` is itself a site)."""
    root = Path(root)
    if is_site_dir(root):
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if is_site_dir(p))


def _read_dataset_json(root: Path, problems: list[Problem]) -> dict | None:
    path = root / DATASET_JSON
    if not path.is_file():
        problems.append(problem(ERROR, "missing-dataset-json", path, "dataset.json is missing"))
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(problem(ERROR, "bad-dataset-json", path, f"dataset.json is not valid JSON: {exc}"))
        return None
    if not isinstance(meta, dict):
        problems.append(problem(ERROR, "bad-dataset-json", path, "dataset.json must hold a JSON object"))
        return None
    return meta


def _parse_int_keyed(mapping: object, what: str, path: Path, problems: list[Problem]) -> dict[int, str]:
    out: dict[int, str] = {}
    if not isinstance(mapping, dict) or not mapping:
        problems.append(problem(ERROR, "missing-key", path, f"dataset.json needs a non-empty '{what}' object"))
        return out
    for k, v in mapping.items():
        try:
            out[int(k)] = str(v)
        except (TypeError, ValueError):
            problems.append(problem(ERROR, "bad-dataset-json", path, f"'{what}' key {k!r} is not an integer"))
    return out


def _parse_labels(meta: dict, path: Path, problems: list[Problem], msd: bool) -> dict[str, int]:
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        problems.append(problem(ERROR, "missing-key", path, "dataset.json needs a non-empty 'labels' object"))
        return {}
    labels: dict[str, int] = {}
    if msd:  # MSD: {"0": "background", "1": "liver"}
        labels = {name: value for value, name in _parse_int_keyed(raw, "labels", path, problems).items()}
    else:  # nnU-Net v2: {"background": 0, "organ": 1}; region-based lists are not supported
        for name, value in raw.items():
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(
                    problem(ERROR, "bad-dataset-json", path,
                            f"label {name!r} must map to one integer value, got {value!r}")
                )
                continue
            labels[str(name)] = value
    if labels and 0 not in labels.values():
        problems.append(problem(ERROR, "bad-dataset-json", path, "'labels' must declare background as 0"))
    return labels


def _discover_nnunet(root: Path, folder: str, label_folder: str, split: str, ending: str,
                     problems: list[Problem]) -> list[Case]:
    img_dir, lab_dir = root / folder, root / label_folder
    if not img_dir.is_dir():
        return []
    channels: dict[str, dict[int, Path]] = {}
    for f in sorted(img_dir.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        if not f.name.endswith(ending):
            problems.append(problem(INFO, "ignored-file", f, f"not a '{ending}' file; ignored"))
            continue
        m = _CHANNEL_RE.match(f.name[: -len(ending)])
        if m is None:
            problems.append(
                problem(ERROR, "bad-filename", f,
                        f"image name must be CASE_XXXX{ending} (XXXX = 4-digit channel index)")
            )
            continue
        channels.setdefault(m["case"], {})[int(m["channel"])] = f
    labels: dict[str, Path] = {}
    if lab_dir.is_dir():
        for f in sorted(lab_dir.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.name.endswith(ending):
                labels[f.name[: -len(ending)]] = f
    cases = []
    for case_id, chans in sorted(channels.items()):
        paths = tuple(chans[i] for i in sorted(chans))
        cases.append(Case(case_id, paths, labels.get(case_id), split))
    for case_id, f in sorted(labels.items()):
        if case_id not in channels:
            problems.append(problem(ERROR, "label-without-image", f, f"label for case '{case_id}' has no image in {folder}/"))
    return cases


def _discover_msd(root: Path, meta: dict, problems: list[Problem]) -> list[Case]:
    path = root / DATASET_JSON
    cases: list[Case] = []
    seen: set[str] = set()

    def resolve(rel: object) -> Path | None:
        if not isinstance(rel, str) or not rel:
            return None
        return (root / rel).resolve() if not Path(rel).is_absolute() else Path(rel)

    def add(image: object, label: object, split: str) -> None:
        img = resolve(image)
        if img is None:
            problems.append(problem(ERROR, "bad-dataset-json", path, f"entry without a valid image path: {image!r}"))
            return
        case_id = img.name.split(".")[0]
        if case_id in seen:
            problems.append(problem(ERROR, "duplicate-case", img, f"case id '{case_id}' appears more than once"))
            return
        seen.add(case_id)
        cases.append(Case(case_id, (img,), resolve(label), split))

    for entry in meta.get("training", []):
        if not isinstance(entry, dict):
            problems.append(problem(ERROR, "bad-dataset-json", path, f"'training' entry is not an object: {entry!r}"))
            continue
        add(entry.get("image"), entry.get("label"), TRAIN)
    for entry in meta.get("test", []) or []:
        if isinstance(entry, dict):
            add(entry.get("image"), entry.get("label"), TEST)
        else:
            add(entry, None, TEST)
    return cases


def discover_site(path: str | Path) -> SiteDataset:
    """Read a site folder's ``dataset.json`` and file listing without loading voxels.

    Problems are recorded in ``site.problems``; nothing is raised for a malformed site. Use
    :func:`medseg_core.data.validate.validate_site` for the full checks (file contents, geometry).
    """
    root = Path(path)
    problems: list[Problem] = []
    meta = _read_dataset_json(root, problems) or {}
    jpath = root / DATASET_JSON
    msd = isinstance(meta.get("training"), list)
    if meta:
        key = "modality" if msd and "channel_names" not in meta else "channel_names"
        channel_names = _parse_int_keyed(meta.get(key), key, jpath, problems)
        labels = _parse_labels(meta, jpath, problems, msd)
    else:
        channel_names, labels = {}, {}
    ending = meta.get("file_ending", DEFAULT_FILE_ENDING) if meta else DEFAULT_FILE_ENDING
    if not isinstance(ending, str) or not ending.startswith("."):
        problems.append(problem(ERROR, "bad-dataset-json", jpath, f"'file_ending' must look like '.nii.gz', got {ending!r}"))
        ending = DEFAULT_FILE_ENDING
    if meta and not msd and "file_ending" not in meta:
        problems.append(problem(ERROR, "missing-key", jpath, "dataset.json needs 'file_ending' (e.g. \".nii.gz\")"))

    if msd:
        cases = _discover_msd(root, meta, problems)
    else:
        cases = _discover_nnunet(root, "imagesTr", "labelsTr", TRAIN, ending, problems)
        cases += _discover_nnunet(root, "imagesTs", "labelsTs", TEST, ending, problems)
        ids = [c.case_id for c in cases]
        for c in cases:
            if ids.count(c.case_id) > 1 and c.split == TEST:
                problems.append(problem(ERROR, "duplicate-case", c.image_paths[0],
                                        f"case id '{c.case_id}' is in both imagesTr/ and imagesTs/"))
    return SiteDataset(
        name=root.name, root=root, layout="msd" if msd else "nnunet", channel_names=channel_names,
        labels=labels, file_ending=ending, cases=cases, problems=problems, dataset_json=meta,
    )


def load_site(path: str | Path) -> SiteDataset:
    """Discover a site folder and raise if its layout has errors.

    Raises:
        DatasetError: listing every error (missing ``dataset.json``, bad keys, orphan labels, ...).
    """
    site = discover_site(path)
    if site.errors:
        raise DatasetError(site.errors, where=path)
    return site


def load_federation(root: str | Path, sites: Sequence[str] | None = None) -> list[SiteDataset]:
    """Load every site folder under a federation root (or the root itself if it is one site).

    Args:
        root: federation root or site folder.
        sites: optional subset of site names to keep, in the given order.

    Raises:
        DatasetError: no site found, an unknown site name, or a site with layout errors.
    """
    dirs = site_dirs(root)
    if not dirs:
        raise DatasetError([problem(ERROR, "no-sites", root, "no site folder (with dataset.json or imagesTr/) found")], root)
    by_name = {d.name: d for d in dirs}
    if sites:
        missing = [s for s in sites if s not in by_name]
        if missing:
            raise DatasetError(
                [problem(ERROR, "unknown-site", root, f"site(s) {missing} not found; available: {sorted(by_name)}")], root
            )
        dirs = [by_name[s] for s in sites]
    return [load_site(d) for d in dirs]
