"""The Medical Segmentation Decathlon ``dataset.json`` (``training: [{image, label}]``) is read too."""

from __future__ import annotations

import json
import shutil

from medseg_core.data.cli import main as cli_main
from medseg_core.data.dataset import discover_site, load_site


def _to_msd(src, dst):
    """Rewrite a synthetic nnU-Net site as an MSD task folder (one file per case, inverted label map)."""
    shutil.copytree(src, dst)
    nn = json.loads((dst / "dataset.json").read_text())
    training, test = [], []
    for img in sorted((dst / "imagesTr").iterdir()):
        case = img.name.replace("_0000.nii.gz", "")
        new = img.with_name(f"{case}.nii.gz")
        img.rename(new)
        label = dst / "labelsTr" / f"{case}.nii.gz"
        if label.exists():
            training.append({"image": f"./imagesTr/{new.name}", "label": f"./labelsTr/{label.name}"})
    for img in sorted((dst / "imagesTs").iterdir()):
        new = img.with_name(img.name.replace("_0000", ""))
        img.rename(new)
        test.append(f"./imagesTs/{new.name}")
    shutil.rmtree(dst / "labelsTs")
    msd = {"name": "Task00_synthetic", "modality": {"0": nn["channel_names"]["0"]},
           "labels": {str(v): k for k, v in nn["labels"].items()}, "numTraining": len(training),
           "training": training, "test": test}
    (dst / "dataset.json").write_text(json.dumps(msd))
    return len(training), len(test)


def test_msd_dataset_json_is_read(synth_fed, tmp_path):
    n_train, n_test = _to_msd(synth_fed / "site_00", tmp_path / "Task00")
    site = load_site(tmp_path / "Task00")
    assert site.layout == "msd"
    assert site.labels == {"background": 0, "organ": 1, "lesion": 2}
    assert site.channel_names == {0: "CT"}
    assert len(site.train_cases) == n_train and not site.test_cases
    assert len([c for c in site.cases if c.split == "test"]) == n_test
    case = site.train_cases[0]
    assert case.label_path.is_file() and case.geometry().ndim == 3
    assert cli_main(["validate", str(tmp_path / "Task00")]) == 0


def test_msd_entry_pointing_at_a_missing_file_is_an_error(synth_fed, tmp_path, capsys):
    _to_msd(synth_fed / "site_00", tmp_path / "Task00")
    meta = json.loads((tmp_path / "Task00" / "dataset.json").read_text())
    meta["training"][0]["image"] = "./imagesTr/nope.nii.gz"
    (tmp_path / "Task00" / "dataset.json").write_text(json.dumps(meta))
    assert discover_site(tmp_path / "Task00").layout == "msd"
    assert cli_main(["validate", str(tmp_path / "Task00")]) == 1
    out = capsys.readouterr()
    assert "nope.nii.gz" in out.out + out.err and "Traceback" not in out.out + out.err
