"""MONAI pipelines and loaders built from the plan, on real NIfTI files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, Invertd
from omegaconf import OmegaConf

from medseg_core.data.dataset import load_federation, load_site
from medseg_core.data.fingerprint import compute_site_fingerprint, make_plan, merge_fingerprints
from medseg_core.data.loaders import (
    LoaderSettings,
    build_site_loaders,
    build_unlabelled_loader,
    case_dicts,
    split_train_val,
)
from medseg_core.data.synthetic import make_site
from medseg_core.data.transforms import (
    BG_INDICES,
    CLASS_INDICES,
    DEFAULT_AUGMENTATION,
    FG_INDICES,
    NormalizeByPland,
    SampleCropCentresd,
    augmentation_settings,
    build_transforms,
    channel_normalization,
    random_transforms,
)

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "transforms" / "default.yaml"


@pytest.fixture(scope="module")
def sites(synth_fed):
    return load_federation(synth_fed)


@pytest.fixture(scope="module")
def plan(sites):
    return make_plan(merge_fingerprints([compute_site_fingerprint(s) for s in sites]))


@pytest.fixture(scope="module")
def ct_plan(sites):
    return make_plan(compute_site_fingerprint(sites[0]))


def _declared(site):
    return set(site.labels.values())


def test_default_yaml_matches_code_defaults():
    assert augmentation_settings(OmegaConf.load(CONFIG)) == DEFAULT_AUGMENTATION


@pytest.mark.parametrize("site_idx", [0, 1])
def test_train_patches_have_patch_size_and_valid_labels(sites, plan, site_idx):
    site = sites[site_idx]
    tf = build_transforms(plan, train=True, modalities=site.channel_names)
    tf.set_random_state(seed=0)
    for case in site.train_cases[:2]:
        out = tf(case.as_dict())
        assert len(out) == DEFAULT_AUGMENTATION["crop"]["num_samples"]
        for sample in out:
            assert tuple(sample["image"].shape) == (site.num_channels, *plan["patch_size"])
            assert tuple(sample["label"].shape) == (1, *plan["patch_size"])
            assert sample["image"].dtype == torch.float32 and sample["label"].dtype == torch.int64
            assert set(torch.unique(sample["label"]).tolist()) <= _declared(site)
            assert torch.isfinite(sample["image"]).all()


def test_crop_centres_are_subsampled_fg_and_bg_voxels():
    label = torch.zeros(1, 40, 40, 30, dtype=torch.uint8)
    label[0, 5:25, 10:30, 3:20] = 1  # 6,800 foreground voxels, 41,200 background
    label[0, 30:33, 30:33, 25:28] = 2
    flat = label[0].reshape(-1).numpy()
    op = SampleCropCentresd("label", max_centres=1000, seed=1)
    out = op({"label": label})
    fg, bg = out[FG_INDICES], out[BG_INDICES]
    assert len(fg) == len(bg) == 1000 and len(np.unique(fg)) == 1000 and len(np.unique(bg)) == 1000
    assert np.all(flat[fg] > 0) and np.all(flat[bg] == 0)
    assert np.array_equal(op({"label": label})[FG_INDICES], fg)  # deterministic: cacheable
    small = SampleCropCentresd("label", max_centres=100_000)({"label": label})
    assert len(small[FG_INDICES]) == int((flat > 0).sum())  # fewer than the cap: all of them
    with pytest.raises(ValueError, match="max_centres"):
        SampleCropCentresd("label", max_centres=0)


def test_positive_only_crops_always_contain_foreground(sites, plan):
    site = sites[1]
    cfg = {"crop": {"pos": 1.0, "neg": 0.0, "num_samples": 4}, "affine": {"prob": 0.0}}
    small = {**plan, "patch_size": [16, 16, 16]}  # an eighth of the volume: centres matter
    tf = build_transforms(small, train=True, cfg=cfg, modalities=site.channel_names)
    tf.set_random_state(seed=0)
    for case in site.train_cases:
        for sample in tf(case.as_dict()):
            assert tuple(sample["label"].shape) == (1, 16, 16, 16)
            assert (sample["label"] > 0).any()
            assert FG_INDICES not in sample and BG_INDICES not in sample and CLASS_INDICES not in sample


def test_class_indices_per_label_value():
    label = torch.zeros(1, 40, 40, 30, dtype=torch.uint8)
    label[0, 5:25, 10:30, 3:20] = 1
    label[0, 30:33, 30:33, 25:28] = 2  # 27 voxels
    flat = label[0].reshape(-1).numpy()
    out = SampleCropCentresd("label", max_centres=1000, seed=1, num_classes=4)({"label": label})
    bg, organ, lesion, absent = out[CLASS_INDICES]
    assert FG_INDICES not in out and BG_INDICES not in out
    assert len(bg) == len(organ) == 1000 and len(lesion) == 27 and len(absent) == 0
    assert np.all(flat[bg] == 0) and np.all(flat[organ] == 1) and np.all(flat[lesion] == 2)
    with pytest.raises(ValueError, match="num_classes"):
        SampleCropCentresd("label", num_classes=1)


def _centre_labels(plan, by_class: bool, n_draws: int) -> np.ndarray:
    """Label value at the centre of ``n_draws`` training crops of a case with an organ and a small lesion."""
    small = {**plan, "patch_size": [8, 8, 8], "num_classes": 3}
    cfg = {"crop": {"pos": 1.0, "neg": 1.0, "num_samples": n_draws, "by_class": by_class},
           "flip": {"prob": 0.0}, "affine": {"prob": 0.0}}
    label = torch.zeros(1, 32, 32, 32, dtype=torch.uint8)
    label[0, 4:28, 4:28, 4:28] = 1  # 13,824 organ voxels
    label[0, 14:17, 14:17, 14:17] = 2  # 27 lesion voxels: 0.2 % of the foreground
    steps = [SampleCropCentresd("label", num_classes=3 if by_class else None)]
    tf = Compose(steps + random_transforms(small, cfg))
    tf.set_random_state(seed=0)
    samples = tf({"image": torch.randn(1, 32, 32, 32), "label": label})
    return np.array([int(s["label"][0, 4, 4, 4]) for s in samples])


def test_class_balanced_crops_centre_small_classes(plan):
    """nnU-Net's sampling: with pos = neg = 1 and two foreground classes, a quarter of the crops are
    centred on the lesion however small it is; MONAI's pos/neg crop centres it in proportion to its size."""
    balanced = _centre_labels(plan, True, 400)
    plain = _centre_labels(plan, False, 400)
    assert 0.17 < np.mean(balanced == 2) < 0.33
    assert np.mean(balanced == 1) > 0.17  # background centres near the border shift onto the organ
    assert np.mean(plain == 2) < 0.03
    with pytest.raises(ValueError, match="by_class"):
        augmentation_settings({"crop": {"by_class": 1.0}})


def test_2d_training_patches_are_axial_slices(sites, plan):
    site = sites[0]
    tf = build_transforms(plan, train=True, spatial_dims=2, modalities=site.channel_names)
    out = tf(site.train_cases[0].as_dict())
    assert tuple(out[0]["image"].shape) == (1, *plan["patch_size_2d"])
    assert tuple(out[0]["label"].shape) == (1, *plan["patch_size_2d"])


def test_validation_is_deterministic_whole_volume_and_invertible(sites, plan):
    site = sites[0]  # stored LPS-flipped, 0.8 x 0.8 x 2.5 mm: reoriented and resampled
    case = site.test_cases[0]
    tf = build_transforms(plan, train=False, modalities=site.channel_names)
    a, b = tf(case.as_dict()), tf(case.as_dict())
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    geom = case.geometry()
    expected = np.round(np.asarray(geom.shape) * np.asarray(geom.spacing_mm) / np.asarray(plan["target_spacing_mm"]))
    shape = np.asarray(a["image"].shape[1:])
    assert np.all(np.abs(shape - np.maximum(expected, plan["patch_size"])) <= 1), (shape, expected)
    assert np.allclose(np.diag(a["image"].affine)[:3], plan["target_spacing_mm"])  # RAS, target spacing
    assert set(torch.unique(a["label"]).tolist()) <= _declared(site)

    # a "prediction" on the plan grid maps back to the original grid of the file
    a["pred"] = a["label"].clone().float()
    back = Invertd(keys="pred", transform=tf, orig_keys="label", nearest_interp=True)(a)["pred"]
    original = np.asarray(nib.load(str(case.label_path)).dataobj)
    assert tuple(back.shape[1:]) == original.shape
    assert np.allclose(back.affine.numpy(), geom.affine, atol=1e-4)
    fg_back, fg_orig = back[0].numpy() > 0, original > 0
    dice = 2 * (fg_back & fg_orig).sum() / (fg_back.sum() + fg_orig.sum())
    assert dice > 0.85


def test_inference_pipeline_without_label(sites, plan):
    site = sites[1]
    case = site.unlabelled_cases[0]
    tf = build_transforms(plan, train=False, with_label=False, modalities=site.channel_names)
    out = tf(case.as_dict())
    assert "label" not in out and out["image"].shape[0] == site.num_channels
    out["pred"] = (out["image"] > 0).float()
    back = Invertd(keys="pred", transform=tf, orig_keys="image", nearest_interp=True)(out)["pred"]
    assert tuple(back.shape[1:]) == case.geometry().shape


def test_flipped_affine_input_comes_out_in_ras(tmp_path):
    site_dir = tmp_path / "site_flip"
    (site_dir / "imagesTr").mkdir(parents=True)
    (site_dir / "labelsTr").mkdir()
    (site_dir / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "MR"}, "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}))
    ras = np.zeros((16, 16, 16), dtype=np.float32)
    ras[2:6, 3:9, 4:12] = 100.0  # asymmetric block, in RAS voxel order
    ras[10:12, 10:12, 10:12] = 200.0
    label = (ras > 0).astype(np.uint8)
    # store it flipped along x and y (LPS-like): voxel i maps to world x = -i
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for name, arr in (("imagesTr/c0_0000", ras), ("labelsTr/c0", label)):
        nib.save(nib.Nifti1Image(arr[::-1, ::-1, :].copy(), lps_affine), str(site_dir / f"{name}.nii.gz"))
    site = load_site(site_dir)
    plan = make_plan(compute_site_fingerprint(site))
    assert plan["target_spacing_mm"] == [1.0, 1.0, 1.0] and plan["patch_size"] == [16, 16, 16]
    out = build_transforms(plan, train=False)(site.train_cases[0].as_dict())
    assert np.array_equal(out["label"][0].numpy(), label)
    assert np.all(np.diag(out["image"].affine.numpy())[:3] > 0)
    img = out["image"][0].numpy()
    nz = ras[ras > 0]  # nonzero z-score, voxel for voxel where RAS puts them
    assert np.allclose(img[ras > 0], (nz - nz.mean()) / nz.std(), atol=1e-5)
    assert np.all(img[ras == 0] == 0)


def test_ct_normalisation_gives_unit_foreground(sites, ct_plan):
    site = sites[0]
    [channel] = channel_normalization(ct_plan, site.channel_names)
    assert channel["scheme"] == "ct"
    norm = NormalizeByPland(keys="image", channels=[channel])
    fg = []
    for case in site.train_cases:
        img = torch.as_tensor(nib.load(str(case.image_paths[0])).get_fdata(dtype=np.float32))[None]
        lab = np.asarray(nib.load(str(case.label_path)).dataobj) > 0
        fg.append(norm({"image": img})["image"][0].numpy()[lab])
    fg = np.concatenate(fg)
    assert abs(fg.mean()) < 0.05
    assert 0.9 < fg.std() <= 1.0  # clipping at the 0.5 / 99.5 percentiles trims the tails
    lo, hi = channel["clip"]
    assert fg.min() == pytest.approx((lo - channel["mean"]) / channel["std"], abs=1e-5)
    assert fg.max() == pytest.approx((hi - channel["mean"]) / channel["std"], abs=1e-5)

    # through the whole validation pipeline (resampled, interpolated) it stays close
    tf = build_transforms(ct_plan, train=False, modalities=site.channel_names)
    outs = [tf(c.as_dict()) for c in site.train_cases]
    fg_pipe = torch.cat([o["image"][o["label"] > 0] for o in outs]).numpy()
    assert abs(fg_pipe.mean()) < 0.2 and 0.7 < fg_pipe.std() < 1.1


def test_multichannel_site(tmp_path):
    site_dir = make_site(tmp_path / "site_mc", site_index=1, cases=2, shape=(24, 24, 24), n_test=0, n_channels=2)
    site = load_site(site_dir)
    plan = make_plan(compute_site_fingerprint(site))
    assert plan["num_channels"] == 2
    out = build_transforms(plan, train=True, modalities=site.channel_names)(site.train_cases[0].as_dict())
    assert tuple(out[0]["image"].shape) == (2, *plan["patch_size"])
    one_channel = {0: "T1"}
    with pytest.raises(ValueError, match="2 channel"):
        channel_normalization(plan, one_channel)


def test_normalisation_errors(sites, plan, ct_plan):
    with pytest.raises(ValueError, match="several modalities"):
        channel_normalization(plan)  # channel 0 is CT at one site, MR at the other
    with pytest.raises(ValueError, match="no CT statistics"):
        channel_normalization(make_plan(compute_site_fingerprint(sites[1])), {0: "CT"})
    assert channel_normalization(ct_plan, {0: "FLAIR"}) == [{"scheme": "nonzero"}]  # needs no statistics
    with pytest.raises(ValueError, match="unknown normalisation scheme"):
        NormalizeByPland(keys="image", channels=[{"scheme": "minmax"}])
    with pytest.raises(ValueError, match="std > 0"):
        NormalizeByPland(keys="image", channels=[{"scheme": "ct", "clip": [0, 1], "mean": 0, "std": 0}])
    norm = NormalizeByPland(keys="image", channels=[{"scheme": "nonzero"}])
    from monai.data import MetaTensor

    two = MetaTensor(torch.ones(2, 4, 4, 4), meta={"filename_or_obj": "/data/x_0000.nii.gz"})
    with pytest.raises(ValueError, match=r"/data/x_0000\.nii\.gz: image has 2 channel"):
        norm({"image": two})


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"flip": {"prob": 1.5}}, "probability"),
        ({"flips": {"prob": 0.5}}, "unknown transforms setting"),
        ({"affine": {"rotate": 10}}, r"affine\.rotate"),
        ({"crop": {"num_samples": 0}}, "num_samples"),
        ({"noise": {"std": -1}}, ">= 0"),
        ({"flip": 0.5}, "mapping"),
    ],
)
def test_bad_augmentation_settings(plan, cfg, match):
    with pytest.raises(ValueError, match=match):
        build_transforms(plan, train=True, cfg=cfg, modalities={0: "CT"})


def test_build_transforms_rejects_bad_spatial_dims(plan):
    with pytest.raises(ValueError, match="spatial_dims"):
        build_transforms(plan, train=True, spatial_dims=4, modalities={0: "CT"})


def test_site_loaders_give_batches_of_patch_shape(sites, plan):
    cfg = OmegaConf.create({"train": {"batch_size": 2, "num_workers": 0},
                            "data": {"val_fraction": 0.25, "split_seed": 0, "cache": True},
                            "seed": 0, "transforms": OmegaConf.load(CONFIG)})
    for site in sites:
        loaders = build_site_loaders(site, plan, cfg)
        assert len(loaders.train.dataset) == 3 and len(loaders.val.dataset) == 1  # 4 train cases, 25 % held out
        n_samples = DEFAULT_AUGMENTATION["crop"]["num_samples"]
        batch = next(iter(loaders.train))
        assert tuple(batch["image"].shape) == (2 * n_samples, site.num_channels, *plan["patch_size"])
        assert tuple(batch["label"].shape) == (2 * n_samples, 1, *plan["patch_size"])
        assert set(torch.unique(batch["label"]).tolist()) <= _declared(site)
        val = next(iter(loaders.val))
        assert val["image"].shape[0] == 1 and val["image"].shape[1] == site.num_channels
        assert all(s >= p for s, p in zip(val["image"].shape[2:], plan["patch_size"], strict=True))

    # val_fraction 0: validate on imagesTs; no cache; disk cache in a plan-specific folder
    site = sites[0]
    loaders = build_site_loaders(site, plan, settings=LoaderSettings(cache="none"))
    assert len(loaders.train.dataset) == len(site.train_cases)
    assert len(loaders.val.dataset) == len(site.test_cases)


def test_disk_cache_and_unlabelled_loader(tmp_path, sites, plan):
    site = sites[1]
    settings = LoaderSettings(batch_size=1, cache="disk", cache_dir=tmp_path / "cache")
    loaders = build_site_loaders(site, plan, settings=settings)
    first = next(iter(loaders.val))
    assert any((tmp_path / "cache").glob(f"{site.name}-val-*/*.pt"))
    again = next(iter(build_site_loaders(site, plan, settings=settings).val))  # read back from disk
    assert torch.equal(first["image"], again["image"])

    pre = build_unlabelled_loader(site, plan, settings=LoaderSettings(batch_size=1))
    batch = next(iter(pre))
    assert set(batch) == {"image", "case_id"}
    assert tuple(batch["image"].shape[1:]) == (site.num_channels, *plan["patch_size"])
    assert len(pre.dataset) == len(site.unlabelled_cases)


def test_split_and_case_dicts(sites):
    cases = sites[0].train_cases
    train, val = split_train_val(cases, 0.25, seed=3)
    assert len(val) == 1 and len(train) == len(cases) - 1
    assert split_train_val(list(reversed(cases)), 0.25, seed=3) == (train, val)  # file order irrelevant
    with pytest.raises(ValueError, match="leaves no training case"):
        split_train_val(cases[:1], 0.5)
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(cases, 1.0)
    with pytest.raises(ValueError, match="has no label"):
        case_dicts(sites[0].unlabelled_cases)
    assert "label" not in case_dicts(cases, with_label=False)[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"cache": "ram"}, "cache"),
        ({"cache": "disk"}, "cache_dir"),
        ({"spatial_dims": 1}, "spatial_dims"),
    ],
)
def test_loader_settings_validate(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoaderSettings(**kwargs)


def test_loader_settings_from_config():
    cfg = OmegaConf.create({"seed": 5, "train": {"batch_size": 4, "num_workers": 0},
                            "data": {"val_fraction": 0.2, "split_seed": 1, "cache": False, "cache_dir": "/x"}})
    s = LoaderSettings.from_config(cfg)
    assert (s.batch_size, s.val_fraction, s.split_seed, s.seed, s.cache, s.cache_dir) == (4, 0.2, 1, 5, "none", None)
    with pytest.raises(ValueError, match="unknown loader setting"):
        LoaderSettings.from_config(cfg, batchsize=3)
