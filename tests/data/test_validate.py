"""Validation of site datasets: every kind of bad input is reported with its file and reason."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg_core.data.cli import main
from medseg_core.data.dataset import discover_site
from medseg_core.data.problems import INFO, DatasetError
from medseg_core.data.validate import (
    ORIGIN_ATOL_MM,
    ValidationReport,
    ensure_valid,
    skip_bad_cases,
    validate_path,
    validate_site,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CASE = "site_00_tr000"


@pytest.fixture
def site(synth_fed, tmp_path) -> Path:
    """A fresh copy of a clean synthetic site (4 train, 2 test, 1 unlabelled case, 32³)."""
    return Path(shutil.copytree(synth_fed / "site_00", tmp_path / "site_00"))


def _img(site: Path, case: str = CASE, ch: int = 0, folder: str = "imagesTr") -> Path:
    return site / folder / f"{case}_{ch:04d}.nii.gz"


def _lab(site: Path, case: str = CASE, folder: str = "labelsTr") -> Path:
    return site / folder / f"{case}.nii.gz"


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine


def _edit_json(site: Path, **changes) -> None:
    path = site / "dataset.json"
    meta = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    path.write_text(json.dumps(meta))


def _patch_pixdim(path: Path, spacing: tuple[float, float, float]) -> None:
    """Write raw pixdim[1:4] into the header bytes (nibabel refuses to save bad spacing)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    assert struct.unpack_from("<i", raw, 0)[0] == 348  # little-endian NIfTI-1 header
    struct.pack_into("<3f", raw, 80, *spacing)
    path.write_bytes(gzip.compress(bytes(raw)))


def _two_channels(site: Path) -> None:
    """Declare 2 channels and give every case a channel-1 file (a copy of channel 0)."""
    _edit_json(site, channel_names={"0": "CT", "1": "CT"})
    for folder in ("imagesTr", "imagesTs"):
        for f in sorted((site / folder).glob("*_0000.nii.gz")):
            shutil.copy(f, f.with_name(f.name.replace("_0000.nii.gz", "_0001.nii.gz")))


# Each builder breaks a clean site and returns (offending path, words of the reason).
def truncated_image(site):
    p = _img(site)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # header fine, voxel data cut short
    return p, "cannot be read"


def not_nifti(site):
    p = _img(site)
    p.write_bytes(b"this is a text file, not a scan\n" * 20)
    return p, "cannot be read"


def gzip_of_garbage(site):
    p = _lab(site)
    p.write_bytes(gzip.compress(np.random.default_rng(0).bytes(5000)))
    return p, "cannot be read"


def missing_dataset_json(site):
    (site / "dataset.json").unlink()
    return site / "dataset.json", "dataset.json is missing"


def invalid_dataset_json(site):
    (site / "dataset.json").write_text('{"labels": {"background": 0,')
    return site / "dataset.json", "not valid JSON"


def missing_labels_key(site):
    _edit_json(site, labels=None)
    return site / "dataset.json", "'labels'"


def empty_images_tr(site):
    for folder in ("imagesTr", "labelsTr"):
        for f in (site / folder).iterdir():
            f.unlink()
    return site / "imagesTr", "no training image"


def missing_channel(site):
    _two_channels(site)
    _img(site, "site_00_tr001", 1).unlink()
    return _img(site, "site_00_tr001", 1), "has no channel 1"


def extra_channel(site):
    shutil.copy(_img(site, "site_00_tr002"), _img(site, "site_00_tr002", 1))
    return _img(site, "site_00_tr002", 1), "declares 1 channel"


def channel_shape_mismatch(site):
    _two_channels(site)
    data, affine = _load(_img(site, ch=1))
    _write(_img(site, ch=1), np.ascontiguousarray(data[:, :, :30]), affine)
    return _img(site, ch=1), "channel grid does not match channel 0: shape"


def channel_affine_mismatch(site):
    _two_channels(site)
    data, affine = _load(_img(site, ch=1))
    affine = affine.copy()
    affine[:3, 3] += 3.0
    _write(_img(site, ch=1), data, affine)
    return _img(site, ch=1), "origin differs by 3 mm"


def label_shape_mismatch(site):
    data, affine = _load(_lab(site))
    _write(_lab(site), np.ascontiguousarray(data[:, :30, :]), affine)
    return _lab(site), "label does not match its image: shape"


def label_affine_mismatch(site):
    data, affine = _load(_lab(site))
    affine = affine.copy()
    affine[:3, :3] *= 1.5
    _write(_lab(site), data, affine)
    return _lab(site), "voxel spacing"


def undeclared_label(site):
    data, affine = _load(_lab(site))
    data = data.copy()
    data[:2, :2, :2] = 5
    _write(_lab(site), data, affine)
    return _lab(site), "[5] are not declared"


def float_label(site):
    data, affine = _load(_lab(site))
    data = data.astype(np.float32)
    data[data == 1] = 0.5
    _write(_lab(site), data, affine)
    return _lab(site), "non-integer values [0.5]"


def label_4d(site):
    data, affine = _load(_lab(site))
    _write(_lab(site), np.stack([data, data], axis=-1), affine)
    return _lab(site), "got 4D shape"


def nan_image(site):
    data, affine = _load(_img(site))
    data = data.copy()
    data[0, 0, :3] = np.nan
    _write(_img(site), data, affine)
    return _img(site), "3 NaN"


def inf_label(site):
    data, affine = _load(_lab(site))
    data = data.astype(np.float32)
    data[1, 1, 1] = np.inf
    _write(_lab(site), data, affine)
    return _lab(site), "1 Inf"


def zero_spacing(site):
    _patch_pixdim(_img(site), (0.8, 0.0, 2.5))
    return _img(site), "spacing (pixdim) must be positive"


def negative_spacing(site):
    _patch_pixdim(_lab(site), (-0.8, 0.8, 2.5))
    return _lab(site), "spacing (pixdim) must be positive"


def nan_spacing(site):
    _patch_pixdim(_img(site), (0.8, 0.8, float("nan")))
    return _img(site), "nan"


def duplicate_case_id(site):
    shutil.copy(_img(site), _img(site, folder="imagesTs"))
    shutil.copy(_lab(site), _lab(site, folder="labelsTs"))
    return _img(site, folder="imagesTs"), "in both imagesTr/ and imagesTs/"


def label_without_image(site):
    shutil.copy(_lab(site), _lab(site, "ghost_case"))
    return _lab(site, "ghost_case"), "has no image"


def mixed_2d_3d(site):
    data, affine = _load(_img(site))
    lab, _ = _load(_lab(site))
    _write(_img(site, "site_00_flat"), np.ascontiguousarray(data[:, :, 16]), affine)
    _write(_lab(site, "site_00_flat"), np.ascontiguousarray(lab[:, :, 16]), affine)
    return _img(site, "site_00_flat"), "is 2D but most cases of this site are 3D"


def bad_filename(site):
    shutil.copy(_img(site), site / "imagesTr" / "scan.nii.gz")
    return site / "imagesTr" / "scan.nii.gz", "must be CASE_XXXX"


BAD_INPUTS = [
    truncated_image, not_nifti, gzip_of_garbage, missing_dataset_json, invalid_dataset_json, missing_labels_key,
    empty_images_tr, missing_channel, extra_channel, channel_shape_mismatch, channel_affine_mismatch,
    label_shape_mismatch, label_affine_mismatch, undeclared_label, float_label, label_4d, nan_image, inf_label,
    zero_spacing, negative_spacing, nan_spacing, duplicate_case_id, label_without_image, mixed_2d_3d, bad_filename,
]


@pytest.mark.parametrize("breaker", BAD_INPUTS, ids=lambda f: f.__name__)
def test_cli_reports_bad_input_with_path_and_reason(site, breaker, capsys):
    offending, reason = breaker(site)
    rc = main(["validate", str(site)])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert rc == 1, output
    assert "Traceback" not in output
    lines = [ln for ln in output.splitlines() if str(offending) in ln and "ERROR" in ln]
    assert lines, f"{offending} not reported as an error in:\n{output}"
    assert any(reason in ln for ln in lines), f"reason {reason!r} not in:\n" + "\n".join(lines)


def test_cli_subprocess_bad_site_no_traceback(site):
    offending, _ = truncated_image(site)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-m", "medseg_core.data.cli", "validate", str(site)],
                         capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120)
    output = res.stdout + res.stderr
    assert res.returncode == 1, output
    assert str(offending) in output and "cannot be read" in output
    assert "Traceback" not in output


def test_cli_missing_path_exit_1(tmp_path, capsys):
    rc = main(["validate", str(tmp_path / "nowhere")])
    output = "".join(capsys.readouterr())
    assert rc == 1
    assert str(tmp_path / "nowhere") in output and "does not exist" in output


def test_cli_folder_without_sites(tmp_path, capsys):
    assert main(["validate", str(tmp_path)]) == 1
    assert "no site folder found" in capsys.readouterr().out


def test_clean_federation_exit_0_and_json(synth_fed, capsys):
    assert main(["validate", str(synth_fed)]) == 0
    assert "OK:" in capsys.readouterr().out
    assert main(["validate", str(synth_fed), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["counts"]["error"] == 0
    assert [s["name"] for s in report["sites"]] == ["site_00", "site_01"]
    assert all(s["cases_checked"] == 7 for s in report["sites"])
    # the unlabelled image of each site is an info finding, not an error
    unlabelled = [p for p in report["problems"] if p["code"] == "unlabelled"]
    assert len(unlabelled) == 2 and all(p["severity"] == INFO for p in unlabelled)


def test_json_report_of_bad_site_names_files(site, capsys):
    offending, _ = nan_image(site)
    assert main(["validate", str(site), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert {p["path"] for p in report["problems"] if p["severity"] == "error"} == {str(offending)}
    assert report["sites"][0]["bad_cases"] == [CASE]


def test_validate_site_report_api(site):
    report = validate_site(site)
    assert isinstance(report, ValidationReport) and report.ok and len(report.sites) == 1
    assert report.sites[0].cases_checked == 7 and report.sites[0].bad_cases == []
    assert "OK:" in str(report)
    assert json.loads(report.to_json())["path"] == str(site)


def test_small_origin_difference_is_tolerated(site):
    data, affine = _load(_lab(site))
    affine = affine.copy()
    affine[:3, 3] += ORIGIN_ATOL_MM / 4  # float32 header noise, not a misregistration
    _write(_lab(site), data, affine)
    assert validate_site(site).ok


def test_every_problem_is_collected(site):
    """Several broken files: all are reported in one pass."""
    paths = [truncated_image(site)[0], float_label(site)[0], missing_channel(site)[0]]
    report = validate_site(site)
    assert {str(p) for p in paths} <= {p.path for p in report.errors}
    assert len(report.sites[0].bad_cases) == 2  # site_00_tr000 (image, label) and site_00_tr001 (channel)


def test_ensure_valid_raises_with_every_error(site):
    offending, _ = undeclared_label(site)
    other, _ = not_nifti(site)
    with pytest.raises(DatasetError) as info:
        ensure_valid(site)
    assert str(offending) in str(info.value) and str(other) in str(info.value)
    with pytest.raises(DatasetError, match="does not exist"):
        ensure_valid(site.parent / "missing")


def test_ensure_valid_returns_report_when_clean(synth_fed):
    report = ensure_valid(synth_fed)
    assert report.ok and len(report.sites) == 2


def test_skip_bad_cases_drops_only_bad_cases(site):
    truncated_image(site)
    label_4d_path, _ = label_4d(site)
    bad_filename(site)  # a stray file is ignored, not fatal
    kept_site, skipped, report = skip_bad_cases(site)
    assert not report.ok
    assert [c.case_id for c in skipped] == [CASE]
    assert CASE not in {c.case_id for c in kept_site.cases}
    assert len(kept_site.train_cases) == 3 and len(kept_site.test_cases) == 2
    assert len(kept_site.unlabelled_cases) == 1


def test_skip_bad_cases_refuses_site_level_errors(site):
    missing_labels_key(site)
    with pytest.raises(DatasetError, match="labels"):
        skip_bad_cases(site)


def test_skip_bad_cases_refuses_when_nothing_left(site):
    for case in discover_site(site).train_cases:
        p = case.image_paths[0]
        p.write_bytes(b"broken")
    with pytest.raises(DatasetError, match="no usable labelled training case"):
        skip_bad_cases(site)


def test_federation_sites_must_agree_on_classes(synth_fed, tmp_path, capsys):
    root = Path(shutil.copytree(synth_fed, tmp_path / "fed"))
    _edit_json(root / "site_01", labels={"background": 0, "organ": 1, "lesion": 2, "cyst": 3})
    rc = main(["validate", str(root)])
    out = capsys.readouterr().out
    assert rc == 1
    assert str(root / "site_01" / "dataset.json") in out and "every site must declare the same classes" in out


def test_federation_sites_must_agree_on_channels(synth_fed, tmp_path):
    root = Path(shutil.copytree(synth_fed, tmp_path / "fed"))
    _two_channels(root / "site_01")
    report = validate_path(root)
    assert [p.code for p in report.errors] == ["federation-mismatch"]
    assert "same channels" in report.errors[0].message
