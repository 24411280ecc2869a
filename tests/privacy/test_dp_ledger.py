"""The per-site privacy ledger: persisted across restarts, never silently reset, budget enforced with a
clear message, sigma calibrated once per run, the scalars a site reports, the epsilon plot."""

from __future__ import annotations

import json
import math

import pytest

from client.privacy import (
    DPSettings,
    LedgerError,
    PrivacyBudgetExhausted,
    PrivacyLedger,
    ledger_path,
    resolve_ledger_scope,
)
from medseg_core.privacy_report import (
    DP_EPSILON,
    DP_EPSILON_BUDGET,
    DP_EPSILON_PRV,
    DP_EPSILON_RDP,
    DP_EPSILON_RDP_CLASSIC,
    DP_STEPS_TOTAL,
    REPORT_KEYS,
    epsilon_series,
    plot_epsilon,
)


def _round(ledger: PrivacyLedger, r: int, run: str = "run-a", steps: int = 25) -> None:
    ledger.record_round(run, r, noise_multiplier=1.0, sample_rate=0.04, steps=steps, max_grad_norm=1.0,
                        num_cases=100)


def test_ledger_survives_a_restart_and_keeps_growing(tmp_path):
    path = ledger_path(tmp_path / "site_00", "run-a")
    assert path == tmp_path / "site_00" / "privacy-ledger.json"
    ledger = PrivacyLedger.open(path, site="site_00")
    assert ledger.rounds == [] and not path.exists()
    ledger.resolve_delta(None, num_cases=100)
    assert ledger.delta == pytest.approx(1e-3)  # 1 / (10 N)
    _round(ledger, 1)
    first = ledger.epsilon()
    restarted = PrivacyLedger.open(path)  # a new process
    assert restarted.site == "site_00" and restarted.delta == ledger.delta and restarted.total_steps == 25
    _round(restarted, 2)
    assert restarted.epsilon() > first
    on_disk = json.loads(path.read_text())
    assert on_disk["format"] == "medseg-privacy-ledger" and [r["round"] for r in on_disk["rounds"]] == [1, 2]
    assert not list(path.parent.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_auto_scope_is_per_run_in_simulation_and_lifetime_at_a_deployed_site():
    assert resolve_ledger_scope("auto", simulated=True) == "run"
    assert resolve_ledger_scope("auto", simulated=False) == "site"
    assert resolve_ledger_scope("site", simulated=True) == "site"
    with pytest.raises(ValueError, match="'forever'"):
        resolve_ledger_scope("forever", simulated=False)
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        ledger_path("/tmp", "run", "auto")


def test_run_scope_puts_the_ledger_in_the_run_folder(tmp_path):
    assert ledger_path(tmp_path, "run-b", "run") == tmp_path / "run-b" / "privacy-ledger.json"
    with pytest.raises(ValueError, match="ledger scope must be one of"):
        ledger_path(tmp_path, "run-b", "global")


def test_a_damaged_ledger_is_an_error_not_a_fresh_start(tmp_path):
    path = tmp_path / "privacy-ledger.json"
    path.write_text("{ not json")
    with pytest.raises(LedgerError, match="cannot read the privacy ledger.*refusing to train"):
        PrivacyLedger.open(path)
    path.write_text(json.dumps({"rounds": []}))
    with pytest.raises(LedgerError, match="not a privacy ledger"):
        PrivacyLedger.open(path)
    path.write_text(json.dumps({"format": "medseg-privacy-ledger", "version": 1, "rounds": [{"steps": 3}]}))
    with pytest.raises(LedgerError, match="malformed round entry"):
        PrivacyLedger.open(path)
    path.write_text(json.dumps({"format": "medseg-privacy-ledger", "version": 99}))
    with pytest.raises(LedgerError, match="newer than this code"):
        PrivacyLedger.open(path)


def test_delta_is_fixed_once_and_must_be_below_one_over_n(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json")
    with pytest.raises(ValueError, match=r"privacy.delta=0.02 is not below 1/N = 0.02"):
        ledger.resolve_delta(0.02, num_cases=50)
    assert ledger.resolve_delta(1e-4, num_cases=50) == 1e-4
    assert ledger.resolve_delta(None, num_cases=50) == 1e-4
    with pytest.raises(LedgerError, match="accounts at delta=0.0001, the config asks for delta=1e-05"):
        ledger.resolve_delta(1e-5, num_cases=50)
    with pytest.raises(LedgerError, match="resolve the ledger's delta"):
        PrivacyLedger(tmp_path / "m.json").record_round("r", 1, noise_multiplier=1, sample_rate=0.1, steps=1,
                                                        max_grad_norm=1, num_cases=10)


def test_budget_declines_the_round_that_would_exceed_it_with_the_figures(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json", site="site_01", delta=1e-5)
    budget, declined = 4.0, None
    for r in range(1, 40):
        if not ledger.can_afford(25, 1.0, 0.04, budget):
            with pytest.raises(PrivacyBudgetExhausted) as info:
                ledger.check_can_afford(25, 1.0, 0.04, budget)
            declined = r
            break
        _round(ledger, r)
    assert declined is not None and declined > 2
    assert ledger.epsilon() <= budget
    message = str(info.value)
    assert "site site_01: privacy budget reached" in message and "above the budget of 4.0" in message
    assert "declining to train" in message and str(ledger.path) in message
    assert ledger.can_afford(10**6, 1.0, 0.04, None)  # no budget: report only


def test_sigma_is_calibrated_once_per_run_and_kept(tmp_path):
    settings = DPSettings(epsilon=3.0)
    ledger = PrivacyLedger(tmp_path / "l.json", site="s")
    sigma = ledger.run_noise("run-a", settings, sample_rate=0.04, planned_steps=250, num_cases=100)
    assert ledger.runs["run-a"]["calibrated"] and ledger.runs["run-a"]["planned_steps"] == 250
    assert ledger.epsilon(extra=[(sigma, 0.04, 250)]) <= 3.0
    # the resumed run reads it back, whatever the config now says
    again = PrivacyLedger.open(ledger.path)
    assert again.run_noise("run-a", DPSettings(noise_multiplier=5.0, epsilon=None), sample_rate=0.04,
                           planned_steps=10, num_cases=100) == sigma
    # a second run at the same site calibrates against the budget that is left
    _round(again, 1)
    second = again.run_noise("run-b", settings, sample_rate=0.04, planned_steps=250, num_cases=100)
    assert second > sigma
    assert again.runs["run-b"]["noise_multiplier"] == second


def test_report_has_every_named_scalar(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json", delta=1e-5)
    _round(ledger, 1)
    _round(ledger, 2)
    rep = ledger.report(steps_round=25, noise_multiplier=1.0, sample_rate=0.04, max_grad_norm=1.0, budget=None)
    assert set(rep) == set(REPORT_KEYS) - {DP_EPSILON_BUDGET}  # no budget: no key (history.json has no Infinity)
    assert all(isinstance(v, float) for v in rep.values())
    assert rep[DP_STEPS_TOTAL] == 50 and rep[DP_EPSILON] == rep[DP_EPSILON_RDP]
    assert rep[DP_EPSILON_PRV] < rep[DP_EPSILON_RDP] < rep[DP_EPSILON_RDP_CLASSIC]
    with_budget = ledger.report(steps_round=25, noise_multiplier=1.0, sample_rate=0.04, max_grad_norm=1.0,
                                budget=8.0, accountant="prv")
    assert with_budget[DP_EPSILON_BUDGET] == 8.0 and with_budget[DP_EPSILON] == with_budget[DP_EPSILON_PRV]


def test_epsilon_plot_from_a_history_dict(tmp_path):
    def train(eps):
        return {DP_EPSILON: eps, DP_EPSILON_RDP: eps, DP_EPSILON_RDP_CLASSIC: eps * 1.1, DP_EPSILON_PRV: eps * 0.9}

    history = {"run_name": "r", "rounds": [
        {"round": 1, "train": {"site_00": train(1.0), "site_01": train(1.5)}},
        {"round": 2, "train": {"site_00": train(2.0)}},  # site_01 declined
    ]}
    series = epsilon_series(history)
    assert series["site_00"] == [1.0, 2.0] and series["site_01"][0] == 1.5 and math.isnan(series["site_01"][1])
    png = plot_epsilon(history, tmp_path / "epsilon.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
    assert plot_epsilon({"rounds": [{"train": {"site_00": {"train-loss": 1.0}}}]}, tmp_path / "none.png") is None
