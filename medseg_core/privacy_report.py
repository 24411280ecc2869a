"""What both sides of a private federation share: privacy metric names, and what the server shows.

No Opacus and no Flower here (``DESIGN.md`` §2): the sites compute these figures (``client/privacy.py``,
the only module that imports Opacus), the server records them per site and per round in
``history.json`` and draws ``epsilon.png``, and neither imports the other.

Sample-level DP (``privacy=dp``): each private round a site reports the scalars of :data:`REPORT_KEYS`
in its training MetricRecord. They describe one site's mechanism and cumulative spending, so the server
never averages them over sites (:func:`is_privacy_metric`); it keeps them per site per round.

A site whose next round would exceed its budget declines: its ClientApp raises an error whose message
contains :data:`BUDGET_DECLINED`, naming the site and the figures; the server logs it as a ``declined``
fault and goes on with the other sites.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: privacy accountants: RDP with Opacus' conversion, RDP with the classic conversion, PRV
ACCOUNTANT_RDP, ACCOUNTANT_RDP_CLASSIC, ACCOUNTANT_PRV = "rdp", "rdp_classic", "prv"
ACCOUNTANTS = (ACCOUNTANT_RDP, ACCOUNTANT_RDP_CLASSIC, ACCOUNTANT_PRV)

#: every privacy metric a site reports starts with this (the server never case-averages them)
DP_PREFIX = "dp-"
# MetricRecord keys a site reports each private round (kebab-case, like medseg_core.federation's)
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"  # sigma
DP_SAMPLE_RATE = "dp-sample-rate"  # q, Poisson sampling probability of a case per step
DP_MAX_GRAD_NORM = "dp-max-grad-norm"  # C, per-patient clipping norm
DP_DELTA = "dp-delta"
DP_STEPS_ROUND = "dp-steps-round"  # noisy steps this round (empty Poisson batches included)
DP_STEPS_TOTAL = "dp-steps-total"  # noisy steps in the site's ledger, all rounds (and runs) so far
DP_EPSILON = "dp-epsilon"  # epsilon spent so far with the enforced accountant (privacy.accountant)
DP_EPSILON_RDP = "dp-epsilon-rdp"  # RDP, Opacus' conversion (Balle et al. 2020, Thm. 21)
DP_EPSILON_RDP_CLASSIC = "dp-epsilon-rdp-classic"  # RDP, classic conversion (Mironov 2017, Prop. 3)
DP_EPSILON_PRV = "dp-epsilon-prv"  # PRV accountant (Gopi et al. 2021), upper bound
DP_EPSILON_BUDGET = "dp-epsilon-budget"  # the site's budget (absent: none)
REPORT_KEYS = (
    DP_NOISE_MULTIPLIER,
    DP_SAMPLE_RATE,
    DP_MAX_GRAD_NORM,
    DP_DELTA,
    DP_STEPS_ROUND,
    DP_STEPS_TOTAL,
    DP_EPSILON,
    DP_EPSILON_RDP,
    DP_EPSILON_RDP_CLASSIC,
    DP_EPSILON_PRV,
    DP_EPSILON_BUDGET,
)
#: report key of each accountant's epsilon
EPSILON_KEYS = {
    ACCOUNTANT_RDP: DP_EPSILON_RDP,
    ACCOUNTANT_RDP_CLASSIC: DP_EPSILON_RDP_CLASSIC,
    ACCOUNTANT_PRV: DP_EPSILON_PRV,
}
#: what the error of a site that declines a round because of its budget always contains
BUDGET_DECLINED = "privacy budget reached"
#: fault kind the server logs for such a site (``history.json``: ``faults`` and ``privacy.declined``)
DECLINED = "declined"


def is_privacy_metric(key: str) -> bool:
    """Whether a metric is a per-site privacy figure (kept per site, never averaged over sites)."""
    return str(key).startswith(DP_PREFIX)


def is_budget_decline(detail: str) -> bool:
    """Whether a site's error says that it declined the round because of its privacy budget."""
    return BUDGET_DECLINED in str(detail)


def epsilon_series(history: Mapping[str, Any], key: str = DP_EPSILON) -> dict[str, list[float]]:
    """``{site: [epsilon after round r, ...]}`` from a run's history (NaN where a site did not train).

    Args:
        history: ``history.json`` as a dict (``rounds[i]["train"][site][key]``).
        key: which epsilon (:data:`DP_EPSILON` or one of :data:`EPSILON_KEYS`' values).
    """
    rounds = history.get("rounds", [])
    sites = sorted({s for e in rounds for s, m in e.get("train", {}).items() if key in m})
    return {s: [float(e.get("train", {}).get(s, {}).get(key, math.nan)) for e in rounds] for s in sites}


def plot_epsilon(history: Mapping[str, Any], path: str | Path) -> Path | None:
    """``epsilon.png``: cumulative epsilon per site vs round, one panel per conversion.

    Returns:
        The PNG's path, or ``None`` (nothing written) when no site reported epsilon.
    """
    from medseg_core.plots import plot_curves  # matplotlib only when there is something to draw

    panels = {
        "epsilon, RDP (Opacus conversion)": epsilon_series(history, DP_EPSILON_RDP),
        "epsilon, RDP (classic conversion)": epsilon_series(history, DP_EPSILON_RDP_CLASSIC),
        "epsilon, PRV": epsilon_series(history, DP_EPSILON_PRV),
    }
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    title = f"privacy spent per site - {history.get('run_name', '')}"
    return plot_curves(panels, Path(path), title=title, xlabel="round")


def latest_privacy(history: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Each site's privacy figures from the last round it trained in (``{site: {dp-*: value}}``)."""
    out: dict[str, dict[str, float]] = {}
    for entry in history.get("rounds", []):
        for site, metrics in entry.get("train", {}).items():
            figures = {k: v for k, v in metrics.items() if is_privacy_metric(k)}
            if figures:
                out[site] = {**figures, "round": entry.get("round")}
    return out
