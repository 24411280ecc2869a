"""Synthetic federation: contract layout, determinism, anatomy, and per-site scanner differences."""

from __future__ import annotations

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from medseg_core.data.dataset import load_federation, load_site
from medseg_core.data.synthetic import (
    LABELS,
    ScannerProfile,
    make_case,
    make_federation,
    make_site,
    patient_radius_mm,
    site_profile,
)
from medseg_core.data.validate import validate_path

SMALL = (24, 24, 24)


def _arrays(site_dir):
    """Every NIfTI under a site folder: relative path -> (voxel bytes, dtype, affine)."""
    out = {}
    for f in sorted(site_dir.rglob("*.nii.gz")):
        img = nib.load(str(f))
        data = np.asanyarray(img.dataobj)
        out[str(f.relative_to(site_dir))] = (data.tobytes(), data.dtype, img.affine.tobytes())
    return out


def test_layout_follows_site_contract(synth_fed):
    sites = load_federation(synth_fed)
    assert [s.name for s in sites] == ["site_00", "site_01"]
    for s in sites:
        assert s.layout == "nnunet" and not s.errors
        assert (len(s.train_cases), len(s.test_cases), len(s.unlabelled_cases)) == (4, 2, 1)
        assert s.labels == LABELS and s.num_classes == 3 and s.num_channels == 1
        meta = json.loads((s.root / "dataset.json").read_text())
        assert meta["numTraining"] == 4 and meta["file_ending"] == ".nii.gz"
        assert meta["scanner"]["description"]
        for case in s.train_cases + s.test_cases:
            img, lab = nib.load(str(case.image_paths[0])), nib.load(str(case.label_path))
            assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
            assert img.shape == lab.shape == (32, 32, 32)
            np.testing.assert_allclose(img.affine, lab.affine)
            assert set(np.unique(np.asanyarray(lab.dataobj)).tolist()) <= {0, 1, 2}
            assert (np.asanyarray(lab.dataobj) == 1).sum() > 50  # every case has an organ
    assert validate_path(synth_fed).ok


def test_same_seed_same_voxels_other_seed_differs(tmp_path):
    a = make_site(tmp_path / "a" / "site_00", cases=2, seed=3, shape=SMALL, n_test=1, n_unlabelled=1)
    b = make_site(tmp_path / "b" / "site_00", cases=2, seed=3, shape=SMALL, n_test=1, n_unlabelled=1)
    c = make_site(tmp_path / "c" / "site_00", cases=2, seed=4, shape=SMALL, n_test=1, n_unlabelled=1)
    arrays_a, arrays_b, arrays_c = _arrays(a), _arrays(b), _arrays(c)
    assert len(arrays_a) == 2 * 2 + 2 + 1
    assert arrays_a == arrays_b
    assert (a / "dataset.json").read_text() == (b / "dataset.json").read_text()
    assert all(arrays_a[k][0] != arrays_c[k][0] for k in arrays_a if "imagesTr" in k)


def test_extra_cases_do_not_change_training_cases(tmp_path):
    a = make_site(tmp_path / "a" / "s", cases=1, seed=0, shape=SMALL, n_test=0)
    b = make_site(tmp_path / "b" / "s", cases=1, seed=0, shape=SMALL, n_test=2, n_unlabelled=2)
    shared = {k: v for k, v in _arrays(a).items()}
    assert shared.items() <= _arrays(b).items()


def test_sites_look_like_different_scanners(tmp_path):
    roots = make_federation(tmp_path, n_sites=4, cases_per_site=1, n_test=0, shape=(32, 32, 32))
    stats = []
    for root in roots:
        site = load_site(root)
        case = site.train_cases[0]
        img = nib.load(str(case.image_paths[0]))
        data = np.asanyarray(img.dataobj)
        stats.append({"min": float(data.min()), "median": float(np.median(data)), "max": float(data.max()),
                      "zooms": tuple(round(float(z), 3) for z in img.header.get_zooms()),
                      "axcodes": nib.aff2axcodes(img.affine), "modality": site.modality(0)})
    ct, t1, t2, ct_raw = stats
    assert ct["modality"] == "CT" and ct["min"] < -900  # air in Hounsfield units
    assert t1["modality"] == "T1" and t1["min"] >= 0 and t2["min"] >= 0  # magnitude MR
    assert ct_raw["modality"] == "CT" and ct_raw["min"] >= 0  # CT stored without rescale intercept
    assert t2["max"] > 2 * t1["max"]  # arbitrary MR scale differs between scanners
    assert ct["zooms"] == (0.8, 0.8, 2.5) and t1["zooms"] == (1.0, 1.0, 1.0) and t2["zooms"] == (2.0, 1.2, 1.2)
    assert ct["axcodes"] == ("L", "P", "S") and t1["axcodes"] == ("R", "A", "S") and t2["axcodes"] == ("S", "A", "L")


@pytest.mark.parametrize("site_index", [0, 1, 2, 3, 5])
def test_affine_puts_anatomy_in_the_same_world_place(site_index):
    """Whatever the storage order, the organ is on the patient's right (+x, RAS) and the spine posterior."""
    profile = site_profile(site_index)
    shape = (32, 32, 32)
    rng = np.random.default_rng(11)
    images, label, affine, _ = make_case(profile, shape, patient_radius_mm([profile], shape), rng)
    centroid_mm = affine[:3, :3] @ np.argwhere(label == 1).mean(axis=0) + affine[:3, 3]
    assert centroid_mm[0] > 0
    np.testing.assert_allclose(nib.affines.voxel_sizes(affine), profile.voxel_spacing_mm)
    assert "".join(nib.aff2axcodes(affine)) == profile.orientation


def test_segmentation_is_learnable_but_not_a_threshold():
    """Organ differs from its surroundings by a few noise sigmas, yet no intensity window segments it."""
    from scipy import ndimage

    profile = site_profile(0)
    shape = (48, 48, 48)
    images, label, _, _ = make_case(profile, shape, patient_radius_mm([profile], shape), np.random.default_rng(0))
    img, organ = images[0], label > 0
    ring = ndimage.binary_dilation(organ, iterations=3) & ~organ
    contrast = abs(img[label == 1].mean() - img[ring].mean()) / profile.noise_sigma
    assert 1.5 < contrast < 10
    q = np.percentile(img[organ], [2, 10, 25, 50, 75, 90, 98])
    best = max(2 * ((img >= lo) & (img <= hi) & organ).sum() / (((img >= lo) & (img <= hi)).sum() + organ.sum())
               for lo in q for hi in q if hi > lo)
    assert best < 0.9


def test_lesion_prevalence_and_lesions_inside_organ():
    shape = (32, 32, 32)
    always = replace(site_profile(1), lesion_prevalence=1.0)
    never = replace(site_profile(1), lesion_prevalence=0.0)
    radius = patient_radius_mm([always], shape)
    for k in range(3):
        _, label, _, has_lesion = make_case(always, shape, radius, np.random.default_rng(k))
        assert has_lesion and (label == 2).any()
        _, label, _, has_lesion = make_case(never, shape, radius, np.random.default_rng(k))
        assert not has_lesion and not (label == 2).any()


def test_multichannel_site(tmp_path):
    root = make_site(tmp_path / "site_01", site_index=1, cases=1, n_test=0, shape=SMALL, n_channels=2)
    site = load_site(root)
    assert site.channel_names == {0: "T1", 1: "T2"}
    t1, t2 = (np.asanyarray(nib.load(str(p)).dataobj) for p in site.train_cases[0].image_paths)
    assert t1.shape == t2.shape and not np.array_equal(t1, t2)
    assert validate_path(root).ok


def test_more_sites_than_profiles_vary(tmp_path):
    profiles = [site_profile(i, seed=0) for i in range(9)]
    assert profiles[4].modality == profiles[0].modality and profiles[4] != profiles[0]
    assert len({p.description for p in profiles}) == 9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_sites": 0}, "n_sites must be an integer >= 1, got 0"),
        ({"cases_per_site": 0}, "cases_per_site must be an integer >= 1, got 0"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"shape": (32, 32)}, r"shape must be 3 integers >= 8 \(3D only\), got \(32, 32\)"),
        ({"shape": (32, 32, 4)}, r"got \(32, 32, 4\)"),
        ({"n_test": -2}, "n_test must be an integer >= 0, got -2"),
        ({"n_unlabelled": 1.5}, "n_unlabelled must be an integer >= 0, got 1.5"),
    ],
)
def test_make_federation_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_federation(tmp_path / "fed", **kwargs)
    assert not (tmp_path / "fed").exists()


def test_make_federation_refuses_to_overwrite(tmp_path):
    (tmp_path / "site_01").mkdir()
    (tmp_path / "site_01" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="site_01"):
        make_federation(tmp_path, n_sites=2, cases_per_site=1, shape=SMALL)
    assert not (tmp_path / "site_00").exists()  # nothing written before the check
    assert (tmp_path / "site_01" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"axis_order": (0, 0, 1)}, r"axis_order must be a permutation of \(0, 1, 2\), got \(0, 0, 1\)"),
        ({"spacing_mm": (1.0, 0.0, 1.0)}, r"spacing_mm must be 3 positive numbers, got \(1.0, 0.0, 1.0\)"),
        ({"contrasts": ("PET",), "channel_names": ("PET",)}, "contrasts must be among"),
        ({"lesion_prevalence": 1.5}, r"lesion_prevalence must be in \[0, 1\], got 1.5"),
        ({"noise_sigma": -1.0}, "noise_sigma must be >= 0, got -1.0"),
    ],
)
def test_scanner_profile_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        replace(site_profile(0), **changes)


def test_site_profile_rejects_negative_index():
    with pytest.raises(ValueError, match="site_index must be >= 0, got -1"):
        site_profile(-1)


def test_profile_to_dict_is_json(tmp_path):
    d = ScannerProfile.to_dict(site_profile(2))
    assert json.loads(json.dumps(d))["orientation"] == "SAL"
