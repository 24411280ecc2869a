"""Private federated runs in this process (real ServerApp loop, real ClientApp, InProcessGrid).

Sample-level DP (``privacy=dp``): epsilon per site per round in ``history.json`` grows and carries
over a restart (the ledger on disk, not the server, keeps the spent budget); a site whose budget is
reached declines the round and the run goes on with the others, or stops with a clear message when
too few sites remain.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from fl_helpers import run_config, run_inprocess

from client.privacy import PrivacyLedger, compute_epsilon, ledger_path
from medseg_core.checkpoint import load_checkpoint
from medseg_core.federation import NUM_STEPS, TRAIN_LOSS
from medseg_core.privacy_report import (
    BUDGET_DECLINED,
    DP_EPSILON,
    DP_EPSILON_BUDGET,
    DP_EPSILON_PRV,
    DP_EPSILON_RDP_CLASSIC,
    DP_NOISE_MULTIPLIER,
    DP_SAMPLE_RATE,
    DP_STEPS_ROUND,
    DP_STEPS_TOTAL,
    is_privacy_metric,
)
from server.loop import FederationStopped
from server.run_files import RunFiles, run_name_for

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Using a non-full backward hook:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
]

SIGMA = 1.0
DELTA = 0.05  # fl_smoke: 2 training cases per site, delta must stay below 1/2
#: fixed sigma, one Poisson step per round (2 cases, batch 2: q = 1); the seed is for the test only
DP = f"privacy=dp privacy.noise_multiplier={SIGMA} privacy.delta={DELTA} privacy.seed=0 fl.final_test=false"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fl-dp-cache")


def _eps(steps: int) -> float:
    return compute_epsilon([(SIGMA, 1.0, steps)], DELTA, "rdp") if steps else 0.0


def test_epsilon_grows_per_site_and_round_and_survives_a_restart(cache, tmp_path):
    run_dir, state = tmp_path / "run", tmp_path / "state"
    extra = f"{DP} privacy.epsilon=null fl.state_dir={state}"
    first = run_inprocess(run_config(cache, run_dir, f"{extra} fl.num_rounds=1"))
    assert first["status"] == "completed" and first["privacy"]["mode"] == "dp"
    # the server restarts and continues the run: the sites' ledgers (not the server) hold what was spent
    history = run_inprocess(run_config(cache, run_dir, f"{extra} fl.num_rounds=2 fl.resume=true"))
    assert history["resumed_at_round"] == [2]
    on_disk = json.loads(RunFiles(run_dir).history.read_text())
    for site in ("site_00", "site_01"):
        r1, r2 = (e["train"][site] for e in on_disk["rounds"])
        assert r1[DP_STEPS_ROUND] == r2[DP_STEPS_ROUND] == 1 and r1[NUM_STEPS] == 1
        assert (r1[DP_STEPS_TOTAL], r2[DP_STEPS_TOTAL]) == (1, 2)
        assert r1[DP_NOISE_MULTIPLIER] == SIGMA and r1[DP_SAMPLE_RATE] == 1.0
        assert 0 < r1[DP_EPSILON] < r2[DP_EPSILON]
        assert r1[DP_EPSILON] == pytest.approx(_eps(1)) and r2[DP_EPSILON] == pytest.approx(_eps(2))
        assert r2[DP_EPSILON_PRV] < r2[DP_EPSILON] < r2[DP_EPSILON_RDP_CLASSIC]  # every conversion reported
        assert DP_EPSILON_BUDGET not in r2 and TRAIN_LOSS not in r2  # no budget; the loss is not released
        # simulation: ledger_scope auto keeps one ledger per run, in the site's state folder
        ledger = PrivacyLedger.open(ledger_path(state / site, run_name_for(run_dir), "run"))
        assert [r["round"] for r in ledger.rounds] == [1, 2] and ledger.delta == DELTA
    for entry in on_disk["rounds"]:  # per-site figures are never averaged over sites
        assert not any(is_privacy_metric(k) for k in entry["train_aggregate"])
    files = RunFiles(run_dir)
    assert files.epsilon_plot.read_bytes()[:4] == b"\x89PNG"
    report = files.report.read_text()
    assert "## Privacy" in report and "Not covered by epsilon" in report


def _spent_before(state, site: str, steps: int) -> None:
    """A site whose lifetime ledger already holds ``steps`` steps from an earlier study."""
    ledger = PrivacyLedger.open(ledger_path(state / site, "earlier-study", "site"), site=site)
    ledger.resolve_delta(DELTA, num_cases=2)
    for r in range(1, steps + 1):
        ledger.record_round("earlier-study", r, noise_multiplier=SIGMA, sample_rate=1.0, steps=1, max_grad_norm=1.0,
                            num_cases=2)


def test_a_site_at_its_budget_declines_and_the_run_finishes_with_the_others(cache, tmp_path):
    run_dir, state = tmp_path / "run", tmp_path / "state"
    _spent_before(state, "site_01", 1)
    budget = (_eps(2) + _eps(3)) / 2  # site_00 affords 2 rounds; site_01 (1 step spent before) only 1
    extra = f"{DP} privacy.epsilon={budget} privacy.ledger_scope=site fl.state_dir={state} fl.min_train_nodes=1"
    history = run_inprocess(run_config(cache, run_dir, f"{extra} fl.num_rounds=2"))
    assert history["status"] == "completed" and len(history["rounds"]) == 2
    first, second = history["rounds"]
    assert set(first["train"]) == {"site_00", "site_01"} and set(second["train"]) == {"site_00"}
    assert first["train"]["site_01"][DP_EPSILON] == pytest.approx(_eps(2))  # lifetime: the earlier study counts
    assert second["train"]["site_00"][DP_EPSILON] == pytest.approx(_eps(2)) and _eps(2) <= budget
    assert first["train"]["site_00"][DP_EPSILON_BUDGET] == pytest.approx(budget)
    (fault,) = [f for f in second["faults"] if f["phase"] == "train"]
    assert fault["kind"] == "declined" and fault["site"] == "site_01"
    assert BUDGET_DECLINED in fault["detail"] and "site_01" in fault["detail"] and f"{_eps(3):.3f}" in fault["detail"]
    (declined,) = json.loads(RunFiles(run_dir).history.read_text())["privacy"]["declined"]
    assert declined["round"] == 2 and declined["site"] == "site_01"
    assert set(second["evaluate"]) == {"site_00", "site_01"}  # the declining site still evaluates
    ledger = PrivacyLedger.open(ledger_path(state / "site_01", "x", "site"))
    assert ledger.total_steps == 2  # nothing was spent by the declined round
    assert "declined a round" in RunFiles(run_dir).report.read_text()
    # a later study at the same sites (lifetime ledgers): both budgets are spent, the run stops with the reason
    with pytest.raises(FederationStopped, match=r"2 site\(s\) declined because their privacy budget is spent"):
        run_inprocess(run_config(cache, tmp_path / "stops", f"{extra} fl.num_rounds=2 fl.min_train_nodes=2"))


def _norm_between_rounds(run_dir) -> float:
    a, b = (load_checkpoint(RunFiles(run_dir).round_checkpoint(r))["state_dict"] for r in (1, 2))
    return float(torch.sqrt(sum(((b[k].double() - a[k].double()) ** 2).sum() for k in a)))


def test_client_level_dp_clips_each_site_at_the_site_and_reports_per_round(cache, tmp_path):
    run_dir, clip = tmp_path / "fixed", 1e-3
    extra = (f"privacy=client_dp_fixed privacy.client_dp.noise_multiplier=0.0 privacy.client_dp.clipping_norm={clip} "
             "privacy.client_dp.accountant=null fl.final_test=false")  # no noise: to see the clipping alone
    history = run_inprocess(run_config(cache, run_dir, extra))
    assert history["status"] == "completed"
    rounds = json.loads(RunFiles(run_dir).history.read_text())["privacy"]["client_level_rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["wrapper"] == "DifferentialPrivacyClientSideFixedClipping"
    assert rounds[0]["clipping_norm"] == clip and rounds[0]["num_sampled_sites"] == 2
    # each site clipped its update (local - global) to C: the uniform mean moves the model by at most C
    assert 0 < _norm_between_rounds(run_dir) <= clip * (1 + 1e-4)
    assert rounds[0]["epsilon"] is None and "accountant" in rounds[0]["epsilon_note"]


def test_client_level_dp_adaptive_clipping_on_the_server_side(cache, tmp_path):
    run_dir = tmp_path / "adaptive"
    extra = ("privacy=client_dp_adaptive privacy.client_dp.side=server privacy.client_dp.noise_multiplier=0.5 "
             "privacy.client_dp.clipped_count_stddev=1.0 "
             "fl.final_test=false")
    history = run_inprocess(run_config(cache, run_dir, extra))
    rounds = history["privacy"]["client_level_rounds"]
    assert history["status"] == "completed" and len(rounds) == 2
    assert rounds[0]["wrapper"] == "DifferentialPrivacyServerSideAdaptiveClipping"
    assert rounds[0]["clipping_norm"] != rounds[1]["clipping_norm"]  # the norm follows the sites' update norms
    assert rounds[0]["noise_stddev"] > 0 and rounds[0]["epsilon"] is None
    assert "Client-level (hospital-level) DP" in RunFiles(run_dir).report.read_text()


@pytest.mark.skipif(importlib.util.find_spec("dp_accounting") is None, reason="dp-accounting not installed")
def test_flowers_client_level_epsilon_grows_and_is_checkpointed(cache, tmp_path):
    run_dir = tmp_path / "eps"
    extra = "privacy=client_dp_fixed privacy.client_dp.side=server fl.final_test=false"
    run_inprocess(run_config(cache, run_dir, f"{extra} fl.num_rounds=1"))
    history = run_inprocess(run_config(cache, run_dir, f"{extra} fl.num_rounds=2 fl.resume=true"))
    first, second = history["privacy"]["client_level_rounds"]
    assert 0 < first["epsilon"] < second["epsilon"] and second["releases"] == 2  # restored on resume
    assert second["delta"] == pytest.approx(1e-3) and second["wrapper"] == "DifferentialPrivacyServerSideFixedClipping"
