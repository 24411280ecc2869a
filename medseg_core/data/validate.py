"""Full validation of site datasets: layout, ``dataset.json`` and the contents of every file.

Builds on :func:`~medseg_core.data.dataset.discover_site` (layout problems) and then reads every image
channel and label once, checking what would otherwise crash or silently corrupt training later:

- unreadable, truncated or non-NIfTI files (header *and* voxel data are read);
- missing/extra channel files, channels whose grid differs from channel 0;
- image/label shape or affine mismatch, 4D labels, non-integer or undeclared label values;
- NaN/Inf voxels, zero/negative/NaN voxel spacing, singular affines;
- empty ``imagesTr/``, duplicate case ids, labels without images, 2D and 3D cases mixed in one site;
- across a federation: every site must declare the same classes, channel count and dimensionality.

Images without a label are the unlabelled (pretraining) pool and are reported as ``info``.

Geometry tolerances (image vs label, channel vs channel): voxel spacing within a relative
:data:`SPACING_RTOL` (1e-3), direction cosines within :data:`DIRECTION_ATOL` (1e-3) and origin within
:data:`ORIGIN_ATOL_MM` (0.01 mm). NIfTI stores these as float32, so exact equality is too strict, while a
real misregistration (a resampled label, a wrong reference scan) is far larger.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.imageglobals import logger as _nibabel_logger
from nibabel.openers import ImageOpener

from medseg_core.data.dataset import (
    DATASET_JSON,
    TRAIN,
    Case,
    SiteDataset,
    discover_site,
    is_site_dir,
    site_dirs,
)
from medseg_core.data.problems import ERROR, INFO, WARNING, DatasetError, Problem, problem

SPACING_RTOL = 1e-3
DIRECTION_ATOL = 1e-3
ORIGIN_ATOL_MM = 1e-2

# Problems not tied to one case that do not stop the remaining cases from being used.
_SKIPPABLE_SITE_CODES = frozenset({"bad-filename", "label-without-image", "ignored-file", "unexpected-file"})


@dataclass
class SiteReport:
    """Validation result of one site folder.

    Attributes:
        name: site name (folder name).
        root: site folder.
        problems: every finding, errors first.
        cases_checked: cases whose files were read.
        bad_cases: ids of cases with at least one error (skipped by :func:`skip_bad_cases`).
    """

    name: str
    root: str
    problems: list[Problem] = field(default_factory=list)
    cases_checked: int = 0
    bad_cases: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p.severity == ERROR for p in self.problems)


@dataclass
class ValidationReport:
    """Everything found under one path (a site folder or a federation root).

    Attributes:
        path: what was validated.
        problems: every finding of every site plus federation-level findings.
        sites: per-site results, in folder order.
    """

    path: str
    problems: list[Problem] = field(default_factory=list)
    sites: list[SiteReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings and infos are allowed)."""
        return not self.errors

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def infos(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == INFO]

    def counts(self) -> dict[str, int]:
        return {ERROR: len(self.errors), WARNING: len(self.warnings), INFO: len(self.infos)}

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "ok": self.ok,
            "counts": self.counts(),
            "sites": [
                {"name": s.name, "root": s.root, "ok": s.ok, "cases_checked": s.cases_checked,
                 "bad_cases": list(s.bad_cases)}
                for s in self.sites
            ],
            "problems": [p.to_dict() for p in self.problems],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def format_text(self, verbose: bool = False) -> str:
        """Plain-text report: one line per problem with its full path (infos only when ``verbose``)."""
        lines: list[str] = []
        site_roots = {s.root for s in self.sites}
        shown = self.problems if verbose else [p for p in self.problems if p.severity != INFO]
        for s in self.sites:
            c = Counter(p.severity for p in s.problems)
            status = "ok" if s.ok else "FAILED"
            lines.append(f"{s.name} ({s.root}): {status}; {s.cases_checked} case(s) checked, "
                         f"{c[ERROR]} error(s), {c[WARNING]} warning(s), {c[INFO]} info")
            own = [p for p in shown if _belongs_to(p, s)]
            lines += [f"  {p.severity.upper():7s} {p.path}: {p.message} [{p.code}]" for p in own]
        other = [p for p in shown if not any(_belongs_to(p, s) for s in self.sites)]
        if other:
            lines.append("federation" if site_roots else str(self.path))
            lines += [f"  {p.severity.upper():7s} {p.path}: {p.message} [{p.code}]" for p in other]
        hidden = len(self.problems) - len(shown)
        if hidden:
            lines.append(f"({hidden} info finding(s) not listed, e.g. unlabelled images; use --verbose)")
        n = self.counts()
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"{verdict}: {self.path}: {len(self.sites)} site(s), {n[ERROR]} error(s), "
                     f"{n[WARNING]} warning(s), {n[INFO]} info")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_text()


def _belongs_to(p: Problem, site: SiteReport) -> bool:
    return any(p is q for q in site.problems)


@contextlib.contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """Silence nibabel's header-fix log lines (e.g. "pixdim should be positive") while we read.

    ``nibabel.imageglobals.LoggingOutputSuppressor`` only removes handlers, so Python's last-resort
    handler still prints them; raising the level does not.
    """
    old = _nibabel_logger.level
    _nibabel_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        _nibabel_logger.setLevel(old)


@dataclass
class _Volume:
    """A NIfTI file read once: header geometry and voxel data."""

    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray
    data: np.ndarray


def _read_volume(path: Path, what: str, problems: list[Problem]) -> _Volume | None:
    """Read header and voxels; record why the file cannot be used and return ``None`` if so."""
    if not path.is_file():
        problems.append(problem(ERROR, "missing-file", path, f"{what} file does not exist"))
        return None
    try:
        # nibabel logs and silently "fixes" bad pixdim on load; the raw header is checked below instead.
        with _quiet_nibabel():
            img = nib.load(str(path))
            raw_pixdim = None
            if isinstance(img, nib.Nifti1Image):  # also Nifti2Image
                with ImageOpener(str(path)) as f:
                    raw_pixdim = type(img.header).from_fileobj(f, check=False)["pixdim"]
            data = np.asanyarray(img.dataobj)
    except MemoryError:
        problems.append(problem(ERROR, "unreadable", path, f"{what} file is too large to load in memory"))
        return None
    except Exception as exc:  # corrupt files raise anything: gzip, zlib, EOFError, struct, ValueError, ...
        reason = str(exc).strip() or "no details"
        problems.append(problem(ERROR, "unreadable", path,
                                f"{what} file cannot be read as NIfTI ({type(exc).__name__}: {reason[:200]})"))
        return None
    shape = tuple(int(s) for s in img.shape)
    affine = np.asarray(img.affine, dtype=float)
    ok = True
    spatial = min(len(shape), 3)
    if raw_pixdim is not None:
        pixdim = np.asarray(raw_pixdim[1:1 + spatial], dtype=float)
        if not (np.all(np.isfinite(pixdim)) and np.all(pixdim > 0)):
            problems.append(problem(ERROR, "bad-spacing", path,
                                    f"voxel spacing (pixdim) must be positive and finite, got {_fmt(pixdim)}"))
            ok = False
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        problems.append(problem(ERROR, "bad-affine", path,
                                f"affine is singular or not finite:\n{np.array2string(affine, precision=4)}"))
        ok = False
    elif raw_pixdim is not None and ok:
        col_norms = np.linalg.norm(affine[:3, :spatial], axis=0)
        if not np.allclose(col_norms, pixdim, rtol=SPACING_RTOL, atol=0):
            problems.append(problem(WARNING, "spacing-inconsistent", path,
                                    f"pixdim {_fmt(pixdim)} disagrees with the affine's voxel size {_fmt(col_norms)} mm; "
                                    "the affine is used"))
    if ok and isinstance(img, nib.Nifti1Image) and int(img.header["sform_code"]) == 0 \
            and int(img.header["qform_code"]) == 0:
        problems.append(problem(WARNING, "no-orientation", path,
                                "sform and qform codes are 0: orientation and origin are unknown"))
    return _Volume(path, shape, affine, data) if ok else None


def _fmt(values: Iterable[float]) -> str:
    """``(0.8, 0.8, 2.5)``: float32 header noise rounded away, NaN kept."""
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def _geometry_difference(ref: _Volume, other: _Volume, spatial: int) -> str | None:
    """Why ``other``'s voxel grid differs from ``ref``'s, or ``None`` if it matches within tolerance."""
    if ref.shape[:spatial] != other.shape[:spatial]:
        return f"shape {other.shape[:spatial]} differs from {ref.shape[:spatial]} of {ref.path.name}"
    a, b = ref.affine, other.affine
    sa, sb = np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(b[:3, :3], axis=0)
    if not np.allclose(sb, sa, rtol=SPACING_RTOL, atol=0):
        return f"voxel spacing {_fmt(sb)} mm differs from {_fmt(sa)} mm of {ref.path.name}"
    if np.abs(a[:3, :3] / sa - b[:3, :3] / sb).max() > DIRECTION_ATOL:
        ca, cb = "".join(nib.aff2axcodes(a)), "".join(nib.aff2axcodes(b))
        detail = f"orientation {cb} differs from {ca}" if ca != cb else "direction cosines differ"
        return f"{detail} of {ref.path.name}"
    shift = float(np.abs(a[:3, 3] - b[:3, 3]).max())
    if shift > ORIGIN_ATOL_MM:
        return f"origin differs by {shift:.3g} mm from {ref.path.name} (tolerance {ORIGIN_ATOL_MM} mm)"
    return None


def _channel_index(path: Path, ending: str) -> int | None:
    stem = path.name[: -len(ending)] if path.name.endswith(ending) else path.name
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if len(tail) == 4 and tail.isdigit() else None


def _describe_values(values: Iterable[float], limit: int = 8) -> str:
    vals = [int(v) if float(v).is_integer() else float(v) for v in values]
    text = ", ".join(str(v) for v in vals[:limit])
    return f"[{text}{', ...' if len(vals) > limit else ''}]"


def _check_label(lab: _Volume, site: SiteDataset, problems: list[Problem]) -> bool:
    """Label-only checks (dimensionality, finiteness, integer and declared values). True if usable."""
    if len(lab.shape) > 3:
        problems.append(problem(ERROR, "label-4d", lab.path,
                                f"label must be a 2D/3D map of class indices, got {len(lab.shape)}D shape {lab.shape}"))
        return False
    data = lab.data
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            n_nan = int(np.isnan(data).sum())
            problems.append(problem(ERROR, "non-finite-label", lab.path,
                                    f"label has {n_nan} NaN and {int((~finite).sum()) - n_nan} Inf voxel(s)"))
            return False
        uniq = np.unique(data)
        frac = uniq[uniq != np.round(uniq)]
        if frac.size:
            problems.append(problem(ERROR, "non-integer-label", lab.path,
                                    f"label has non-integer values {_describe_values(frac)}; labels must be "
                                    "integer class indices (was it resampled with linear interpolation?)"))
            return False
    elif data.dtype.kind in "iub":
        uniq = np.unique(data)
    else:
        problems.append(problem(ERROR, "bad-label-dtype", lab.path, f"label has unsupported data type {data.dtype}"))
        return False
    if site.labels:
        declared = set(site.labels.values())
        extra = [v for v in uniq.tolist() if v not in declared]
        if extra:
            problems.append(problem(ERROR, "undeclared-label", lab.path,
                                    f"label values {_describe_values(extra)} are not declared in dataset.json "
                                    f"'labels' {dict(sorted(site.labels.items(), key=lambda kv: kv[1]))}"))
            return False
    if uniq.size and uniq.max() == 0:
        problems.append(problem(INFO, "empty-label", lab.path, "label has only background (no foreground voxel)"))
    return True


def _check_case(case: Case, site: SiteDataset, problems: list[Problem],
                hashes: dict[str, str]) -> int | None:
    """Read and check one case's channels and label; returns its spatial dimensionality (2 or 3)."""
    ending = site.file_ending
    declared = sorted(site.channel_names)
    n_declared = len(declared)
    # Channel files present vs declared (nnU-Net layout: one file per channel).
    if site.layout == "nnunet" and n_declared:
        present = {_channel_index(p, ending): p for p in case.image_paths}
        folder = case.image_paths[0].parent
        for ch in declared:
            if ch not in present:
                missing = folder / f"{case.case_id}_{ch:04d}{ending}"
                problems.append(problem(ERROR, "missing-channel", missing,
                                        f"case '{case.case_id}' has no channel {ch} ({site.channel_names[ch]}) file; "
                                        f"dataset.json declares {n_declared} channel(s) {site.channel_names}"))
        for ch, p in sorted(present.items(), key=lambda kv: kv[0] if kv[0] is not None else -1):
            if ch not in site.channel_names:
                problems.append(problem(ERROR, "unexpected-channel", p,
                                        f"case '{case.case_id}' has {len(present)} channel file(s) but dataset.json "
                                        f"declares {n_declared} channel(s) {site.channel_names}; channel {ch} is not declared"))

    vols: list[_Volume] = []
    for p in case.image_paths:
        v = _read_volume(p, "image", problems)
        if v is not None:
            vols.append(v)
    spatial: int | None = None
    if vols:
        ref = vols[0]
        ndim = len(ref.shape)
        if site.layout == "nnunet" and ndim > 3:
            problems.append(problem(ERROR, "image-4d", ref.path,
                                    f"image is {ndim}D {ref.shape}; the nnU-Net layout stores one 2D/3D file per "
                                    "channel (CASE_0000, CASE_0001, ...)"))
        elif ndim < 2:
            problems.append(problem(ERROR, "bad-dimensions", ref.path, f"image must be 2D or 3D, got shape {ref.shape}"))
        else:
            spatial = min(ndim, 3)
        if site.layout == "msd" and n_declared:
            n_ch = ref.shape[3] if ndim == 4 else 1
            if n_ch != n_declared:
                problems.append(problem(ERROR, "inconsistent-channels", ref.path,
                                        f"image has {n_ch} channel(s) but dataset.json declares {n_declared}"))
        for v in vols:
            bad = ~np.isfinite(v.data) if v.data.dtype.kind == "f" else None
            if bad is not None and bad.any():
                n_nan = int(np.isnan(v.data).sum())
                problems.append(problem(ERROR, "non-finite-image", v.path,
                                        f"image has {n_nan} NaN and {int(bad.sum()) - n_nan} Inf voxel(s)"))
            elif v.data.size and v.data.min() == v.data.max():
                problems.append(problem(WARNING, "constant-image", v.path,
                                        f"every voxel has the same value {v.data.flat[0]!r}"))
        if spatial is not None:
            for v in vols[1:]:
                diff = _geometry_difference(ref, v, spatial)
                if diff is not None:
                    problems.append(problem(ERROR, "channel-mismatch", v.path,
                                            f"channel grid does not match channel 0: {diff}"))
            digest = hashlib.blake2b(np.ascontiguousarray(ref.data).tobytes(), digest_size=16)
            digest.update(str((ref.shape, ref.data.dtype.str)).encode())
            key = digest.hexdigest()
            if key in hashes:
                problems.append(problem(WARNING, "duplicate-image", ref.path,
                                        f"voxels identical to {hashes[key]}: the same scan under two case ids "
                                        "(possible train/test leakage)"))
            else:
                hashes[key] = str(ref.path)

    if case.label_path is None:
        problems.append(problem(INFO, "unlabelled", case.image_paths[0],
                                f"case '{case.case_id}' has no label: used only for self-supervised pretraining"))
        return spatial
    lab = _read_volume(case.label_path, "label", problems)
    if lab is None:
        return spatial
    if _check_label(lab, site, problems) and vols and spatial is not None:
        diff = _geometry_difference(vols[0], lab, spatial)
        if diff is not None:
            code = "shape-mismatch" if diff.startswith("shape") else "affine-mismatch"
            problems.append(problem(ERROR, code, lab.path, f"label does not match its image: {diff}"))
    return spatial


def _check_dataset_json(site: SiteDataset, problems: list[Problem]) -> None:
    meta, jpath = site.dataset_json, site.root / DATASET_JSON
    if not meta:
        return
    if site.channel_names and sorted(site.channel_names) != list(range(len(site.channel_names))):
        problems.append(problem(ERROR, "bad-dataset-json", jpath,
                                f"'channel_names' keys must be 0..{len(site.channel_names) - 1}, "
                                f"got {sorted(site.channel_names)}"))
    values = sorted(set(site.labels.values()))
    if values and values != list(range(len(values))):
        problems.append(problem(WARNING, "label-gap", jpath,
                                f"label values {values} are not consecutive; the model will have "
                                f"{site.num_classes} outputs, some never trained"))
    if len(values) != len(site.labels):
        problems.append(problem(ERROR, "bad-dataset-json", jpath,
                                f"two class names share one label value: {site.labels}"))
    if site.layout == "nnunet" and "numTraining" in meta:
        n_tr = len([c for c in site.cases if c.split == TRAIN and c.labelled])
        if meta["numTraining"] != n_tr:
            problems.append(problem(WARNING, "num-training-mismatch", jpath,
                                    f"'numTraining' is {meta['numTraining']!r} but imagesTr/ has {n_tr} labelled case(s)"))


def _validate_site(root: Path) -> SiteReport:
    """Validate one site folder, reading every image and label once."""
    site = discover_site(root)
    problems = list(site.problems)
    report = SiteReport(name=site.name, root=str(root))
    _check_dataset_json(site, problems)

    train = [c for c in site.cases if c.split == TRAIN]
    if site.layout == "nnunet" and not (root / "imagesTr").is_dir():
        problems.append(problem(ERROR, "empty-dataset", root / "imagesTr", "imagesTr/ folder is missing"))
    elif not train:
        where = root / "imagesTr" if site.layout == "nnunet" else root / DATASET_JSON
        problems.append(problem(ERROR, "empty-dataset", where,
                                f"no training image found (expected CASE_0000{site.file_ending} files)"))
    elif not any(c.labelled for c in train):
        problems.append(problem(WARNING, "no-labelled-cases", root / "labelsTr",
                                "no training case has a label: the site can only be used for pretraining"))

    case_problems: dict[int, list[Problem]] = {}
    hashes: dict[str, str] = {}
    dims: dict[int, int] = {}
    for i, case in enumerate(site.cases):
        found: list[Problem] = []
        spatial = _check_case(case, site, found, hashes)
        if spatial is not None:
            dims[i] = spatial
        case_problems[i] = found
        report.cases_checked += 1
    if len(set(dims.values())) > 1:
        majority = Counter(dims.values()).most_common(1)[0][0]
        for i, d in dims.items():
            if d != majority:
                case_problems[i].append(problem(ERROR, "mixed-dimensions", site.cases[i].image_paths[0],
                                                f"case '{site.cases[i].case_id}' is {d}D but most cases of "
                                                f"this site are {majority}D"))
    # Attribute discovery problems (e.g. an id in both imagesTr/ and imagesTs/) to their case.
    by_file = {str(p): i for i, c in enumerate(site.cases) for p in (*c.image_paths, c.label_path) if p}
    for p in list(problems):
        if p.path in by_file and p.severity == ERROR:
            case_problems[by_file[p.path]].append(p)
            problems.remove(p)
    bad: list[str] = []
    for i, found in case_problems.items():
        problems += found
        if any(p.severity == ERROR for p in found) and site.cases[i].case_id not in bad:
            bad.append(site.cases[i].case_id)
    report.bad_cases = bad
    order = {ERROR: 0, WARNING: 1, INFO: 2}
    report.problems = sorted(problems, key=lambda p: order[p.severity])  # stable: file order kept
    return report


def validate_site(path: str | Path) -> ValidationReport:
    """Validate one site folder, reading every image and label once.

    Never raises for problems in the data; every finding names its file and reason.

    Args:
        path: the site folder.

    Returns:
        A report with one entry in ``sites``.
    """
    root = Path(path)
    if not root.is_dir():
        return validate_path(root)  # reports a missing path or a file
    site = _validate_site(root)
    return ValidationReport(path=str(root), problems=list(site.problems), sites=[site])


def _federation_checks(reports: list[SiteReport]) -> list[Problem]:
    """Sites must agree on classes, channel count and dimensionality to train one model."""
    problems: list[Problem] = []
    sites = [discover_site(r.root) for r in reports]
    ref = next((s for s in sites if s.labels and s.channel_names), None)
    if ref is None:
        return problems
    for s in sites:
        if s is ref or not s.dataset_json:
            continue
        jpath = s.root / DATASET_JSON
        if s.labels and s.labels != ref.labels:
            problems.append(problem(ERROR, "federation-mismatch", jpath,
                                    f"labels {s.labels} differ from {ref.name}'s {ref.labels}; every site must "
                                    "declare the same classes"))
        if s.channel_names and s.num_channels != ref.num_channels:
            problems.append(problem(ERROR, "federation-mismatch", jpath,
                                    f"{s.num_channels} channel(s) {s.channel_names} but {ref.name} has "
                                    f"{ref.num_channels} {ref.channel_names}; every site must have the same channels"))
    return problems


def validate_path(path: str | Path) -> ValidationReport:
    """Validate a site folder or every site of a federation root.

    Never raises for bad data: a missing path, a file, or a folder without sites is reported as an
    error in the returned report.
    """
    root = Path(path)
    report = ValidationReport(path=str(root))
    if not root.exists():
        report.problems.append(problem(ERROR, "not-found", root, "path does not exist"))
        return report
    if not root.is_dir():
        report.problems.append(problem(ERROR, "not-a-folder", root,
                                       "expected a site folder or a federation root (a folder of sites), got a file"))
        return report
    dirs = site_dirs(root)
    if not dirs:
        report.problems.append(problem(ERROR, "no-sites", root,
                                       "no site folder found (a site has dataset.json or imagesTr/)"))
        return report
    report.sites = [_validate_site(d) for d in dirs]
    for s in report.sites:
        report.problems += s.problems
    if len(report.sites) > 1 and not is_site_dir(root):
        report.problems += _federation_checks(report.sites)
    return report


def ensure_valid(path: str | Path) -> ValidationReport:
    """Validate and raise when there is any error.

    Returns:
        The report (which may still hold warnings and infos).

    Raises:
        DatasetError: listing every error with its file and reason.
    """
    report = validate_path(path)
    if not report.ok:
        raise DatasetError(report.problems, where=path)
    return report


def skip_bad_cases(path: str | Path) -> tuple[SiteDataset, list[Case], ValidationReport]:
    """Load a site without its bad cases (for users who ask to skip them rather than stop).

    A case is dropped when any of its files has an error; a case id found in both ``imagesTr/`` and
    ``imagesTs/`` is dropped from both (it may be a train/test leak). Files that are not part of a
    case (bad names, labels without image) are ignored.

    Args:
        path: the site folder.

    Returns:
        ``(site, skipped, report)``: the site with only good cases (``site.problems`` is the full
        list), the skipped cases, and the validation report.

    Raises:
        DatasetError: site-level errors (no or broken ``dataset.json``, empty ``imagesTr/``) or no
            labelled training case left.
    """
    report = validate_site(path)
    if not report.sites:
        raise DatasetError(report.errors, where=path)
    site = discover_site(path)
    bad = set(report.sites[0].bad_cases)
    case_files = {str(p) for c in site.cases for p in (*c.image_paths, c.label_path) if p}
    case_files |= {str(c.image_paths[0].parent / f"{c.case_id}_{ch:04d}{site.file_ending}")
                   for c in site.cases for ch in site.channel_names}
    fatal = [p for p in report.problems if p.severity == ERROR and p.path not in case_files
             and p.code not in _SKIPPABLE_SITE_CODES]
    if fatal:
        raise DatasetError(fatal, where=path)
    kept = [c for c in site.cases if c.case_id not in bad]
    skipped = [c for c in site.cases if c.case_id in bad]
    if not any(c.split == TRAIN and c.labelled for c in kept):
        raise DatasetError([problem(ERROR, "empty-dataset", path,
                                    f"no usable labelled training case left after skipping {len(skipped)} bad case(s)")]
                           + [p for p in report.problems if p.severity == ERROR], where=path)
    return replace(site, cases=kept, problems=report.problems), skipped, report

