"""Fingerprint, merge and plan: merged per-site fingerprints give the pooled plan; artefacts are sane."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from medseg_core.data.dataset import load_federation, load_site
from medseg_core.data.fingerprint import (
    HIST_BIN_WIDTH,
    SCHEME_CT,
    SCHEME_NONZERO,
    PlanError,
    compute_site_fingerprint,
    fingerprint_problems,
    fit_patch_size,
    histogram_bin_width,
    histogram_percentile,
    load_fingerprint,
    load_plan,
    make_plan,
    merge_fingerprints,
    save_json,
    target_spacing,
)


@pytest.fixture(scope="module")
def sites(synth_fed):
    return load_federation(synth_fed)


@pytest.fixture(scope="module")
def fps(sites):
    return [compute_site_fingerprint(s) for s in sites]


def _foreground_voxels(cases):
    out = []
    for c in cases:
        img = nib.load(str(c.image_paths[0])).get_fdata(dtype=np.float32)
        lab = np.asarray(nib.load(str(c.label_path)).dataobj)
        out.append(img[lab > 0].astype(np.float64))
    return np.concatenate(out)


def _write_case(folder, case_id, image, label, affine):
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(folder / "imagesTr" / f"{case_id}_0000.nii.gz"))
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), str(folder / "labelsTr" / f"{case_id}.nii.gz"))


def _write_meta(folder, modality="CT"):
    meta = {"channel_names": {"0": modality}, "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(meta))


def test_merged_plan_equals_pooled_plan(sites, fps):
    """Two real, different sites (spacing, orientation, intensities) declared with the same modality:
    planning from the merged fingerprints gives the plan of one site holding every case."""
    ct_site, other = sites
    other_as_ct = replace(other, channel_names=dict(ct_site.channel_names))
    site_fps = [fps[0], compute_site_fingerprint(other_as_ct)]
    pooled_site = replace(ct_site, name="pooled", cases=ct_site.cases + other.cases)
    pooled_fp = compute_site_fingerprint(pooled_site)
    merged_fp = merge_fingerprints(site_fps)

    # the exact parts of the fingerprint agree exactly
    for key in ("num_cases", "cases", "classes", "labels"):
        assert merged_fp[key] == pooled_fp[key], key
    m_stats, p_stats = merged_fp["channels"]["0"]["CT"], pooled_fp["channels"]["0"]["CT"]
    assert m_stats["foreground"]["histogram"] == p_stats["foreground"]["histogram"]
    assert m_stats["foreground"]["count"] == p_stats["foreground"]["count"]

    merged, pooled = make_plan(merged_fp), make_plan(pooled_fp)
    for key in ("target_spacing_mm", "anisotropic_axis", "median_shape", "patch_size", "patch_size_2d",
                "num_classes", "class_frequencies"):
        assert merged[key] == pooled[key], key
    m_norm, p_norm = merged["normalization"]["0"]["CT"], pooled["normalization"]["0"]["CT"]
    assert m_norm["scheme"] == p_norm["scheme"] == SCHEME_CT
    assert m_norm["clip"] == p_norm["clip"]  # same histogram -> same percentiles
    assert m_norm["mean"] == pytest.approx(p_norm["mean"], rel=1e-12)
    assert m_norm["std"] == pytest.approx(p_norm["std"], rel=1e-9)

    # and they are the percentiles / moments of the pooled voxels, within one histogram bin
    voxels = _foreground_voxels(pooled_site.train_cases)
    for value, q, tol in zip(m_norm["clip"], m_norm["percentiles"], m_norm["clip_tolerance"], strict=True):
        exact = float(np.percentile(voxels, q))
        assert abs(value - exact) <= tol, (q, value, exact, tol)
        assert tol == pytest.approx(histogram_bin_width(value))
    assert m_norm["mean"] == pytest.approx(voxels.mean(), rel=1e-9)
    assert m_norm["std"] == pytest.approx(voxels.std(), rel=1e-6)


def test_mixed_modalities_are_merged_per_modality(sites, fps):
    plan = make_plan(merge_fingerprints(fps))
    modalities = {s.modality(0) for s in sites}
    assert len(modalities) == 2 and "CT" in modalities  # site_00 CT, site_01 MR-like
    norm = plan["normalization"]["0"]
    assert set(norm) == modalities
    mr = (modalities - {"CT"}).pop()
    assert norm[mr]["scheme"] == SCHEME_NONZERO
    # CT statistics come from the CT site only, not mixed with MR intensities
    assert norm["CT"] == make_plan(fps[0])["normalization"]["0"]["CT"]
    # geometry uses every site
    spacings = np.asarray([g["spacing_mm"] for fp in fps for g in fp["cases"]])
    assert plan["target_spacing_mm"] == pytest.approx(np.median(spacings, axis=0).tolist())
    assert plan["sites"] == sorted(s.name for s in sites)
    assert plan["num_cases"] == sum(len(s.train_cases) for s in sites)


def test_geometry_is_recorded_in_ras_order(sites, fps):
    # site_00 is stored LPS-flipped with 0.8 x 0.8 x 2.5 mm; site_01 is 1 mm isotropic
    for site, fp in zip(sites, fps, strict=True):
        geom = site.train_cases[0].geometry()
        perm = nib.orientations.io_orientation(geom.affine)[:, 0].astype(int)
        expected = [0.0] * 3
        for axis, ras in enumerate(perm):
            expected[ras] = round(geom.spacing_mm[axis], 6)
        assert fp["cases"][0]["spacing_mm"] == expected


def test_merge_is_order_independent_and_pure(sites, fps):
    ct = sites[0]
    half = len(ct.cases) // 2
    parts = [compute_site_fingerprint(replace(ct, name="a", cases=ct.cases[:half])),
             compute_site_fingerprint(replace(ct, name="b", cases=ct.cases[half:])),
             fps[1]]
    snapshot = json.dumps(parts, sort_keys=True)
    results = [merge_fingerprints(list(p)) for p in itertools.permutations(parts)]
    assert all(r == results[0] for r in results[1:])
    assert json.dumps(parts, sort_keys=True) == snapshot  # inputs untouched


def test_fingerprint_holds_aggregates_only(sites, fps):
    for site, fp in zip(sites, fps, strict=True):
        text = json.dumps(fp, allow_nan=False)  # JSON-serialisable
        assert len(text) < 64_000
        for case in site.cases:
            assert case.case_id not in text
        n_voxels = math.prod(site.train_cases[0].geometry().shape)
        for stats in fp["channels"]["0"].values():
            f = stats["foreground"]
            hist = f["histogram"]
            assert sum(hist["count"]) == f["count"]
            # bounded by the intensity range on the grid, not by the number of voxels
            bound = (math.asinh(f["max"]) - math.asinh(f["min"])) / HIST_BIN_WIDTH + 2
            assert len(hist["index"]) <= bound

        def lists(obj):
            if isinstance(obj, dict):
                for v in obj.values():
                    yield from lists(v)
            elif isinstance(obj, list):
                yield obj
                for v in obj:
                    yield from lists(v)

        assert max(len(x) for x in lists(fp)) < n_voxels // 10


def test_json_round_trip(tmp_path, fps):
    merged = merge_fingerprints(fps)
    plan = make_plan(merged)
    assert load_fingerprint(save_json(merged, tmp_path / "fingerprint.json")) == merged
    path = save_json(plan, tmp_path / "plan.json")
    assert load_plan(path) == plan
    text = path.read_text()
    assert '"target_spacing_mm": [' in text and "NaN" not in text  # readable, one line per short list


def test_histogram_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(40, 15, 5000), rng.normal(-900, 30, 500)])
    idx = np.floor(np.arcsinh(values) / HIST_BIN_WIDTH).astype(int)
    uniq, counts = np.unique(idx, return_counts=True)
    hist = {"index": uniq.tolist(), "count": counts.tolist()}
    for q in (0.5, 5, 50, 95, 99.5):
        est = histogram_percentile(hist, q, vmin=values.min(), vmax=values.max())
        assert abs(est - np.percentile(values, q)) <= histogram_bin_width(est), q
    with pytest.raises(ValueError, match="percentile"):
        histogram_percentile(hist, 101)
    with pytest.raises(ValueError, match="empty"):
        histogram_percentile({"index": [], "count": []}, 50)


def test_target_spacing_anisotropic_rule():
    iso = np.array([[1.0, 1.0, 1.2], [0.9, 0.9, 1.0], [1.1, 1.1, 1.4]])
    assert target_spacing(iso) == ([1.0, 1.0, 1.2], None)
    thick = np.array([[0.8, 0.8, 5.0]] * 8 + [[0.7, 0.7, 1.5], [0.7, 0.7, 2.5]])
    target, axis = target_spacing(thick)
    assert axis == 2
    assert target[:2] == [0.8, 0.8]
    assert target[2] == pytest.approx(np.percentile(thick[:, 2], 10))  # 2.4, not the median 5.0
    # never finer than the other axes
    assert target_spacing(np.array([[2.0, 2.0, 0.5], [2.0, 2.0, 8.0], [2.0, 2.0, 8.0]]))[0][2] >= 2.0


def test_patch_size_fits_shape_budget_and_divisor():
    assert fit_patch_size([40, 40, 40], [1, 1, 1], 128**3, 16) == [32, 32, 32]
    assert fit_patch_size([10, 200, 200], [1, 1, 1], 128**3, 16) == [16, 192, 192]  # 10 < 16: padded
    assert fit_patch_size([10, 200, 200], [1, 1, 1], 16 * 128 * 128, 16) == [16, 128, 128]
    patch = fit_patch_size([300, 300, 90], [0.8, 0.8, 2.5], 96**3, 16)
    assert math.prod(patch) <= 96**3 and all(p % 16 == 0 for p in patch)
    assert patch[2] <= 90 and patch[0] == patch[1]
    with pytest.raises(ValueError, match="budget"):
        fit_patch_size([64, 64, 64], [1, 1, 1], 15**3, 16)


def test_make_plan_rejects_bad_arguments(fps):
    merged = merge_fingerprints(fps)
    with pytest.raises(ValueError, match="num_pool"):
        make_plan(merged, num_pool=-1)
    with pytest.raises(ValueError, match="percentiles"):
        make_plan(merged, percentiles=(99.5, 0.5))
    with pytest.raises(ValueError, match="anisotropy_threshold"):
        make_plan(merged, anisotropy_threshold=1.0)
    with pytest.raises(ValueError, match="budget"):
        make_plan(merged, max_patch_voxels=100)
    with pytest.raises(PlanError, match="kind"):
        make_plan({**merged, "kind": "plan"})


def test_merge_refuses_incompatible_fingerprints(fps):
    with pytest.raises(ValueError, match="empty"):
        merge_fingerprints([])
    with pytest.raises(ValueError, match="labels"):
        merge_fingerprints([fps[0], {**fps[1], "labels": {"background": 0, "organ": 1}}])
    with pytest.raises(ValueError, match="more than one"):
        merge_fingerprints([fps[0], fps[0]])
    with pytest.raises(PlanError, match="version"):
        merge_fingerprints([fps[0], {**fps[1], "version": 99}])


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda p: p.update(version=2), "version 2 is not supported"),
        (lambda p: p.pop("patch_size"), "missing key"),
        (lambda p: p.update(patch_size=[24, 32, 32]), "not divisible"),
        (lambda p: p.update(target_spacing_mm=[1.0, -1.0, 1.0]), "target_spacing_mm"),
        (lambda p: p["normalization"]["0"]["CT"].update(std=0.0), "std"),
        (lambda p: p["normalization"]["0"]["CT"].update(scheme="minmax"), "unknown scheme"),
    ],
)
def test_load_plan_rejects_malformed_files(tmp_path, fps, edit, match):
    plan = make_plan(merge_fingerprints(fps))
    edit(plan)
    path = save_json(plan, tmp_path / "plan.json")
    with pytest.raises(PlanError, match=match) as info:
        load_plan(path)
    assert str(path) in str(info.value)


def test_load_plan_rejects_missing_and_invalid_json(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(bad)


def test_bad_case_errors_name_the_file(tmp_path):
    site_dir = tmp_path / "site_bad"
    _write_meta(site_dir)
    lab = np.zeros((8, 8, 8))
    lab[2:5, 2:5, 2:5] = 1
    _write_case(site_dir, "ok", np.full((8, 8, 8), -1000.0), lab, np.eye(4))
    lab_bad = lab.copy()
    lab_bad[0, 0, 0] = 7  # not declared in dataset.json
    _write_case(site_dir, "zz", np.zeros((8, 8, 8)), lab_bad, np.eye(4))
    with pytest.raises(ValueError, match=r"zz\.nii\.gz.*\[7\] are not declared"):
        compute_site_fingerprint(load_site(site_dir))

    shape_dir = tmp_path / "site_shape"
    _write_meta(shape_dir)
    _write_case(shape_dir, "c1", np.zeros((8, 8, 9)), lab, np.eye(4))
    with pytest.raises(ValueError, match=r"c1_0000\.nii\.gz: image shape"):
        compute_site_fingerprint(load_site(shape_dir))

    empty = replace(load_site(shape_dir), cases=[])
    with pytest.raises(ValueError, match="no labelled training case"):
        compute_site_fingerprint(empty)


def test_ct_channel_not_in_hounsfield_units_is_flagged(sites, fps):
    assert fingerprint_problems(fps[0]) == []  # real HU, air at -1000
    mr_declared_ct = compute_site_fingerprint(replace(sites[1], channel_names={0: "CT"}))
    found = fingerprint_problems(mr_declared_ct)
    assert [p.code for p in found] == ["ct-not-hu"] and sites[1].name in found[0].path
