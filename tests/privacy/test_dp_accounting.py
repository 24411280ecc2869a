"""The accountant: published TF-Privacy epsilons (classic RDP conversion), the issue's cumulative vs
per-round example (Opacus' conversion), calibration, the Poisson schedule."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from client.privacy import (
    ACCOUNTANT_PRV,
    ACCOUNTANT_RDP,
    ACCOUNTANT_RDP_CLASSIC,
    PrivacyBudgetExhausted,
    PrivacyLedger,
    calibrate_noise_multiplier,
    compute_epsilon,
    epsilon_rdp,
    poisson_schedule,
)

N, BATCH, DELTA = 60_000, 256, 1e-5


@pytest.mark.parametrize("sigma,epochs,published", [(1.1, 60, 3.01), (1.3, 15, 1.19), (0.7, 45, 7.10)])
def test_classic_conversion_matches_published_tf_privacy_values(tmp_path, sigma, epochs, published):
    """TF-Privacy's DP-SGD tables (MNIST, N = 60 000, batch 256, delta = 1e-5) used the classic conversion
    eps = min_a RDP(a) + log(1/delta)/(a-1), with ceil(epochs * N / batch) steps."""
    ledger = PrivacyLedger(tmp_path / "ledger.json", site="mnist", delta=DELTA)
    ledger.record_round("tf", 1, noise_multiplier=sigma, sample_rate=BATCH / N,
                        steps=math.ceil(epochs * N / BATCH), max_grad_norm=1.0, num_cases=N)
    assert ledger.epsilon(ACCOUNTANT_RDP_CLASSIC) == pytest.approx(published, abs=0.01)
    # Opacus' default conversion (Balle et al. 2020) is tighter than the classic one
    assert ledger.epsilon(ACCOUNTANT_RDP) < 0.9 * published


def test_issue_example_cumulative_ledger_vs_fresh_engine_per_round(tmp_path):
    """N = 100, batch 4, sigma = 1, one epoch (25 steps) per round, delta = 1e-5: a fresh accountant per
    round (Flower's Opacus example) reports 2.23 every round; the real cumulative epsilon after 50 rounds is
    10.49. Both figures are RDP with Opacus' default conversion."""
    q, steps = poisson_schedule(100, 4)
    assert (q, steps) == (0.04, 25)
    ledger = PrivacyLedger(tmp_path / "ledger.json", site="site", delta=DELTA)
    per_round = []
    for r in range(1, 51):
        fresh = RDPAccountant()  # what a new PrivacyEngine per round sees
        fresh.history = [(1.0, q, steps)]
        per_round.append(fresh.get_epsilon(DELTA))
        ledger.record_round("run", r, noise_multiplier=1.0, sample_rate=q, steps=steps, max_grad_norm=1.0,
                            num_cases=100)
    assert per_round[0] == per_round[-1] == pytest.approx(2.23, abs=0.005)
    assert ledger.epsilon(ACCOUNTANT_RDP) == pytest.approx(10.49, abs=0.005)
    # the same reloaded from disk (a restart), and the other conversions are named and ordered
    again = PrivacyLedger.open(ledger.path)
    assert again.total_steps == 50 * 25 and again.compositions() == [(1.0, 0.04, 1250)]
    eps = again.epsilons()
    assert eps[ACCOUNTANT_RDP] == pytest.approx(10.49, abs=0.005)
    assert eps[ACCOUNTANT_RDP_CLASSIC] == pytest.approx(11.42, abs=0.01)
    assert eps[ACCOUNTANT_PRV] < eps[ACCOUNTANT_RDP] < eps[ACCOUNTANT_RDP_CLASSIC]


def test_epsilon_grows_with_steps_and_is_zero_before_any():
    assert compute_epsilon([], 1e-5) == 0.0
    a = epsilon_rdp([(1.0, 0.1, 10)], 1e-5)
    b = epsilon_rdp([(1.0, 0.1, 10), (1.0, 0.1, 10)], 1e-5)
    assert 0 < a < b == pytest.approx(epsilon_rdp([(1.0, 0.1, 20)], 1e-5))
    with pytest.raises(ValueError, match="accountant must be one of"):
        compute_epsilon([(1.0, 0.1, 1)], 1e-5, "gdp")


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning")
def test_calibration_matches_opacus_and_accounts_for_prior_spending():
    q, steps = 0.04, 250
    ours = calibrate_noise_multiplier(4.0, 1e-5, q, steps)
    assert ours == pytest.approx(get_noise_multiplier(target_epsilon=4.0, target_delta=1e-5, sample_rate=q,
                                                      steps=steps), rel=1e-3)
    assert compute_epsilon([(ours, q, steps)], 1e-5) <= 4.0
    # half the budget already spent by an earlier run: the same steps need more noise
    prior = [(ours, q, 60)]
    more = calibrate_noise_multiplier(4.0, 1e-5, q, steps, prior=prior)
    assert more > ours
    assert compute_epsilon([*prior, (more, q, steps)], 1e-5) == pytest.approx(4.0, abs=0.02)
    with pytest.raises(PrivacyBudgetExhausted, match="already spent"):
        calibrate_noise_multiplier(0.5, 1e-5, q, steps, prior=[(0.5, q, 1000)])
    with pytest.raises(ValueError, match="sample_rate"):
        calibrate_noise_multiplier(1.0, 1e-5, 0.0, steps)


def test_poisson_schedule_follows_opacus_dp_data_loader():
    assert poisson_schedule(10, 4) == (1 / 3, 3)  # ceil(10 / 4) steps, q = 1 / steps
    assert poisson_schedule(3, 8) == (1.0, 1)
    with pytest.raises(ValueError, match="batch_size >= 1"):
        poisson_schedule(10, 0)
