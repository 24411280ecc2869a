"""Whole federated runs in this process: real ServerApp loop, real ClientApp, InProcessGrid (no Ray).

Covers the run directory, num-examples = training cases, FedBN / SCAFFOLD state at the sites, faults
(a site that raises, times out, returns NaN or wrongly shaped weights), the stop when too few sites
reply, and resume.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from fl_helpers import make_grid, run_config, run_inprocess
from flwr.app import Context, Message

from client.app import app as client_app
from medseg_core.checkpoint import load_checkpoint, model_from_checkpoint
from medseg_core.config import load_config
from medseg_core.data.dataset import load_site, site_dirs
from medseg_core.data.loaders import split_train_val
from medseg_core.data.source import ensure_data_root
from medseg_core.federation import (
    ARRAYS,
    DICE,
    NUM_EXAMPLES,
    ORIGINAL_GRID,
    SCAFFOLD_DELTA_CONTROL,
    SITE_MODEL,
    norm_state_keys,
)
from medseg_core.predict import main as predict_main
from server.loop import FederatedRun, FederationStopped
from server.run_files import RunFiles, run_name_for
from server.strategies import to_numpy, to_record


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fl-cache")


def _site_dir(cache, site: str):
    return ensure_data_root(load_config(run_config(cache)).data) / site


def _final_arrays(run_dir, rounds):
    return {
        k: v.numpy()
        for k, v in load_checkpoint(RunFiles(run_dir).round_checkpoint(rounds))["state_dict"].items()
    }


def test_run_writes_the_run_directory_and_weighs_by_training_cases(cache, tmp_path):
    run_dir = tmp_path / "run"
    history = run_inprocess(run_config(cache, run_dir))
    files = RunFiles(run_dir)
    for path in (
        files.resolved_config,
        files.plan,
        files.fingerprints,
        files.best,
        files.history,
        files.test_metrics,
        files.dice_plot,
        files.loss_plot,
        files.report,
        files.round_checkpoint(1),
        files.round_checkpoint(2),
    ):
        assert path.is_file() and path.stat().st_size > 0, path
    assert history["status"] == "completed" and len(history["rounds"]) == 2
    on_disk = json.loads(files.history.read_text())
    assert on_disk["sites"] == ["site_00", "site_01"] and on_disk["best"]["round"] in (1, 2)
    # num-examples is the number of training cases of each site (after the validation split), not batches
    cfg = load_config(run_config(cache))
    for site_dir in site_dirs(ensure_data_root(cfg.data)):
        train, _val = split_train_val(
            load_site(site_dir).train_cases, float(cfg.data.val_fraction), int(cfg.data.split_seed)
        )
        assert history["rounds"][0]["train"][site_dir.name][NUM_EXAMPLES] == len(train)
    for entry in history["rounds"]:
        assert set(entry["evaluate"]) == {"site_00", "site_01"}
        assert 0.0 <= entry["evaluate_aggregate"][DICE] <= 1.0
    assert set(history["test"]["sites"]) == {"site_00", "site_01"}
    # per-round per-site Dice on the console
    round_lines = [line for line in history["_lines"] if line.startswith("round 1/2")]
    assert round_lines and "site_00" in round_lines[0] and "site_01" in round_lines[0]
    # the plan holds no case id or voxel: only aggregates
    plan_text = files.plan.read_text() + files.fingerprints.read_text()
    assert "tr000" not in plan_text and "site_00_" not in plan_text
    # the best checkpoint is self-describing (medseg-predict can rebuild the network)
    model = model_from_checkpoint(load_checkpoint(files.best))
    assert sum(p.numel() for p in model.parameters()) > 0
    report = files.report.read_text()
    assert "completed" in report and "Dice, scan grid" in report
    for site, metrics in history["test"]["sites"].items():  # also scored on each scan's own grid
        assert 0.0 <= metrics[f"{ORIGINAL_GRID}/{DICE}"] <= 1.0, site


def _recording(replies):
    def client(msg: Message, context: Context) -> Message:
        reply = client_app(msg, context)
        if not reply.has_error() and ARRAYS in reply.content.array_records:
            replies.append(reply)
        return reply

    return client


def test_fedbn_normalisation_weights_never_leave_the_sites(cache, tmp_path):
    run_dir = tmp_path / "fedbn"
    replies: list[Message] = []
    rc = run_config(cache, run_dir, "strategy=fedbn")
    history = run_inprocess(rc, [_recording(replies)] * 2)
    assert history["status"] == "completed"
    payload = load_checkpoint(RunFiles(run_dir).best)
    norm = set(norm_state_keys(model_from_checkpoint(payload)))
    assert norm and replies
    for reply in replies:
        assert not norm & set(reply.content[ARRAYS].keys())
    # the server's copy of the norms is still the initial one; each site kept its own, per round
    first, last = _final_arrays(run_dir, 1), _final_arrays(run_dir, 2)
    assert all(np.array_equal(first[k], last[k]) for k in norm)
    assert not all(np.array_equal(first[k], last[k]) for k in set(first) - norm)
    name = run_name_for(run_dir)
    for site in ("site_00", "site_01"):
        state = cache / "site-state" / site / name
        assert sorted(p.name for p in state.glob("local_*.pt")) == ["local_0001.pt", "local_0002.pt"]


def test_scaffold_runs_and_keeps_client_variates_at_the_sites(cache, tmp_path):
    run_dir = tmp_path / "scaffold"
    replies: list[Message] = []
    history = run_inprocess(run_config(cache, run_dir, "strategy=scaffold"), [_recording(replies)] * 2)
    assert history["status"] == "completed"
    assert replies and all(SCAFFOLD_DELTA_CONTROL in r.content.array_records for r in replies)
    for site in ("site_00", "site_01"):
        state = cache / "site-state" / site / run_name_for(run_dir)
        assert [p.name for p in sorted(state.glob("control_*.pt"))] == ["control_0001.pt", "control_0002.pt"]


def _faulty(kind: str):
    """A site that misbehaves in round 1's training."""

    def client(msg: Message, context: Context) -> Message:
        first_train = msg.metadata.message_type == "train" and msg.content["config"]["server-round"] == 1
        if first_train and kind == "raises":
            raise RuntimeError("simulated crash at the site")
        if first_train and kind == "timeout":
            time.sleep(12)  # past fl.round_timeout_s; then give up without training in the background
            raise RuntimeError("too late")
        reply = client_app(msg, context)
        if first_train and kind in ("nan", "shape"):
            arrays = to_numpy(reply.content[ARRAYS])
            key = next(iter(arrays))
            arrays[key] = np.full_like(arrays[key], np.nan) if kind == "nan" else arrays[key].reshape(-1)
            reply.content[ARRAYS] = to_record(arrays)
        return reply

    return client


@pytest.mark.parametrize(
    "kind,expected", [("raises", "error"), ("timeout", "timeout"), ("nan", "invalid"), ("shape", "invalid")]
)
def test_a_faulty_site_is_left_out_of_the_round_and_the_run_continues(cache, tmp_path, kind, expected):
    run_dir = tmp_path / kind
    timeout = "fl.round_timeout_s=8" if kind == "timeout" else ""
    rc = run_config(cache, run_dir, f"data.synthetic.n_sites=3 {timeout}")
    history = run_inprocess(rc, [client_app, client_app, _faulty(kind)])
    assert history["status"] == "completed"
    first, second = history["rounds"]
    assert set(first["train"]) == {"site_00", "site_01"} and set(second["train"]) == {
        "site_00",
        "site_01",
        "site_02",
    }
    faults = [f for f in first["faults"] if f["phase"] == "train"]
    assert len(faults) == 1 and faults[0]["kind"] == expected and faults[0]["round"] == 1
    detail = {"raises": "simulated crash", "timeout": "no reply", "nan": "NaN/Inf", "shape": "shape"}[kind]
    assert detail in faults[0]["detail"]
    assert json.loads(RunFiles(run_dir).history.read_text())["rounds"][0]["faults"][0]["kind"] == expected
    assert all(np.isfinite(v).all() for v in _final_arrays(run_dir, 2).values())


def test_the_run_stops_with_a_clear_message_when_too_few_sites_reply(cache, tmp_path):
    run_dir = tmp_path / "stopped"
    with pytest.raises(
        FederationStopped,
        match=r"only 1 of 2 site\(s\) gave a usable train reply; "
        r"fl.min_train_nodes=2",
    ):
        run_inprocess(run_config(cache, run_dir), [client_app, _faulty("raises")])
    history = json.loads(RunFiles(run_dir).history.read_text())
    assert history["status"] == "stopped" and "min_train_nodes" in history["stop_reason"]
    # the message itself says who was left out and why (a bench or a script may drop the console log),
    # and the unfinished round keeps every fault
    reason = history["stop_reason"]
    assert "Left out: round 1 train: site site_01 (node " in reason and "left out (error): " in reason
    assert "simulated crash" in reason
    stopped = history["stopped_round"]
    assert stopped["round"] == 1 and set(stopped["train"]) == {"site_00"}
    assert [(f["site"], f["kind"]) for f in stopped["faults"]] == [("site_01", "error")]
    assert "stopped" in RunFiles(run_dir).report.read_text()


@pytest.mark.parametrize("strategy", ["fedavg", "fedbn"])
def test_batchnorm_models_federate_and_fedbn_keeps_their_statistics_at_the_sites(cache, tmp_path, strategy):
    # BatchNorm's num_batches_tracked is a 0-d array: it must cross the wire as shape (), not (1,)
    run_dir = tmp_path / f"bn-{strategy}"
    replies: list[Message] = []
    history = run_inprocess(run_config(cache, run_dir, f"strategy={strategy} model.norm=batch"),
                            [_recording(replies)] * 2)
    assert history["status"] == "completed" and not history["faults"]
    assert all(not r["faults"] for r in history["rounds"])
    model = model_from_checkpoint(load_checkpoint(RunFiles(run_dir).best))
    tracked = [k for k in model.state_dict() if k.endswith("num_batches_tracked")]
    assert tracked and all(model.state_dict()[k].shape == () for k in tracked)
    sent = set().union(*(set(r.content[ARRAYS].keys()) for r in replies))
    running = {k for k in model.state_dict() if k.endswith(("running_mean", "running_var"))}
    assert running
    if strategy == "fedbn":
        assert not running & sent  # each site's statistics of its own scanner stay at the site
    else:
        assert running <= sent

    # each site keeps the best model with its own layers, as a checkpoint medseg-predict reads
    server_best = load_checkpoint(RunFiles(run_dir).best)["state_dict"]
    kept = {}
    for site in ("site_00", "site_01"):
        path = cache / "site-state" / site / run_name_for(run_dir) / SITE_MODEL
        payload = load_checkpoint(path)
        assert payload["round_idx"] == history["test"]["round"] and payload["run_name"] == run_name_for(run_dir)
        model_from_checkpoint(payload)  # a complete model (strict load)
        kept[site] = payload["state_dict"]
        local = set(payload["local_keys"])
        assert running <= local if strategy == "fedbn" else not local
        assert all(torch.equal(v, server_best[k]) for k, v in kept[site].items() if k not in local)
        out = tmp_path / f"pred-{strategy}-{site}"
        assert predict_main(["--checkpoint", str(path), "--input", str(_site_dir(cache, site) / "imagesTs"),
                             "--output", str(out), "--reference", str(_site_dir(cache, site) / "labelsTs")]) == 0
        scored = json.loads((out / "metrics.json").read_text())["aggregate"]["mean"]["dice"]
        assert scored == pytest.approx(history["test"]["sites"][site]["dice"], abs=0.02)  # plan's grid
        # the site's final test on its scans' own grids is exactly what its medseg-predict delivers
        assert scored == pytest.approx(history["test"]["sites"][site][f"{ORIGINAL_GRID}/{DICE}"], abs=1e-6)
    same = [torch.equal(kept["site_00"][k], kept["site_01"][k]) for k in sorted(running)]
    if strategy == "fedbn":  # its own scanner's statistics, not the server's (never trained) ones
        assert not any(same)
        assert not any(torch.equal(kept["site_00"][k], server_best[k]) for k in running)
    else:
        assert all(same)


def test_resume_continues_from_the_last_round_and_matches_an_uninterrupted_run(cache, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    # SCAFFOLD's variates and each site's AdamW moments are site state a resumed round must find as
    # they were after the last completed round
    kept = "strategy=scaffold fl.keep_optimizer_state=true"
    run_inprocess(run_config(cache, full, f"{kept} fl.num_rounds=3"))
    run_inprocess(run_config(cache, cut, f"{kept} fl.num_rounds=2"))
    history = run_inprocess(run_config(cache, cut, f"{kept} fl.num_rounds=3 fl.resume=true"))
    assert [e["round"] for e in history["rounds"]] == [1, 2, 3] and history["resumed_at_round"] == [3]
    a, b = _final_arrays(full, 3), _final_arrays(cut, 3)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # a different configuration cannot resume the run; an existing run is not overwritten
    with pytest.raises(FederationStopped, match="cannot resume"):
        run_inprocess(
            run_config(cache, cut, f"{kept} fl.num_rounds=4 fl.resume=true fl.local_epochs=3")
        )
    with pytest.raises(FederationStopped, match="already holds a run"):
        run_inprocess(run_config(cache, cut, kept))
    kept = json.loads(RunFiles(cut).history.read_text())  # the refused attempts did not touch the run
    assert kept["status"] == "completed" and len(kept["rounds"]) == 3
    with pytest.raises(FederationStopped, match="holds no round checkpoint"):
        (tmp_path / "empty").mkdir()
        run_inprocess(run_config(cache, tmp_path / "empty", "fl.resume=true"))


def test_a_site_missing_at_the_start_stops_round_zero(cache, tmp_path):
    rc = run_config(cache, tmp_path / "r0", "fl.connect_timeout_s=1")
    grid = make_grid(rc)
    grid.disconnected.add(grid.node_ids[1])
    with pytest.raises(FederationStopped, match="only 1 site"):
        FederatedRun(grid, load_config(rc), say=lambda s: None).run()


def test_the_final_test_is_scored_with_the_test_overlap(cache, tmp_path):
    """The final test uses ``eval.test_overlap`` (medseg-predict's), not the validation passes' ``eval.overlap``.
    Windows smaller than the volumes, so the overlap changes the figures."""
    from monai.data import DataLoader, Dataset

    from medseg_core.data.transforms import build_transforms
    from medseg_core.engine import evaluate
    from medseg_core.workflow import foreground_classes, roi_size

    run_dir = tmp_path / "overlap"
    history = run_inprocess(run_config(cache, run_dir, "fl.num_rounds=1 eval.overlap=0.25 eval.test_overlap=0.75 "
                                                       "eval.original_grid=false data.planning.max_patch_voxels=4096"))
    differs = False
    for site in ("site_00", "site_01"):
        payload = load_checkpoint(cache / "site-state" / site / run_name_for(run_dir) / SITE_MODEL)
        plan = payload["plan"]
        assert max(roi_size(plan, 3)) < 32  # several windows per volume
        data = load_site(_site_dir(cache, site))
        loader = DataLoader(Dataset([c.as_dict() for c in data.test_cases], build_transforms(
            plan, train=False, modalities=data.channel_names, spatial_dims=3)), batch_size=1)
        model = model_from_checkpoint(payload).eval()
        dice = {ov: evaluate(model, loader, device=torch.device("cpu"), roi_size=roi_size(plan, 3),
                             class_values=foreground_classes(data.labels), overlap=ov, hd95=False)["mean_dice"]
                for ov in (0.25, 0.75)}
        assert history["test"]["sites"][site][DICE] == pytest.approx(dice[0.75], abs=1e-6)
        differs |= abs(dice[0.75] - dice[0.25]) > 1e-6
    assert differs  # else this test could not tell the two overlaps apart
