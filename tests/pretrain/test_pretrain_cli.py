"""``medseg-pretrain`` end to end on the tiny synthetic federation: artefacts, images used (never a label,
test images only when asked), exact resume, refusals, extra folders, and transfer of its encoder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from medseg_core.config import compose_config
from medseg_core.data.dataset import load_site
from medseg_core.data.problems import DatasetError
from medseg_core.models.pretrained import load_pretrained_from_config, read_encoder_checkpoint
from medseg_core.workflow import build_configured_model, model_config
from pretrain.cli import run_pretraining
from pretrain.data import image_folder_cases, pretraining_cases

TINY_UNET = ["model.channels=[4,8,16]", "model.strides=[2,2]", "model.num_res_units=1"]
QUIET = ["train.progress=false", "sched=none", "transforms.crop.num_samples=1"]


def _cfg(root, *overrides):
    return compose_config("pretrain", [f"data.root={root}", *TINY_UNET, *QUIET, *overrides])


@pytest.fixture(scope="module")
def cli_run(synth_fed, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrain")
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.cli", f"data.root={synth_fed}", f"paths.run_dir={run_dir}",
         f"hydra.run.dir={run_dir}", "train.epochs=2", *TINY_UNET, *QUIET],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run_dir, proc.stdout


@pytest.mark.slow
def test_pretrain_writes_encoder_pictures_and_history(cli_run, synth_fed):
    run_dir, out = cli_run
    for name in ("resolved_config.yaml", "plan.json", "images.json", "history.json", "loss_curve.png",
                 "reconstruction.png", "last.pt", "encoder.pt"):
        assert (run_dir / name).is_file(), name
    for png in ("loss_curve.png", "reconstruction.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert all(torch.isfinite(torch.tensor([e["train_loss"], e["val_loss"]])).all() for e in history["epochs"])
    assert "encoder" in out and "written" in out

    # every unlabelled and test image of both sites, no training image, no label file
    images = json.loads((run_dir / "images.json").read_text())
    listed = {c["case_id"] for part in ("train", "val") for cases in images[part].values() for c in cases}
    files = [f for part in ("train", "val") for cases in images[part].values() for c in cases for f in c["images"]]
    expected = {p.name.replace("_0000.nii.gz", "") for s in ("site_00", "site_01")
                for p in (synth_fed / s / "imagesTs").iterdir()}
    expected |= {p.name.replace("_0000.nii.gz", "") for s in ("site_00", "site_01")
                 for p in (synth_fed / s / "imagesTr").iterdir()
                 if not (synth_fed / s / "labelsTr" / p.name.replace("_0000", "")).exists()}
    assert listed == expected
    assert all("/images" in f and "labels" not in f for f in files)


@pytest.mark.slow
def test_its_encoder_loads_into_the_training_model_with_a_clean_report(cli_run):
    run_dir, _ = cli_run
    path = run_dir / "encoder.pt"
    payload = read_encoder_checkpoint(path)
    assert payload["encoder"]["method"] == "mim" and payload["encoder"]["model_name"] == "unet"
    assert payload["plan"]["patch_size"] and payload["channel_names"]
    cfg = compose_config("train", [*TINY_UNET, f"model.pretrained={path}"])
    kwargs = model_config(cfg.model, in_channels=1, out_channels=3, plan=payload["plan"])
    model = build_configured_model(kwargs)
    report = load_pretrained_from_config(model, cfg.model, model_config=kwargs, log=None)
    assert report.clean and len(report.loaded) == len(payload["encoder"]["keys"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in payload["state_dict"].items())


def test_resume_continues_exactly_and_refuses_another_config(synth_fed, tmp_path):
    straight = run_pretraining(_cfg(synth_fed, "train.epochs=2", "images.test=false"), tmp_path / "a")
    run_pretraining(_cfg(synth_fed, "train.epochs=1", "images.test=false"), tmp_path / "b")
    resumed = run_pretraining(_cfg(synth_fed, "train.epochs=2", "images.test=false"), tmp_path / "b")
    assert straight["epochs"] == resumed["epochs"] == 2
    losses = [[e["train_loss"] for e in json.loads((tmp_path / r / "history.json").read_text())["epochs"]]
              for r in ("a", "b")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    a, b = (read_encoder_checkpoint(tmp_path / r / "encoder.pt")["state_dict"] for r in ("a", "b"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # only the unlabelled images (test images excluded, labelled training images never by default)
    images = json.loads((tmp_path / "a" / "images.json").read_text())
    used = {c["case_id"] for part in ("train", "val") for cases in images[part].values() for c in cases}
    assert used == {c.case_id for s in ("site_00", "site_01") for c in load_site(synth_fed / s).unlabelled_cases}

    with pytest.raises(ValueError, match="another configuration"):
        run_pretraining(_cfg(synth_fed, "train.epochs=3", "images.test=false", "pretrain.mask_ratio=0.5"),
                        tmp_path / "b")
    with pytest.raises(ValueError, match="already holds"):
        run_pretraining(_cfg(synth_fed, "train.epochs=3", "images.test=false", "resume=false"), tmp_path / "b")
    # a finished run: nothing trained, the same encoder exported again
    again = run_pretraining(_cfg(synth_fed, "train.epochs=2", "images.test=false"), tmp_path / "b")
    assert again["epochs"] == 2
    c = read_encoder_checkpoint(tmp_path / "b" / "encoder.pt")["state_dict"]
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_refuses_when_there_is_nothing_to_read(synth_fed, tmp_path):
    cfg = _cfg(synth_fed, "images.unlabelled=false", "images.test=false", "train.epochs=1")
    with pytest.raises(ValueError, match="no image to pretrain on"):
        run_pretraining(cfg, tmp_path / "none")


def test_extra_folders_are_checked_file_by_file(synth_fed, tmp_path):
    folder = tmp_path / "extra"
    folder.mkdir()
    src = sorted((synth_fed / "site_00" / "imagesTs").iterdir())[0]
    shutil.copy(src, folder / "scanA_0000.nii.gz")
    shutil.copy(src, folder / "scanB.nii.gz")  # single channel: any name
    cases = image_folder_cases(folder, num_channels=1)
    assert [c.case_id for c in cases] == ["scanA", "scanB"] and all(c.label_path is None for c in cases)
    (folder / "broken_0000.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DatasetError, match="broken_0000.nii.gz"):
        image_folder_cases(folder, num_channels=1)
    with pytest.raises(DatasetError, match="channel"):
        image_folder_cases(folder, num_channels=2, check=False)
    with pytest.raises(DatasetError, match="does not exist"):
        image_folder_cases(tmp_path / "nope", num_channels=1)


def test_transunet_mae_pretrains_with_an_extra_folder(synth_fed, tmp_path):
    folder = tmp_path / "extra"
    folder.mkdir()
    shutil.copy(sorted((synth_fed / "site_01" / "imagesTr").iterdir())[0], folder / "more_0000.nii.gz")
    cfg = compose_config("pretrain", [
        f"data.root={synth_fed}", *QUIET, "model=transunet3d_small", "pretrain=mae_transunet", "train.epochs=1",
        "model.hidden_size=16", "model.num_layers=1", "model.mlp_dim=32", "model.width_factor=0.0625",
        "model.decoder_channels=[16,8,8,4]", "model.head_channels=16", "pretrain.decoder_hidden_size=16",
        "pretrain.decoder_num_layers=1", "pretrain.decoder_num_heads=2", "pretrain.decoder_mlp_dim=32",
        f"images.extra_dirs=[{folder}]",
    ])
    summary = run_pretraining(cfg, tmp_path / "run")
    assert summary["method"] == "mae_transunet" and summary["num_images"] >= 5
    images = json.loads((tmp_path / "run" / "images.json").read_text())
    assert any(name.startswith("extra00-") for part in images.values() if isinstance(part, dict)
               for name in part)
    keys = read_encoder_checkpoint(tmp_path / "run" / "encoder.pt")["encoder"]["keys"]
    assert keys and all(k.startswith("encoder.") for k in keys)


@pytest.mark.slow
def test_a_given_plan_is_used_as_is_and_cases_carry_no_label(cli_run, synth_fed, tmp_path):
    run_dir, _ = cli_run
    given = json.loads((run_dir / "plan.json").read_text())
    given["target_spacing_mm"] = [1.5, 1.5, 1.5]  # a plan the sites would not produce themselves
    (tmp_path / "plan.json").write_text(json.dumps(given))
    cfg = _cfg(synth_fed, "train.epochs=1", f"plan={tmp_path / 'plan.json'}", "images.train=true")
    run_pretraining(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["target_spacing_mm"] == [1.5, 1.5, 1.5]
    site = load_site(synth_fed / "site_00")
    cases = pretraining_cases(site, unlabelled=True, test=True, train=True)
    assert len(cases) == len(site.cases) and all(c.label_path is None for c in cases)


@pytest.mark.slow
def test_medseg_train_starts_from_the_encoder_and_records_the_key_report(cli_run, synth_fed, tmp_path):
    from medseg_core.train_cli import run_training

    run_dir, _ = cli_run
    path = run_dir / "encoder.pt"
    cfg = compose_config("train", [*TINY_UNET, f"model.pretrained={path}", f"data.root={synth_fed}",
                                   "train.epochs=1", "train.progress=false", "eval.hd95=false"])
    run_training(cfg, tmp_path / "ft")
    history = json.loads((tmp_path / "ft" / "history.json").read_text())
    report = history["pretrained"]
    assert report is not None and report["loaded"] and not report["unexpected"] and not report["mismatched"]
    assert len(report["loaded"]) == len(read_encoder_checkpoint(path)["encoder"]["keys"])
