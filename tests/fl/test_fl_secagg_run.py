"""Federated runs under secure aggregation (``privacy=secagg``): Flower's SecAgg+ in the round loop.

In-process runs (real ServerApp loop, real ClientApp handlers and mods, InProcessGrid): the global model
is the case-weighted FedAvg of the sites' updates up to quantisation; the strategy's aggregation code and
the wire only ever carry the sum; a site that fails mid-protocol is reconstructed and the run goes on;
too many failures stop the run with the reason; incompatible settings are refused before anything runs.
One run goes through ``flwr run`` (Flower's simulation runtime) with the README's command.

Each site's own update is recorded by a mod *inside* ``secure_agg_mod`` (where the site still holds it
in plain), as the reference the secure sum is checked against.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from fl_helpers import make_grid, run_config, run_inprocess, simulated_nodes
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp.strategy import FedAvg

from client import app as client_module
from client.app import client_dp_mod
from client.secure_agg import secure_agg_mod
from medseg_core.checkpoint import load_checkpoint, model_from_checkpoint
from medseg_core.config import load_config
from medseg_core.federation import (
    ARRAYS,
    CONFIG,
    FINGERPRINT_ACTION,
    KEY_SERVER_ROUND,
    METRICS,
    NODE_PARTITION_ID,
    NUM_EXAMPLES,
    TRAIN_LOSS,
    norm_state_keys,
)
from medseg_core.privacy_report import DP_EPSILON
from medseg_core.workflow import build_configured_model
from server.inprocess import InProcessGrid
from server.loop import FederatedRun, FederationStopped
from server.run_files import RunFiles
from server.secure_agg import SecAggSettings, SecureAggregation
from server.strategies import to_numpy

REPO = Path(__file__).resolve().parents[2]
THREE_SITES = "privacy=secagg data.synthetic.n_sites=3 fl.final_test=false"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fl-secagg-cache")


class SpyFedAvg(FedAvg):
    """Flower's FedAvg that keeps every reply its aggregation code is given (``strategy.server._target_``)."""

    received: list[tuple[int, list[Message]]] = []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        SpyFedAvg.received.append((server_round, copy.deepcopy(replies)))
        return super().aggregate_train(server_round, replies)


class WireTap(InProcessGrid):
    """The in-process grid, keeping every reply that reaches the server."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replies: list[Message] = []

    def pull_messages(self, message_ids):
        got = list(super().pull_messages(message_ids))
        self.replies += got
        return got


def recording_app(updates: dict, crash_sites: tuple[int, ...] = ()) -> ClientApp:
    """The project's ClientApp (same handlers, same mods) with a recorder inside ``secure_agg_mod``.

    The recorder keeps ``(round, partition) -> (received weights, trained weights, num-examples)`` and
    makes the sites in ``crash_sites`` raise in round 1's training, i.e. after they shared their keys.
    """

    def recorder(msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        r, site = int(msg.content[CONFIG][KEY_SERVER_ROUND]), int(context.node_config[NODE_PARTITION_ID])
        if r == 1 and site in crash_sites:
            raise RuntimeError("simulated crash in the train handler, after the key exchange")
        reply = call_next(msg, context)
        n = int(reply.content[METRICS][NUM_EXAMPLES])
        updates[(r, site)] = (to_numpy(msg.content[ARRAYS]), to_numpy(reply.content[ARRAYS]), n)
        return reply

    app = ClientApp(mods=[secure_agg_mod, recorder, client_dp_mod])
    app.query(FINGERPRINT_ACTION)(client_module.fingerprint)
    app.train()(client_module.train)
    app.evaluate()(client_module.evaluate)
    return app


def _global(run_dir: Path, r: int) -> dict[str, np.ndarray]:
    return {
        k: v.numpy() for k, v in load_checkpoint(RunFiles(run_dir).round_checkpoint(r))["state_dict"].items()
    }


def _fedavg(updates: dict, r: int, sites) -> dict[str, np.ndarray]:
    """``x + sum_i n_i (y_i - x) / sum_i n_i`` in float64, from the sites' own records."""
    x = updates[(r, sites[0])][0]
    total = sum(updates[(r, s)][2] for s in sites)
    return {
        k: x[k].astype(np.float64)
        + sum(updates[(r, s)][2] * (updates[(r, s)][1][k].astype(np.float64) - x[k]) for s in sites) / total
        for k in x
    }


def _tolerance(summary: dict, weights: list[int]) -> float:
    """Largest error of the unmasked mean: each site's weighted update is rounded (stochastically) to a
    step of ``2 C / Q``; the sum of ``n`` such errors is divided by the total weight ratio
    ``R = sum(w_i) / max_weight``; plus 1e-6 for float32 rounding of the stored weights."""
    step = 2 * summary["clipping_range"] / summary["quantization_range"]
    ratio = sum(weights) / summary["max_weight"]
    return len(weights) * step / ratio + 1e-6


def test_secure_sum_is_the_fedavg_of_the_updates_and_no_single_update_reaches_the_server(cache, tmp_path):
    run_dir, updates = tmp_path / "run", {}
    SpyFedAvg.received = []
    rc = run_config(cache, run_dir, f"{THREE_SITES} strategy.server._target_={__name__}.SpyFedAvg")
    grid = WireTap([recording_app(updates)] * 3, simulated_nodes(3), run_config=rc)
    history = FederatedRun(grid, load_config(rc), say=lambda line: None).run()

    assert history["status"] == "completed" and len(history["rounds"]) == 2
    on_disk = json.loads(RunFiles(run_dir).history.read_text())
    assert on_disk["privacy"]["secagg"]["reconstruction_threshold"] == 0.67  # the settings
    rounds = on_disk["privacy"]["secagg_rounds"]
    assert [s["round"] for s in rounds] == [1, 2]
    for summary in rounds:
        assert (
            summary["sampled"] == summary["in_sum"] == 3
            and summary["dropped"] == []
            and summary["halted"] is None
        )
        assert summary["sites_in_sum"] == ["site_00", "site_01", "site_02"]
        assert (summary["num_shares"], summary["reconstruction_threshold"]) == (3, 2)
        assert summary["max_weight"] == max(e["num_train_cases"] for e in on_disk["enrollment"].values())
    assert "Secure aggregation (SecAgg+)" in RunFiles(run_dir).report.read_text()

    assert [r for r, _ in SpyFedAvg.received] == [1, 2]
    for r, replies in SpyFedAvg.received:
        summary = rounds[r - 1]
        weights = [updates[(r, s)][2] for s in range(3)]
        tol = _tolerance(summary, weights)
        # 1. the global model is the case-weighted FedAvg of the sites' updates, up to quantisation
        expected, got = _fedavg(updates, r, [0, 1, 2]), _global(run_dir, r)
        assert max(float(np.max(np.abs(got[k] - expected[k]))) for k in expected) <= tol
        # 2. the aggregation code got one reply per site, each with the aggregate and the site's own metrics ...
        assert len(replies) == 3
        arrays = [to_numpy(m.content[ARRAYS]) for m in replies]
        for a in arrays:
            assert max(float(np.max(np.abs(a[k] - expected[k]))) for k in expected) <= tol
            assert all(np.array_equal(a[k], arrays[0][k]) for k in a)
        losses = sorted(float(m.content[METRICS][TRAIN_LOSS]) for m in replies)
        assert losses == sorted(
            history["rounds"][r - 1]["train"][s][TRAIN_LOSS] for s in ("site_00", "site_01", "site_02")
        )
        # ... and never a site's update: each site's weights are far from what the strategy saw
        for s in range(3):
            own = updates[(r, s)][1]
            assert max(float(np.max(np.abs(arrays[0][k] - own[k]))) for k in own) > 10 * tol
    # 3. on the wire: no reply to the server carries weights (masked vectors are integers in a config record)
    assert grid.replies
    for reply in grid.replies:
        assert reply.has_error() or all(len(rec) == 0 for rec in reply.content.array_records.values())


def test_a_site_failing_mid_protocol_is_reconstructed_and_the_run_goes_on(cache, tmp_path):
    run_dir, updates = tmp_path / "run", {}
    rc = run_config(cache, run_dir, THREE_SITES)
    history = run_inprocess(rc, [recording_app(updates, crash_sites=(2,))] * 3)

    assert history["status"] == "completed" and len(history["rounds"]) == 2
    first, second = json.loads(RunFiles(run_dir).history.read_text())["privacy"]["secagg_rounds"]
    assert first["in_sum"] == 2 and first["sites_in_sum"] == ["site_00", "site_01"]
    (dropped,) = first["dropped"]
    assert dropped["site"] == "site_02" and dropped["stage"] == "collect_masked_vectors"
    assert "simulated crash" in dropped["reason"]
    (fault,) = history["rounds"][0]["faults"]
    assert fault["site"] == "site_02" and fault["kind"] == "error" and fault["phase"] == "train"
    assert set(history["rounds"][0]["train"]) == {"site_00", "site_01"}
    # the dropped site's pairwise masks were removed from its neighbours' vectors: the sum is exactly theirs
    tol = _tolerance(first, [updates[(1, s)][2] for s in (0, 1)])
    expected, got = _fedavg(updates, 1, [0, 1]), _global(run_dir, 1)
    assert max(float(np.max(np.abs(got[k] - expected[k]))) for k in expected) <= tol
    assert second["in_sum"] == 3 and second["dropped"] == []  # back in the next round
    assert (
        "round 1: 2 of 3 site(s) in the secure sum; dropped: site_02" in RunFiles(run_dir).report.read_text()
    )


def test_a_site_failing_after_its_masked_vector_arrived_stays_in_the_sum(cache, tmp_path):
    updates, app = {}, None

    def fails_to_unmask(msg: Message, context: Context) -> Message:
        stage = msg.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
        if stage == Stage.UNMASK and context.node_config[NODE_PARTITION_ID] == 1:
            raise RuntimeError("simulated crash before the unmask stage")
        return app(msg, context)

    app = recording_app(updates)
    run_dir = tmp_path / "run"
    history = run_inprocess(
        run_config(cache, run_dir, f"{THREE_SITES} fl.num_rounds=1"), [fails_to_unmask] * 3
    )
    (summary,) = history["privacy"]["secagg_rounds"]
    assert summary["in_sum"] == 3 and summary["dropped"] == [] and history["rounds"][0]["faults"] == []
    (late,) = summary["failed_after_masking"]
    assert late["site"] == "site_01" and late["stage"] == "unmask"
    tol = _tolerance(summary, [updates[(1, s)][2] for s in range(3)])
    expected, got = _fedavg(updates, 1, [0, 1, 2]), _global(run_dir, 1)
    assert max(float(np.max(np.abs(got[k] - expected[k]))) for k in expected) <= tol


def test_too_many_dropouts_stop_the_run_with_the_reason(cache, tmp_path):
    run_dir, lines = tmp_path / "run", []
    rc = run_config(cache, run_dir, f"{THREE_SITES} fl.num_rounds=1")
    run = FederatedRun(
        make_grid(rc, [recording_app({}, crash_sites=(0, 1))] * 3), load_config(rc), say=lines.append
    )
    with pytest.raises(FederationStopped, match=r"round 1: only 0 of 3 site\(s\) gave a usable train reply"):
        run.run()
    history = json.loads(RunFiles(run_dir).history.read_text())
    assert history["status"] == "stopped"
    (summary,) = history["privacy"]["secagg_rounds"]
    assert summary["in_sum"] == 0 and len(summary["dropped"]) == 2
    assert "halted at stage 'collect_masked_vectors'" in summary["halted"]
    assert any("site_02" in line and "reconstruction threshold" in line for line in lines)


def test_secagg_combines_with_sample_level_and_client_level_dp(cache, tmp_path):
    """Per-site DP figures are metrics: not masked, they reach the server through Flower's FitRes."""
    extra = (
        "privacy=[dp,secagg,client_dp_fixed] privacy.noise_multiplier=1.0 privacy.delta=0.05 privacy.seed=0 "
        "privacy.client_dp.noise_multiplier=0.0 privacy.client_dp.accountant=null "
        "fl.num_rounds=1 fl.final_test=false"
    )
    history = run_inprocess(run_config(cache, tmp_path / "run", extra))
    assert history["status"] == "completed"
    for site in ("site_00", "site_01"):
        assert history["rounds"][0]["train"][site][DP_EPSILON] > 0
    (summary,) = history["privacy"]["secagg_rounds"]
    assert summary["in_sum"] == 2 and summary["max_weight"] == 1.0  # client-level DP: every site weighs 1
    assert (
        history["privacy"]["client_level_rounds"][0]["wrapper"]
        == "DifferentialPrivacyClientSideFixedClipping"
    )


def test_fedbn_norms_stay_out_of_the_secure_sum(cache, tmp_path):
    run_dir = tmp_path / "fedbn"
    extra = "privacy=secagg strategy=fedbn fl.num_rounds=1 fl.final_test=false"
    history = run_inprocess(run_config(cache, run_dir, extra))
    assert history["status"] == "completed" and history["privacy"]["secagg_rounds"][0]["in_sum"] == 2
    payload = load_checkpoint(RunFiles(run_dir).round_checkpoint(1))
    torch.manual_seed(int(load_config(run_config(cache, run_dir, extra)).seed))  # the server's initial model
    initial = build_configured_model(payload["model_config"]).state_dict()
    norm = set(norm_state_keys(model_from_checkpoint(payload)))
    changed = {k for k, v in payload["state_dict"].items() if not torch.equal(v, initial[k])}
    assert norm and changed and not changed & norm  # unchanged on the server: each site keeps its own


def test_a_secagg_run_with_a_server_optimiser_resumes(cache, tmp_path):
    """FedAdam's moments are updated from the secure mean and checkpointed; resume goes on under SecAgg+."""
    run_dir, extra = tmp_path / "run", "privacy=secagg strategy=fedadam fl.final_test=false"
    run_inprocess(run_config(cache, run_dir, f"{extra} fl.num_rounds=1"))
    history = run_inprocess(run_config(cache, run_dir, f"{extra} fl.num_rounds=2 fl.resume=true"))
    assert history["status"] == "completed" and history["resumed_at_round"] == [2]
    assert [(s["round"], s["in_sum"]) for s in history["privacy"]["secagg_rounds"]] == [(1, 2), (2, 2)]
    state = load_checkpoint(RunFiles(run_dir).round_checkpoint(2))
    assert state["strategy_state"]["flower"]["m_t"] is not None


@pytest.mark.parametrize(
    "extra,match",
    [
        ("strategy=fedmedian", "median needs every site's update"),
        ("strategy=fedtrimmedavg", "trimmed mean"),
        ("strategy=krum", "Krum"),
        ("strategy=scaffold", "control-variate"),
        ("privacy=[secagg,client_dp_fixed] privacy.client_dp.side=server", "side=client"),
        ("fl.min_train_nodes=1", "min_train_nodes >= 2"),
        ("privacy.secagg.reconstruction_threshold=0.5", "reconstruction_threshold as a fraction must be in"),
        ("privacy.secagg.clipping_range=0", "clipping_range must be > 0"),
        ("privacy.secagg.modulus_range=8388607", "power of 2"),
        ("privacy.secagg.max_weight=-1", "max_weight must be > 0"),
    ],
)
def test_incompatible_settings_are_refused_before_anything_runs(cache, tmp_path, extra, match):
    overrides = extra if extra.startswith("privacy=") else f"privacy=secagg {extra}"
    rc = run_config(cache, tmp_path / "run", overrides)
    with pytest.raises(ValueError, match=re.escape(match)):
        FederatedRun(make_grid(rc, n=2), load_config(rc))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "strategy", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedbn"]
)
def test_weighted_mean_strategies_are_accepted(cache, strategy):
    cfg = load_config(run_config(cache, None, f"privacy=secagg strategy={strategy}"))
    secure = SecureAggregation.from_config(cfg)
    assert secure is not None and secure.settings == SecAggSettings.from_config(cfg)
    assert secure.max_weight({"a": 5, "b": 7}) == 7.0  # null: the largest site's training cases
    assert SecureAggregation.from_config(load_config(run_config(cache, None, f"strategy={strategy}"))) is None


def test_a_site_refuses_a_plain_training_message_when_secagg_is_configured(cache):
    """The site never sends an unmasked update, whatever the server sends."""
    rc = run_config(cache, None, "privacy=secagg")
    context = Context(
        run_id=1, node_id=5, node_config=simulated_nodes(2)[0], state=RecordDict(), run_config=rc
    )
    msg = Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
    with pytest.raises(ValueError, match="refusing to send an unmasked model update"):
        secure_agg_mod(msg, context, lambda m, c: pytest.fail("the handler must not run"))


def _readme_secagg_command() -> list[str]:
    """The README's `flwr run` command with ``privacy=[secagg`` (continuation lines joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    commands = [b.replace("\\\n", " ").strip() for b in blocks if "privacy=[secagg" in b]
    assert len(commands) == 1, commands
    return shlex.split(commands[0])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flwr") is None, reason="Flower CLI not installed")
def test_readme_secagg_command_runs_in_flowers_simulation(flwr_env, tmp_path):
    cmd = _readme_secagg_command()
    assert cmd[:3] == ["flwr", "run", "."]
    cmd[2] = str(REPO)
    proc = subprocess.run(cmd, cwd=tmp_path, env=flwr_env, capture_output=True, text=True, timeout=420)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "round 0: 3 site(s) enrolled" in out and "done: best round" in out, out[-5000:]
    (run_dir,) = sorted((tmp_path / "runs").glob("fl-*"))
    history = json.loads(RunFiles(run_dir).history.read_text())
    assert history["status"] == "completed"
    rounds = history["privacy"]["secagg_rounds"]
    assert [(s["round"], s["in_sum"], s["dropped"]) for s in rounds] == [(1, 3, []), (2, 3, [])]
    assert len(history["privacy"]["client_level_rounds"]) == 2
