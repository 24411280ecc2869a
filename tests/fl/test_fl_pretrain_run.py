"""Federated self-supervised pretraining (``experiment=fl_pretrain``) through the real ServerApp loop and ClientApp.

The federation of the in-process runs is tiny and uneven on purpose: ``site_00`` has labels (2 unlabelled +
1 test image to pretrain on), ``site_01`` has *no label file at all* (its 3 training images are unlabelled,
so it pretrains on 6 images and sends no fingerprint). The sites therefore weigh 2 : 5 in FedAvg, and the
run shows that a site without labels enrols. Covered: history / checkpoints / plot / encoder, FedAvg by
images (hand-checked), labels never read while pretraining, the encoder loaded by ``medseg-train``'s
path and by a federated fine-tuning run with clean key reports, faults, resume, refused settings, and a
real ``flwr run`` (slow).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fl_helpers import make_grid, run_config, run_inprocess
from flwr.app import Context, Message

from client.app import app as client_app
from medseg_core.checkpoint import load_checkpoint
from medseg_core.config import compose_config, load_config
from medseg_core.data.synthetic import make_federation
from medseg_core.federation import ARRAYS, EVAL_LOSS, NUM_EXAMPLES, TRAIN_LOSS
from medseg_core.models import build_model
from medseg_core.models.pretrained import load_pretrained_from_config, read_encoder_checkpoint
from medseg_core.workflow import build_configured_model, model_config
from server.loop import FederationStopped
from server.pretrain_loop import ENCODER_FILE, FederatedPretrainRun
from server.run_files import RunFiles, run_name_for
from server.strategies import to_numpy

EXPERIMENT = "fl_pretrain_smoke"
#: fl_smoke's tiny U-Net (what fl_pretrain_smoke pretrains), for the medseg-train side of the transfer
TINY_UNET = ["model.channels=[4,8,16]", "model.strides=[2,2]", "model.num_res_units=1"]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fl-pretrain-cache")


def _uneven_federation(root):
    """Two 32^3 sites; site_01 has no labelsTr/ (only unlabelled training images)."""
    make_federation(root, n_sites=2, cases_per_site=3, seed=0, shape=(32, 32, 32), n_test=1, n_unlabelled=2)
    shutil.rmtree(root / "site_01" / "labelsTr")
    return root


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return _uneven_federation(tmp_path_factory.mktemp("fed-pretrain"))


def _pretrain_rc(cache, fed, run_dir, extra: str = "") -> dict[str, str]:
    return run_config(cache, run_dir, f"data.root={fed} {extra}", experiment=EXPERIMENT)


def _run(rc, clients=None, lines=None) -> dict:
    run = FederatedPretrainRun(
        make_grid(rc, clients, n=2), load_config(rc), say=(lines if lines is not None else []).append
    )
    return run.run()


def _corrupting_recorder(fed, replies: list[tuple[int, Message]]):
    """The real ClientApp; before the first training round site_00's label files are overwritten with
    garbage (validation and the fingerprint read them in round 0); train replies are kept with their round."""

    def client(msg: Message, context: Context) -> Message:
        if msg.metadata.message_type == "train.pretrain":
            for label in (fed / "site_00").glob("labels*/*.nii.gz"):
                label.write_bytes(b"not a NIfTI file")
        reply = client_app(msg, context)
        if not reply.has_error() and ARRAYS in reply.content.array_records:
            replies.append((int(msg.content["config"]["server-round"]), reply))
        return reply

    return client


@pytest.fixture(scope="module")
def pretrained(cache, tmp_path_factory):
    """One 2-round federated pretraining run on its own federation (whose labels it corrupts):
    (federation root, run directory, history, recorded train replies, console lines)."""
    fed = _uneven_federation(tmp_path_factory.mktemp("fed-corrupted"))
    run_dir = tmp_path_factory.mktemp("pretrain-run") / "run"
    replies: list[tuple[int, Message]] = []
    lines: list[str] = []
    history = _run(_pretrain_rc(cache, fed, run_dir), [_corrupting_recorder(fed, replies)] * 2, lines)
    return fed, run_dir, history, replies, lines


def test_run_records_per_site_losses_checkpoints_and_exports_the_encoder(pretrained, cache):
    _fed, run_dir, history, _replies, lines = pretrained
    files = RunFiles(run_dir)
    for path in (
        files.resolved_config,
        files.plan,
        files.history,
        files.loss_plot,
        files.report,
        files.round_checkpoint(1),
        files.round_checkpoint(2),
        run_dir / ENCODER_FILE,
    ):
        assert path.is_file() and path.stat().st_size > 0, path
    assert history["status"] == "completed" and history["kind"] == "pretrain" and len(history["rounds"]) == 2
    # the site without labels enrolled without a fingerprint; the plan comes from site_00's
    assert (
        history["enrollment"]["site_01"]["fingerprint"] is False
        and history["enrollment"]["site_00"]["fingerprint"]
    )
    assert (
        history["enrollment"]["site_00"]["num_images"] == 3
        and history["enrollment"]["site_01"]["num_images"] == 6
    )
    assert list(json.loads(files.fingerprints.read_text())) == ["site_00"]
    for entry in history["rounds"]:
        assert entry["faults"] == []
        # num-examples = training images (after the held-out image), not crops or batches
        assert {s: m[NUM_EXAMPLES] for s, m in entry["train"].items()} == {"site_00": 2, "site_01": 5}
        assert {s: m[NUM_EXAMPLES] for s, m in entry["evaluate"].items()} == {"site_00": 1, "site_01": 1}
        for site in ("site_00", "site_01"):
            assert math.isfinite(entry["train"][site][TRAIN_LOSS]) and entry["train"][site][TRAIN_LOSS] > 0
            assert math.isfinite(entry["evaluate"][site][EVAL_LOSS])
    assert json.loads(files.history.read_text())["rounds"][1]["evaluate"]["site_01"][
        EVAL_LOSS
    ] == pytest.approx(history["rounds"][1]["evaluate"]["site_01"][EVAL_LOSS])
    line = next(ln for ln in lines if ln.startswith("round 2/2"))
    assert "train loss site_00" in line and "site_01" in line and "val loss" in line
    assert any(ln.startswith("done: 2 round(s) of mim pretraining") for ln in lines)
    # the encoder: the final global model's transferable weights, with medseg-pretrain's metadata
    payload = read_encoder_checkpoint(run_dir / ENCODER_FILE)
    meta = payload["encoder"]
    assert (
        meta["model_name"] == "unet"
        and meta["method"] == "mim"
        and meta["config_hash"] == history["config_hash"]
    )
    assert (
        payload["rounds"] == 2 and payload["federated"] is True and payload["sites"] == ["site_00", "site_01"]
    )
    assert payload["num_images"] == {"site_00": 2, "site_01": 5}
    assert (
        payload["plan"] == json.loads(files.plan.read_text())
        and payload["labels"] == payload["plan"]["labels"]
    )
    final = load_checkpoint(files.round_checkpoint(2))
    assert final["kind"] == "pretrain-round"
    for key, value in payload["state_dict"].items():
        np.testing.assert_array_equal(value.numpy(), final["state_dict"][f"net.{key}"].numpy(), err_msg=key)
    # images never leave a site: each draws its own reconstruction into its state folder, the server none
    for site in ("site_00", "site_01"):
        assert (cache / "site-state" / site / run_name_for(run_dir) / "reconstruction.png").is_file()
    assert not list(run_dir.glob("reconstruction*.png"))


def test_the_global_model_is_the_image_weighted_mean_of_the_sites_models(pretrained):
    _fed, run_dir, _history, replies, _lines = pretrained
    round_two = [reply for r, reply in replies if r == 2]
    assert len(replies) == 4 and len(round_two) == 2
    weights = [float(next(iter(r.content.metric_records.values()))[NUM_EXAMPLES]) for r in round_two]
    assert sorted(weights) == [2.0, 5.0]
    arrays = [to_numpy(r.content[ARRAYS]) for r in round_two]
    aggregated = {
        k: v.numpy() for k, v in load_checkpoint(RunFiles(run_dir).round_checkpoint(2))["state_dict"].items()
    }
    key = "net.model.0.conv.unit0.conv.weight"  # the first convolution, by hand
    expected = (
        weights[0] * arrays[0][key].astype(np.float64) + weights[1] * arrays[1][key].astype(np.float64)
    ) / 7.0
    np.testing.assert_allclose(aggregated[key], expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(
        expected, (arrays[0][key] + arrays[1][key]) / 2, rtol=1e-4, atol=1e-6
    )  # not uniform
    assert aggregated.keys() == arrays[0].keys()


def test_pretraining_never_reads_a_label(pretrained):
    """site_00's label files were garbage from the first training round on, site_01 has none: the rounds
    ran anyway, so neither the training nor the evaluation pipeline opens a label file."""
    fed, _run_dir, history, _replies, _lines = pretrained
    labels = list((fed / "site_00").glob("labels*/*.nii.gz"))
    assert labels and all(p.read_bytes() == b"not a NIfTI file" for p in labels)
    assert not (fed / "site_01" / "labelsTr").exists()
    assert all(set(e["train"]) == {"site_00", "site_01"} and not e["faults"] for e in history["rounds"])


def test_medseg_train_loads_the_encoder_with_a_clean_key_report(pretrained):
    _fed, run_dir, _history, _replies, _lines = pretrained
    path = run_dir / ENCODER_FILE
    encoder = read_encoder_checkpoint(path)["state_dict"]
    # what medseg-train does with model.pretrained=PATH (train_cli.run_training)
    cfg = compose_config("train", [*TINY_UNET, f"model.pretrained={path}"])
    kwargs = model_config(cfg.model, in_channels=1, out_channels=3)
    model = build_configured_model(kwargs)
    report = load_pretrained_from_config(model, cfg.model, model_config=kwargs, log=None)
    assert report is not None and report.clean and report.applied
    assert sorted(report.loaded) == sorted(encoder) and not report.missing and not report.unexpected
    assert report.initialised  # the output head, which depends on the number of classes
    state = model.state_dict()
    for key, value in encoder.items():
        np.testing.assert_array_equal(state[key].numpy(), value.numpy(), err_msg=key)
    # and through the registry's build_model(..., pretrained=PATH)
    name = kwargs.pop("name")
    built = build_model(name, **kwargs, pretrained=str(path)).state_dict()
    assert all(np.array_equal(built[k].numpy(), v.numpy()) for k, v in encoder.items())


def test_federated_fine_tuning_starts_from_the_encoder_and_reports_the_keys(pretrained, cache, tmp_path):
    _fed, run_dir, _history, _replies, _lines = pretrained
    path = run_dir / ENCODER_FILE
    encoder = read_encoder_checkpoint(path)["state_dict"]
    sent: list[dict[str, np.ndarray]] = []

    def client(msg: Message, context: Context) -> Message:
        if msg.metadata.message_type == "train":
            sent.append(to_numpy(msg.content[ARRAYS]))
        return client_app(msg, context)

    lines: list[str] = []
    rc = run_config(cache, tmp_path / "ft", f"model.pretrained={path} fl.num_rounds=1 fl.final_test=false")
    history = run_inprocess(rc, [client, client], say=lines.append)
    assert history["status"] == "completed"
    report = history["pretrained"]
    assert report["clean"] and report["applied"] and report["path"] == str(path)
    assert (
        sorted(report["loaded"]) == sorted(encoder) and report["missing"] == [] and report["unexpected"] == []
    )
    assert (
        json.loads(RunFiles(tmp_path / "ft").history.read_text())["pretrained"]["loaded"] == report["loaded"]
    )
    assert any(f"loaded {len(encoder)} key(s), missing 0, unexpected 0" in ln for ln in lines), lines
    # round 1's global model, as the sites received it, holds the encoder's weights
    assert len(sent) == 2
    for key, value in encoder.items():
        np.testing.assert_array_equal(sent[0][key], value.numpy(), err_msg=key)


def _failing_in_round_one(msg: Message, context: Context) -> Message:
    if msg.metadata.message_type == "train.pretrain" and msg.content["config"]["server-round"] == 1:
        raise RuntimeError("simulated crash at the site")
    return client_app(msg, context)


def test_a_failing_site_is_left_out_of_the_round_and_logged(cache, fed, tmp_path):
    rc = _pretrain_rc(cache, fed, tmp_path / "fault", "fl.min_train_nodes=1 fl.min_evaluate_nodes=1")
    lines: list[str] = []
    history = _run(rc, [client_app, _failing_in_round_one], lines)
    first, second = history["rounds"]
    assert set(first["train"]) == {"site_00"} and set(second["train"]) == {"site_00", "site_01"}
    fault = first["faults"][0]
    assert fault["kind"] == "error" and fault["site"] == "site_01" and "simulated crash" in fault["detail"]
    assert any("left out (error)" in ln for ln in lines)
    assert history["status"] == "completed" and (tmp_path / "fault" / ENCODER_FILE).is_file()


def test_resume_continues_from_the_last_round_and_matches_an_uninterrupted_run(cache, fed, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run(_pretrain_rc(cache, fed, full))
    _run(_pretrain_rc(cache, fed, cut, "fl.num_rounds=1"))
    history = _run(_pretrain_rc(cache, fed, cut, "fl.resume=true"))
    assert [e["round"] for e in history["rounds"]] == [1, 2] and history["resumed_at_round"] == [2]
    # each site's optimiser state is site state too: kept per round, found by the resumed round
    kept = sorted(p.name for p in (cache / "site-state" / "site_00" / history["run_name"]).glob("optim_*.pt"))
    assert kept == ["optim_0001.pt", "optim_0002.pt"]
    a = read_encoder_checkpoint(full / ENCODER_FILE)["state_dict"]
    b = read_encoder_checkpoint(cut / ENCODER_FILE)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)
    with pytest.raises(FederationStopped, match="already holds a run"):
        _run(_pretrain_rc(cache, fed, cut))


@pytest.mark.parametrize(
    "extra,match",
    [
        ("strategy=fedprox", "strategy=fedprox needs site-side terms"),
        ("strategy=scaffold", "strategy=scaffold needs site-side terms"),
        ("privacy=dp", "without privacy options"),
        ("images.extra_dirs=[/data/more]", "images.extra_dirs"),
    ],
)
def test_settings_the_pretraining_round_cannot_honour_are_refused(cache, fed, tmp_path, extra, match):
    rc = _pretrain_rc(cache, fed, tmp_path / "refused", extra)
    with pytest.raises(ValueError, match=match):
        FederatedPretrainRun(make_grid(rc, n=2), load_config(rc))
    rc = run_config(cache, tmp_path / "plain")  # fl_smoke: fine-tuning, no pretrain group
    with pytest.raises(ValueError, match="experiment=fl_pretrain"):
        FederatedPretrainRun(make_grid(rc, n=2), load_config(rc))


def test_without_labels_anywhere_the_run_asks_for_a_plan_and_uses_a_given_one(pretrained, cache, tmp_path):
    root = tmp_path / "unlabelled"
    make_federation(root, n_sites=2, cases_per_site=2, seed=1, shape=(32, 32, 32), n_test=0, n_unlabelled=1)
    for site in ("site_00", "site_01"):
        shutil.rmtree(root / site / "labelsTr")
    with pytest.raises(FederationStopped, match="set plan=PATH"):
        _run(_pretrain_rc(cache, root, tmp_path / "noplan"))
    assert json.loads(RunFiles(tmp_path / "noplan").history.read_text())["status"] == "stopped"
    # with a plan.json (here the other run's) the same sites enrol without fingerprints and pretrain with it
    plan = RunFiles(pretrained[1]).plan
    history = _run(_pretrain_rc(cache, root, tmp_path / "withplan", f"plan={plan}"))
    assert history["status"] == "completed" and not any(
        e["fingerprint"] for e in history["enrollment"].values()
    )
    assert json.loads(RunFiles(tmp_path / "withplan").plan.read_text()) == json.loads(plan.read_text())
    assert not RunFiles(tmp_path / "withplan").fingerprints.exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flwr") is None, reason="Flower CLI not installed")
def test_flwr_run_pretrains_and_exports_an_encoder_medseg_train_loads(flwr_env, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        "flwr",
        "run",
        str(REPO),
        "--stream",
        "--run-config",
        f"experiment='{EXPERIMENT}' overrides='paths.run_dir={run_dir}'",
        "--federation-config",
        "num-supernodes=2 client-resources-num-cpus=1",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=flwr_env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "round 0: 2 site(s) enrolled for pretraining" in out, out
    for r in (1, 2):
        line = next((ln for ln in out.splitlines() if f"round {r}/2" in ln), "")
        assert "train loss site_00" in line and "val loss site_00" in line and "site_01" in line, out
    assert "encoder (" in out and "done: 2 round(s) of mim pretraining" in out, out
    history = json.loads(RunFiles(run_dir).history.read_text())
    assert history["status"] == "completed" and history["encoder"]["path"] == str(run_dir / ENCODER_FILE)
    path = run_dir / ENCODER_FILE
    cfg = compose_config("train", [*TINY_UNET, f"model.pretrained={path}"])
    kwargs = model_config(cfg.model, in_channels=1, out_channels=3)
    report = load_pretrained_from_config(
        build_configured_model(kwargs), cfg.model, model_config=kwargs, log=None
    )
    assert report.clean and len(report.loaded) == len(read_encoder_checkpoint(path)["encoder"]["keys"])
