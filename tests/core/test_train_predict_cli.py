"""End to end: ``medseg-train`` on a tiny synthetic federation, then ``medseg-predict`` on its test scans.

The Dice that ``medseg-predict --reference`` reports is recomputed here independently, from the NIfTI
files it wrote, with plain NumPy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

TINY_UNET = ["model.channels=[4,8,16]", "model.strides=[2,2]", "model.num_res_units=1"]


def _run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def trained(synth_fed, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    proc = _run([sys.executable, "-m", "medseg_core.train_cli", f"data.root={synth_fed}", f"paths.run_dir={run_dir}",
                 "train.epochs=2", "train.progress=false", "eval.hd95=false", *TINY_UNET,
                 f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run_dir, proc.stdout


@pytest.mark.slow
def test_train_writes_every_artefact(trained, synth_fed):
    run_dir, out = trained
    for name in ("resolved_config.yaml", "plan.json", "fingerprints.json", "history.json", "curves.png",
                 "best.pt", "last.pt", "test_metrics.json"):
        assert (run_dir / name).is_file(), name
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history["epochs"]) == 2 and set(history["sites"]) == {"site_00", "site_01"}
    assert all(np.isfinite(e["train_loss"]) for e in history["epochs"])
    test = json.loads((run_dir / "test_metrics.json").read_text())
    assert set(test["sites"]) == {"site_00", "site_01"}
    assert "test mean foreground Dice" in out
    # post-processing never tried a size above the smallest true structure in the training labels
    smallest = {}
    for path in sorted(synth_fed.glob("site_*/labelsTr/*.nii.gz")):
        img = nib.load(path)
        data, voxel_mm3 = np.asanyarray(img.dataobj), float(np.prod(img.header.get_zooms()[:3]))
        for name, value in (("organ", 1), ("lesion", 2)):
            components, n = ndimage.label(data == value)
            if n:
                size = np.bincount(components.ravel())[1:].min() * voxel_mm3
                smallest[name] = min(size, smallest.get(name, np.inf))
    caps = history["postprocessing"]["chosen_on"]["max_size_mm3"]
    assert caps == pytest.approx(smallest)
    for value, size in history["postprocessing"]["min_size_mm3"].items():
        assert size <= caps[{"1": "organ", "2": "lesion"}[value]]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.logical_and(a, b).sum()
    return 2.0 * inter / (a.sum() + b.sum())


@pytest.mark.slow
def test_predict_keeps_geometry_and_its_reported_dice_is_right(trained, synth_fed, tmp_path):
    run_dir, _ = trained
    images, labels = synth_fed / "site_01" / "imagesTs", synth_fed / "site_01" / "labelsTs"
    out = tmp_path / "pred"
    proc = _run([sys.executable, "-m", "medseg_core.predict", "--checkpoint", str(run_dir / "best.pt"),
                 "--input", str(images), "--output", str(out), "--reference", str(labels), "--modality", "T1",
                 "--overlay"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reported = json.loads((out / "metrics.json").read_text())["cases"]
    for img_path in sorted(images.iterdir()):
        case = img_path.name.replace("_0000.nii.gz", "")
        src, pred = nib.load(img_path), nib.load(out / f"{case}.nii.gz")
        assert pred.shape == src.shape
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
        p = np.asarray(pred.dataobj)
        assert p.dtype == np.uint8 and set(np.unique(p)) <= {0, 1, 2}
        gt = np.asarray(nib.load(labels / f"{case}.nii.gz").dataobj)
        for name, value in (("organ", 1), ("lesion", 2)):
            if (gt == value).any() and (p == value).any():
                assert abs(_dice(p == value, gt == value) - reported[case][name]["dice"]) < 0.01
        assert (out / f"{case}.png").is_file()


@pytest.mark.slow
def test_original_grid_test_scores_are_what_predict_delivers(trained, synth_fed, tmp_path):
    """``medseg-train`` scores its test cases on each scan's own grid too; those figures must be exactly the
    ones ``medseg-predict --reference`` reports for the same checkpoint with its default settings."""
    run_dir, out = trained
    test = json.loads((run_dir / "test_metrics.json").read_text())
    summary = test["summary"]
    assert set(summary["test_per_site_original_grid"]) == {"site_00", "site_01"}
    assert np.isfinite(summary["test_mean_dice_original_grid"])
    assert "original grids" in out
    ours = {c["case_id"]: c["metrics"] for c in test["original_grid"]["sites"]["site_01"]["cases"]}
    images, labels = synth_fed / "site_01" / "imagesTs", synth_fed / "site_01" / "labelsTs"
    pred_dir = tmp_path / "pred"
    proc = _run([sys.executable, "-m", "medseg_core.predict", "--checkpoint", str(run_dir / "best.pt"),
                 "--input", str(images), "--output", str(pred_dir), "--reference", str(labels),
                 "--modality", "T1"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    theirs = json.loads((pred_dir / "metrics.json").read_text())["cases"]
    assert set(ours) == set(theirs) and ours
    for case, metrics in ours.items():
        for name in ("organ", "lesion"):
            a, b = metrics[name]["dice"], theirs[case][name]["dice"]
            assert (np.isnan(a) and np.isnan(b)) or abs(a - b) < 1e-6, (case, name, a, b)
        gt = np.asarray(nib.load(labels / f"{case}.nii.gz").dataobj)
        p = np.asarray(nib.load(pred_dir / f"{case}.nii.gz").dataobj)
        if (gt == 1).any() and (p == 1).any():  # the written label map, on the scan's grid, gives it too
            assert abs(_dice(p == 1, gt == 1) - metrics["organ"]["dice"]) < 1e-6


@pytest.mark.slow
def test_test_split_is_scored_with_the_test_overlap_not_the_validation_one(synth_fed, tmp_path):
    """Validation passes use ``eval.overlap`` (cheap); the test (and the post-processing choice) use
    ``eval.test_overlap``, medseg-predict's. Windows smaller than the volumes, so the overlap matters."""
    import torch
    from monai.data import DataLoader, Dataset

    from medseg_core.checkpoint import load_checkpoint, model_from_checkpoint
    from medseg_core.data.transforms import build_transforms
    from medseg_core.engine import evaluate
    from medseg_core.workflow import foreground_classes, roi_size, validated_sites

    run_dir = tmp_path / "run"
    proc = _run([sys.executable, "-m", "medseg_core.train_cli", f"data.root={synth_fed}", f"paths.run_dir={run_dir}",
                 "train.epochs=1", "train.progress=false", "eval.hd95=false", "eval.original_grid=false",
                 "eval.postprocess=false", "eval.overlap=0.25", "eval.test_overlap=0.75",
                 "data.planning.max_patch_voxels=4096", *TINY_UNET, f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    test = json.loads((run_dir / "test_metrics.json").read_text())
    assert test["summary"]["test_overlap"] == 0.75
    payload = load_checkpoint(run_dir / "best.pt")
    model = model_from_checkpoint(payload).eval()
    site = validated_sites(synth_fed, ["site_00"], log=lambda *_: None)[0]
    loader = DataLoader(Dataset([c.as_dict() for c in site.test_cases], build_transforms(
        payload["plan"], train=False, modalities=site.channel_names, spatial_dims=3)), batch_size=1)
    assert max(roi_size(payload["plan"], 3)) < 32  # several windows per volume
    dice = {ov: [c["metrics"]["organ"]["dice"] for c in evaluate(
        model, loader, device=torch.device("cpu"), roi_size=roi_size(payload["plan"], 3),
        class_values=foreground_classes(site.labels), overlap=ov, hd95=False)["cases"]] for ov in (0.25, 0.75)}
    recorded = [c["metrics"]["organ"]["dice"] for c in test["sites"]["site_00"]["cases"]]
    assert recorded == pytest.approx(dice[0.75], abs=1e-6)
    assert dice[0.75] != pytest.approx(dice[0.25], abs=1e-6)  # else this test could not tell them apart


@pytest.mark.slow
def test_predict_reports_a_corrupt_file_and_still_predicts_the_others(trained, synth_fed, tmp_path):
    run_dir, _ = trained
    folder = tmp_path / "in"
    shutil.copytree(synth_fed / "site_01" / "imagesTs", folder)
    corrupt = folder / "broken_0000.nii.gz"
    corrupt.write_bytes((folder / sorted(p.name for p in folder.iterdir())[0]).read_bytes()[:300])
    out = tmp_path / "pred"
    proc = _run([sys.executable, "-m", "medseg_core.predict", "--checkpoint", str(run_dir / "best.pt"),
                 "--input", str(folder), "--output", str(out), "--modality", "T1"])
    assert proc.returncode == 1
    assert "broken_0000.nii.gz" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    good = [p.name.replace("_0000", "") for p in folder.iterdir() if p.name != corrupt.name]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(good)


@pytest.mark.slow
def test_wrong_channel_count_is_a_clear_error(trained, synth_fed, tmp_path):
    run_dir, _ = trained
    folder = tmp_path / "two_channels"
    folder.mkdir()
    src = sorted((synth_fed / "site_01" / "imagesTs").iterdir())[0]
    for ch in ("0000", "0001"):
        shutil.copy(src, folder / f"case_{ch}.nii.gz")
    proc = _run([sys.executable, "-m", "medseg_core.predict", "--checkpoint", str(run_dir / "best.pt"),
                 "--input", str(folder), "--output", str(tmp_path / "o"), "--modality", "T1"])
    assert proc.returncode == 1
    assert "expects 1 channel(s), this case has 2" in proc.stderr


@pytest.mark.slow
def test_train_refuses_bad_data_before_training(synth_fed, tmp_path):
    bad = tmp_path / "fed"
    shutil.copytree(synth_fed, bad)
    lab = sorted((bad / "site_00" / "labelsTr").iterdir())[0]
    img = nib.load(lab)
    data = np.asarray(img.dataobj).astype(np.uint8)
    data[0, 0, 0] = 7  # a label value dataset.json does not declare
    nib.save(nib.Nifti1Image(data, img.affine, img.header), lab)
    run_dir = tmp_path / "run"
    proc = _run([sys.executable, "-m", "medseg_core.train_cli", f"data.root={bad}", f"paths.run_dir={run_dir}",
                 "train.epochs=1", *TINY_UNET, f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 1
    assert "refusing to train" in proc.stderr and lab.name in proc.stderr
    assert not (run_dir / "last.pt").exists()
