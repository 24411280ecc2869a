"""``medseg-data`` subcommands run in-process: synth, validate, preview, fingerprint, plan."""

from __future__ import annotations

import json

from medseg_core.data.cli import main


def test_synth_then_validate(tmp_path, capsys):
    out = tmp_path / "fed"
    rc = main(["synth", "--out", out, "--sites", "2", "--cases-per-site", "2", "--seed", "1",
               "--shape", "24", "24", "16", "--test", "1", "--unlabelled", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "site_00: CT" in captured.out and "site_01: MR" in captured.out
    assert "8/8" in captured.err  # progress bar on stderr: 2 sites x (2 train + 1 test + 1 unlabelled)
    assert sorted(p.name for p in (out / "site_01" / "imagesTr").iterdir()) == [
        "site_01_tr000_0000.nii.gz", "site_01_tr001_0000.nii.gz", "site_01_ul000_0000.nii.gz"]
    assert main(["validate", out]) == 0


def test_synth_bad_arguments_exit_cleanly(tmp_path, capsys):
    assert main(["synth", "--out", tmp_path / "f", "--sites", "0", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "n_sites must be an integer >= 1, got 0" in err and "Traceback" not in err
    assert main(["synth", "--out", tmp_path / "f", "--shape", "32", "32"]) == 2  # argparse usage error
    assert "--shape" in capsys.readouterr().err


def test_synth_refuses_non_empty_output(synth_fed, capsys):
    assert main(["synth", "--out", synth_fed, "--no-progress"]) == 1
    assert "already exists and is not an empty folder" in capsys.readouterr().err


def test_usage_errors_return_2(capsys):
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["--help"]) == 0
    assert "validate" in capsys.readouterr().out


def test_preview_writes_png(synth_fed, tmp_path, capsys):
    png = tmp_path / "out" / "preview.png"
    assert main(["preview", synth_fed, "--out", png, "--dpi", "40"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in capsys.readouterr().out


def test_preview_of_folder_without_sites_fails_cleanly(tmp_path, capsys):
    assert main(["preview", tmp_path, "--out", tmp_path / "p.png"]) == 1
    err = capsys.readouterr().err
    assert "no site folder" in err and "Traceback" not in err
    assert not (tmp_path / "p.png").exists()


def test_fingerprint_and_plan(synth_fed, tmp_path, capsys):
    fp_file, plan_file = tmp_path / "fp.json", tmp_path / "plan.json"
    assert main(["fingerprint", synth_fed, "--out", fp_file, "--plan", plan_file]) == 0
    fps = json.loads(fp_file.read_text())
    assert sorted(fps) == ["site_00", "site_01"]
    assert all(fp["kind"] == "fingerprint" and fp["num_cases"] == 4 for fp in fps.values())
    plan = json.loads(plan_file.read_text())
    assert plan["kind"] == "plan"

    # One site gives a bare fingerprint; 'plan' merges files of either form into the same plan.
    site_fp = tmp_path / "site_00.json"
    assert main(["fingerprint", synth_fed / "site_00", "--out", site_fp]) == 0
    assert json.loads(site_fp.read_text())["sites"] == ["site_00"]
    single = tmp_path / "site_01.json"
    single.write_text(json.dumps(fps["site_01"]))
    plan2 = tmp_path / "plan2.json"
    assert main(["plan", site_fp, single, "--out", plan2]) == 0
    assert json.loads(plan2.read_text()) == plan
    assert "['site_00', 'site_01']" in capsys.readouterr().out


def test_fingerprint_refuses_invalid_data(synth_fed, tmp_path, capsys):
    import shutil

    site = shutil.copytree(synth_fed / "site_00", tmp_path / "site_00")
    bad = site / "labelsTr" / "site_00_tr001.nii.gz"
    bad.write_bytes(b"not a label")
    assert main(["fingerprint", site, "--out", tmp_path / "fp.json"]) == 1
    captured = capsys.readouterr()
    assert str(bad) in captured.out and "cannot be read" in captured.out
    assert not (tmp_path / "fp.json").exists()


def test_plan_rejects_files_that_are_not_fingerprints(tmp_path, capsys):
    junk = tmp_path / "junk.json"
    junk.write_text(json.dumps({"hello": 1}))
    assert main(["plan", junk, "--out", tmp_path / "plan.json"]) == 1
    assert f"{junk}: neither a fingerprint" in capsys.readouterr().err
    assert main(["plan", tmp_path / "missing.json", "--out", tmp_path / "plan.json"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "plan.json").exists()
