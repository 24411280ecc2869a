"""Patient-level differential privacy at a site: DP-SGD (Opacus) and a cumulative privacy ledger.

The only module of the project that imports Opacus (tests and benchmarks aside). It turns the site's
model, optimiser and training loader into their private versions, which
:func:`medseg_core.engine.train_one_epoch` runs unchanged::

    settings = DPSettings.from_config(cfg.privacy)              # None when privacy.mode is "none"
    check_training_config(cfg)                                   # refuses settings that break DP
    ledger = PrivacyLedger.open(ledger_path(state_root, run_name, settings.ledger_scope), site=name)
    private = make_private(model, optimizer, loaders.train, settings, ledger=ledger, run_name=run_name,
                           planned_epochs=num_rounds * local_epochs, round_epochs=local_epochs)
    for _ in range(local_epochs):                                # raises PrivacyBudgetExhausted above
        train_one_epoch(private.model, private.loader, loss_fn, private.optimizer, grad_clip_norm=None, ...)
    metrics.update(private.commit(round_idx))                    # ledger written before the reply

**The privacy unit is the patient.** Every item of the training dataset is one case, and under DP it
yields exactly one random patch (``transforms.crop.num_samples: 1``); batches are drawn by Poisson
sampling (each case independently with probability ``q``); the losses in :mod:`medseg_core.losses` are
per sample, so each patient's gradient is clipped to ``max_grad_norm`` on its own.

**Empty Poisson batches are real steps.** The engine skips a batch without cases (the networks cannot
run on it). The DP-SGD analysis counts *every* sampling step, and a skipped step would also reveal that
no patient was drawn, so :class:`PoissonCaseLoader` takes a noise-only optimiser step for each empty
batch itself (the accountant counts it) before handing the next non-empty batch to the engine.

**Noise and sampling use fresh entropy.** The site seeds its crops and augmentation from a value the
server can compute (``medseg_core.federation.round_seed``). Noise drawn from that seed could be
subtracted by the server, so DP noise and Poisson sampling use their own generator seeded from the
operating system (or Opacus' cryptographically secure generator with ``secure_mode``), never from the
run's seed unless ``privacy.seed`` is set explicitly for a reproducible, non-private test.

**Ledger.** One JSON file per site (``privacy-ledger.json`` in the site's state directory) lists every
private round this site has released: noise multiplier, sampling rate, steps, clipping norm. It lives
across rounds, restarts and (with ``ledger_scope: site``, the default at a deployed site) across runs,
because a patient's privacy loss accumulates over every model trained on them. In simulation the
default (``auto``) is one ledger per run: the simulated sites' state folder is shared by every demo
run in the cache, and synthetic patients have no lifetime budget to protect. It never leaves the site; each
round the site reports a few scalars from it (:data:`REPORT_KEYS`): ε from the RDP accountant with
Opacus' conversion (Balle et al. 2020, Thm. 21) and with the classic conversion
(ε = min_α RDP(α) + log(1/δ)/(α−1), Mironov 2017, used by TF-Privacy's published tables), and from the
PRV accountant (Gopi et al. 2021, upper bound). A round whose steps would take the enforced ε
(``privacy.accountant``) beyond the budget is declined with :class:`PrivacyBudgetExhausted`.

**Per-sample gradients.** ``grad_sample_mode: fast`` (default) is Opacus' hooks with our own grad
samplers for convolutions, transposed convolutions, PReLU and weight-standardised convolutions
(:data:`FAST_GRAD_SAMPLERS`) in :class:`FastGradSampleModule`: a convolution's per-sample weight
gradients come from PyTorch's own convolution backward with the batch folded into channels and groups
(the fastest of three exact forms, chosen once per layer shape), instead of Opacus' im2col ``unfold``
(3-20x faster per layer, no ``[B, C*k^d, L]`` buffer), and autograd no longer computes the plain weight
gradients that DP-SGD throws away. About 1.4x the non-private step instead of 2.2-3.2x
(``bench/dp_overhead.py``, ``docs/benchmarks.md``). They are exact (tests compare them with
one-at-a-time autograd in float64), work for any memory layout, and compute in float32 under bf16
autocast so that clipping stays exact. ``hooks`` and ``functorch`` are stock Opacus.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import json
import math
import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import DataLoader, list_data_collate
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from medseg_core.checkpoint import write_json
from medseg_core.models import dp_problems
from medseg_core.models.transunet import StdConv2d, StdConv3d, _standardize
from medseg_core.privacy_report import (
    ACCOUNTANT_PRV,
    ACCOUNTANT_RDP,
    ACCOUNTANT_RDP_CLASSIC,
    ACCOUNTANTS,
    BUDGET_DECLINED,
    DP_DELTA,
    DP_EPSILON,
    DP_EPSILON_BUDGET,
    DP_MAX_GRAD_NORM,
    DP_NOISE_MULTIPLIER,
    DP_SAMPLE_RATE,
    DP_STEPS_ROUND,
    DP_STEPS_TOTAL,
    EPSILON_KEYS,
)

# --------------------------------------------------------------------------------------------------
# names

MODE_NONE, MODE_DP = "none", "dp"
GRAD_SAMPLE_MODES = ("fast", "hooks", "functorch")
#: site: one ledger for every run at the site; run: one per run; auto: run in simulation, site when deployed
LEDGER_SCOPES = ("auto", "site", "run")
LEDGER_FILE = "privacy-ledger.json"
LEDGER_FORMAT, LEDGER_VERSION = "medseg-privacy-ledger", 1

#: RDP orders: Opacus'/TF-Privacy's defaults plus a few large ones (tighter for short, low-epsilon runs)
RDP_ORDERS: tuple[float, ...] = (*RDPAccountant.DEFAULT_ALPHAS, 80.0, 128.0, 256.0, 512.0)
#: largest noise multiplier calibration tries before declaring the budget too small
MAX_NOISE_MULTIPLIER = 1e4
#: time the per-sample weight-gradient methods once per layer shape and use the fastest (else: grouped)
AUTOTUNE_WEIGHT_GRADS = True

#: (noise multiplier, sample rate, steps)
Composition = tuple[float, float, int]


class PrivacyBudgetExhausted(ValueError):
    """The site's next round would spend more than its privacy budget; it declines to train."""


class LedgerError(ValueError):
    """The privacy ledger file is unreadable, not ours, or inconsistent with the requested settings."""


# --------------------------------------------------------------------------------------------------
# settings


def _positive(name: str, value: Any, *, allow_none: bool = False, strict: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (strict and value == 0):
        raise ValueError(f"privacy.{name} must be a finite number {'>' if strict else '>='} 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DPSettings:
    """Sample-level (patient-level) DP-SGD settings of a site (``configs/privacy/dp.yaml``).

    Attributes:
        noise_multiplier: sigma (noise std / clipping norm); ``None``: calibrated once per run from
            ``epsilon`` and ``delta`` over every planned round x local epoch, then kept in the ledger.
        epsilon: the site's total budget; rounds beyond it are declined. ``None``: no budget (then
            ``noise_multiplier`` is required; epsilon is still reported).
        delta: target delta; ``None``: ``1 / (10 N)`` for ``N`` training cases (always below ``1/N``).
        max_grad_norm: per-patient gradient clipping norm ``C``.
        accountant: the accountant enforced and used for calibration (all are reported).
        grad_sample_mode: ``fast`` (ours), ``hooks`` or ``functorch`` (stock Opacus).
        ledger_scope: ``site`` (one ledger for every run at the site), ``run``, or ``auto`` (default:
            ``run`` in simulation, ``site`` at a deployed site; :func:`resolve_ledger_scope`).
        secure_mode: draw noise and sampling from Opacus' cryptographically secure generator
            (needs ``torchcsprng``).
        seed: ``None`` (default): noise and sampling from OS entropy. An integer makes them
            reproducible, which is not private against anyone who knows it: tests only.

    Raises:
        ValueError: any setting out of range (naming it and its value).
    """

    noise_multiplier: float | None = None
    epsilon: float | None = 8.0
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = ACCOUNTANT_RDP
    grad_sample_mode: str = "fast"
    ledger_scope: str = "auto"
    secure_mode: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        _positive("noise_multiplier", self.noise_multiplier, allow_none=True)
        _positive("epsilon", self.epsilon, allow_none=True)
        _positive("max_grad_norm", self.max_grad_norm)
        if self.delta is not None and not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise ValueError(f"privacy.delta must be in (0, 1) or null, got {self.delta!r}")
        if self.noise_multiplier is None and self.epsilon is None:
            raise ValueError("privacy: set noise_multiplier, or an epsilon budget to calibrate it from (both are null)")
        for name, allowed in (("accountant", ACCOUNTANTS), ("grad_sample_mode", GRAD_SAMPLE_MODES),
                              ("ledger_scope", LEDGER_SCOPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"privacy.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"privacy.seed must be an integer or null, got {self.seed!r}")

    @classmethod
    def from_config(cls, privacy_cfg: Mapping[str, Any] | None) -> DPSettings | None:
        """Settings from the ``privacy`` config node; ``None`` when sample-level DP is off.

        Raises:
            ValueError: an unknown ``mode`` or key, or a bad value.
        """
        cfg = dict(privacy_cfg or {})
        mode = cfg.pop("mode", MODE_NONE)
        if mode in (None, MODE_NONE):
            return None
        if mode != MODE_DP:
            raise ValueError(f"privacy.mode must be {MODE_NONE!r} or {MODE_DP!r}, got {mode!r}")
        for key in ("client_dp", "secagg"):  # server-side settings combined in the same group
            cfg.pop(key, None)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown privacy setting(s) {unknown}; expected some of {sorted(known)}")
        return cls(**cfg)


def default_delta(num_cases: int) -> float:
    """``1 / (10 N)``: below ``1/N``, so the guarantee cannot allow publishing one patient's data outright."""
    return 1.0 / (10.0 * num_cases)


def check_training_config(cfg: Mapping[str, Any]) -> None:
    """Refuse training settings that would break patient-level DP-SGD or compute wrong gradients.

    ``configs/privacy/dp.yaml`` sets all of these; this catches later overrides. Checks
    ``transforms.crop.num_samples == 1`` (one crop per patient per step), ``train.channels_last`` off
    (Opacus 1.6 computes wrong Conv2d per-sample gradients for channels-last inputs), a model built with
    ``dp_compatible: true``, ``train.amp`` only with ``grad_sample_mode: fast`` (whose per-sample
    gradients are float32), and a strategy without client-side gradient terms that Opacus would
    silently drop (FedProx, SCAFFOLD).

    Raises:
        ValueError: every problem found, one per line, with the override that fixes it.
    """
    settings = DPSettings.from_config(cfg.get("privacy"))
    if settings is None:
        return
    problems = []
    crop = ((cfg.get("transforms") or {}).get("crop") or {})
    if int(crop.get("num_samples", 1)) != 1:
        problems.append(f"transforms.crop.num_samples={crop.get('num_samples')}: DP-SGD needs one crop per "
                        "patient per step (the privacy unit is the patient); set transforms.crop.num_samples=1")
    train = cfg.get("train") or {}
    if train.get("channels_last"):
        problems.append("train.channels_last=true: Opacus computes wrong per-sample gradients for channels-last "
                        "inputs; set train.channels_last=false")
    if train.get("amp") in (True, "true", "on", "auto") and settings.grad_sample_mode != "fast":
        problems.append(f"train.amp={train.get('amp')} with grad_sample_mode={settings.grad_sample_mode}: "
                        "Opacus' own samplers would clip bf16 per-sample gradients; use "
                        "privacy.grad_sample_mode=fast or train.amp=false")
    model = cfg.get("model") or {}
    if "dp_compatible" in model and not model.get("dp_compatible"):
        problems.append("model.dp_compatible=false: build the DP-compatible variant (GroupNorm/InstanceNorm, "
                        "no in-place ops); set model.dp_compatible=true")
    strategy = (cfg.get("strategy") or {}).get("name")
    if strategy in ("fedprox", "scaffold"):
        problems.append(f"strategy={strategy}: its client-side gradient term would be discarded by DP-SGD "
                        "(the private optimiser replaces the gradient); use make_private(grad_correction=...) "
                        "or another strategy")
    if problems:
        raise ValueError("privacy=dp cannot train with this configuration:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------------------------------
# accounting


def _merge(compositions: Sequence[Composition]) -> list[Composition]:
    """Merge consecutive compositions with the same (sigma, q), as Opacus' RDP accountant does."""
    out: list[Composition] = []
    for sigma, q, steps in compositions:
        if steps <= 0:
            continue
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + int(steps))
        else:
            out.append((float(sigma), float(q), int(steps)))
    return out


def _rdp(compositions: Sequence[Composition], orders: Sequence[float]) -> np.ndarray:
    return sum((rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=list(orders))
                for s, q, n in compositions), np.zeros(len(orders)))


def epsilon_rdp_classic(compositions: Sequence[Composition], delta: float,
                        orders: Sequence[float] = RDP_ORDERS) -> float:
    """ε from RDP with the classic conversion ε = min_α RDP(α) + log(1/δ)/(α−1) (Mironov 2017, Prop. 3).

    Opacus' RDP analysis (ported from TF-Privacy) gives RDP(α); this is the conversion TF-Privacy used
    for its published DP-SGD tables. It is looser than Opacus' default conversion.
    """
    compositions = _merge(compositions)
    if not compositions:
        return 0.0
    alphas = np.asarray(orders, dtype=float)
    return float(np.nanmin(_rdp(compositions, orders) + math.log(1.0 / delta) / (alphas - 1.0)))


def epsilon_rdp(compositions: Sequence[Composition], delta: float, orders: Sequence[float] = RDP_ORDERS) -> float:
    """ε from RDP with Opacus' default conversion (Balle et al. 2020, Thm. 21)."""
    compositions = _merge(compositions)
    if not compositions:
        return 0.0
    with warnings.catch_warnings():  # "optimal order is the largest alpha": we extended the orders already
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=_rdp(compositions, orders), delta=delta)
    return float(eps)


def epsilon_prv(compositions: Sequence[Composition], delta: float, eps_error: float = 0.01) -> float:
    """ε from Opacus' PRV accountant (upper bound at ``eps_error``); NaN where PRV cannot be computed."""
    compositions = _merge(compositions)
    if not compositions:
        return 0.0
    accountant = PRVAccountant()
    accountant.history = list(compositions)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):  # q = 1 divides by zero inside PRV
            warnings.simplefilter("ignore")
            return float(accountant.get_epsilon(delta=delta, eps_error=eps_error))
    except (ValueError, RuntimeError, FloatingPointError, OverflowError):  # PRV's domain limits: report only
        return math.nan


_EPSILON_FNS: dict[str, Callable[[Sequence[Composition], float], float]] = {
    ACCOUNTANT_RDP: epsilon_rdp, ACCOUNTANT_RDP_CLASSIC: epsilon_rdp_classic, ACCOUNTANT_PRV: epsilon_prv,
}


def compute_epsilon(compositions: Sequence[Composition], delta: float, accountant: str = ACCOUNTANT_RDP) -> float:
    """ε of a sequence of sampled-Gaussian compositions with the named accountant.

    Raises:
        ValueError: unknown accountant.
    """
    if accountant not in _EPSILON_FNS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return _EPSILON_FNS[accountant](compositions, delta)


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int, *,
                               prior: Sequence[Composition] = (), accountant: str = ACCOUNTANT_RDP,
                               tolerance: float = 0.01) -> float:
    """Smallest noise multiplier (to ``tolerance`` in ε) so that ``prior`` + ``steps`` stays within the budget.

    Opacus' ``get_noise_multiplier`` does the same bisection but only for a fresh accountant; a site's
    ledger may already hold earlier runs, whose spending has to be composed with the new one.

    Raises:
        PrivacyBudgetExhausted: the prior spending alone reaches the budget, or no sigma up to
            :data:`MAX_NOISE_MULTIPLIER` fits.
        ValueError: bad arguments.
    """
    _positive("epsilon", target_epsilon)
    if not 0 < sample_rate <= 1 or steps < 1:
        raise ValueError(f"need 0 < sample_rate <= 1 and steps >= 1, got {sample_rate}, {steps}")
    spent = compute_epsilon(prior, delta, accountant)
    if spent >= target_epsilon:
        raise PrivacyBudgetExhausted(f"{BUDGET_DECLINED}: epsilon {spent:.3f} already spent of a budget of "
                                     f"{target_epsilon}")

    def eps(sigma: float) -> float:
        return compute_epsilon([*prior, (sigma, sample_rate, steps)], delta, accountant)

    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise PrivacyBudgetExhausted(
                f"{BUDGET_DECLINED}: no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} keeps epsilon within {target_epsilon} "
                f"({spent:.3f} already spent) for {steps} steps at q={sample_rate:.4g}")
    eps_high = eps(high)
    while target_epsilon - eps_high > tolerance:
        mid = (low + high) / 2
        e = eps(mid)
        if e <= target_epsilon:
            high, eps_high = mid, e
        else:
            low = mid
    return high


def poisson_schedule(num_cases: int, batch_size: int) -> tuple[float, int]:
    """Sampling rate ``q`` and steps per epoch for Poisson batches of expected size ``<= batch_size``.

    As Opacus' ``DPDataLoader``: ``ceil(N / B)`` steps per epoch, ``q = 1 / steps`` (``q = B/N`` when
    ``B`` divides ``N``).

    Raises:
        ValueError: ``num_cases`` or ``batch_size`` below 1.
    """
    if num_cases < 1 or batch_size < 1:
        raise ValueError(f"need at least one case and batch_size >= 1, got {num_cases} case(s), batch {batch_size}")
    steps = math.ceil(num_cases / batch_size)
    return 1.0 / steps, steps


# --------------------------------------------------------------------------------------------------
# the ledger


def resolve_ledger_scope(scope: str, *, simulated: bool) -> str:
    """``auto`` -> ``run`` for a simulated site, ``site`` for a deployed one; other scopes unchanged.

    A deployed hospital keeps one ledger for all runs (a patient's lifetime privacy loss). A simulation
    keeps its sites' state in the shared cache folder, where a lifetime ledger would make every repeated
    demo run spend the same synthetic budget until all sites decline.

    Raises:
        ValueError: unknown scope.
    """
    if scope not in LEDGER_SCOPES:
        raise ValueError(f"privacy.ledger_scope must be one of {LEDGER_SCOPES}, got {scope!r}")
    if scope == "auto":
        return "run" if simulated else "site"
    return scope


def ledger_path(state_root: str | Path, run_name: str, scope: str = "site") -> Path:
    """Where a site keeps its ledger: ``<state_root>/privacy-ledger.json`` (``site``) or
    ``<state_root>/<run_name>/privacy-ledger.json`` (``run``).

    Raises:
        ValueError: unknown scope.
    """
    if scope not in ("site", "run"):
        raise ValueError(f"ledger scope must be one of ('site', 'run') (resolve 'auto' first), got {scope!r}")
    root = Path(state_root)
    return root / LEDGER_FILE if scope == "site" else root / str(run_name) / LEDGER_FILE


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class PrivacyLedger:
    """Every private release of one site, persisted as JSON (atomically) in the site's state directory.

    A round is recorded *before* its update leaves the site; a round that is repeated (a server
    resumed after a crash asks again) is recorded again, because the site did release twice.

    Attributes:
        path: the JSON file.
        site: the site's name (for people reading the file).
        delta: target delta, fixed when the first round is recorded (``None`` until then).
        runs: per run: the noise multiplier, sampling rate, clipping norm and planned steps it uses.
        rounds: per released round: ``run``, ``round``, ``noise_multiplier``, ``sample_rate``, ``steps``,
            ``max_grad_norm``, ``num_cases``, ``time``.
    """

    path: Path
    site: str = ""
    delta: float | None = None
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path, site: str = "") -> PrivacyLedger:
        """Load the ledger at ``path``, or start an empty one (written on the first :meth:`save`).

        Raises:
            LedgerError: the file exists but is unreadable or not a ledger (never silently reset:
                that would forget spent budget).
        """
        path = Path(path)
        if not path.exists():
            return cls(path, site=site)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LedgerError(f"{path}: cannot read the privacy ledger ({exc}); refusing to train rather than "
                              "forget the privacy budget already spent") from exc
        if not isinstance(payload, dict) or payload.get("format") != LEDGER_FORMAT:
            raise LedgerError(f"{path}: not a privacy ledger (no '{LEDGER_FORMAT}' header)")
        if payload.get("version", 0) > LEDGER_VERSION:
            raise LedgerError(f"{path}: ledger version {payload['version']} is newer than this code supports")
        try:
            rounds = [dict(r) for r in payload.get("rounds", [])]
            for r in rounds:
                float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"{path}: malformed round entry in the privacy ledger ({exc!r})") from exc
        return cls(path, site=str(payload.get("site", site)), delta=payload.get("delta"),
                   runs=dict(payload.get("runs", {})), rounds=rounds)

    def save(self) -> Path:
        """Write the ledger atomically (a crash never leaves half a file)."""
        return write_json({"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "site": self.site,
                           "delta": self.delta, "runs": self.runs, "rounds": self.rounds}, self.path)

    # ---- what has been spent

    def compositions(self) -> list[Composition]:
        """The recorded releases as ``(noise multiplier, sample rate, steps)``, merged."""
        return _merge([(float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"])) for r in self.rounds])

    @property
    def total_steps(self) -> int:
        """Noisy steps recorded, all rounds."""
        return sum(int(r["steps"]) for r in self.rounds)

    def resolve_delta(self, requested: float | None, num_cases: int) -> float:
        """The ledger's delta; set on first use from ``requested`` or :func:`default_delta`.

        Raises:
            LedgerError: ``requested`` differs from the delta the ledger was started with (epsilons
                at different deltas do not add up to one guarantee).
            ValueError: ``requested`` is not below ``1 / num_cases``.
        """
        if requested is not None and requested >= 1.0 / num_cases:
            raise ValueError(f"privacy.delta={requested} is not below 1/N = {1.0 / num_cases:.3g} for this site's "
                             f"{num_cases} training case(s)")
        if self.delta is None:
            self.delta = float(requested) if requested is not None else default_delta(num_cases)
        elif requested is not None and not math.isclose(requested, self.delta, rel_tol=1e-9):
            raise LedgerError(f"{self.path}: this site's ledger accounts at delta={self.delta}, the config asks for "
                              f"delta={requested}; keep privacy.delta at {self.delta} (or null)")
        return self.delta

    def epsilon(self, accountant: str = ACCOUNTANT_RDP, extra: Sequence[Composition] = (),
                delta: float | None = None) -> float:
        """ε spent (plus ``extra`` planned compositions) with one accountant.

        Raises:
            LedgerError: no delta yet and none given.
        """
        delta = self.delta if delta is None else delta
        if delta is None:
            raise LedgerError(f"{self.path}: the ledger has no delta yet")
        return compute_epsilon([*self.compositions(), *extra], delta, accountant)

    def epsilons(self, delta: float | None = None) -> dict[str, float]:
        """ε spent with every accountant, keyed by accountant name."""
        return {a: self.epsilon(a, delta=delta) for a in ACCOUNTANTS}

    # ---- budget

    def can_afford(self, steps: int, noise_multiplier: float, sample_rate: float, budget: float | None,
                   accountant: str = ACCOUNTANT_RDP) -> bool:
        """Whether ``steps`` more noisy steps keep ε (``accountant``) within ``budget`` (``None``: no budget)."""
        if budget is None:
            return True
        return self.epsilon(accountant, [(noise_multiplier, sample_rate, steps)]) <= budget + 1e-9

    def check_can_afford(self, steps: int, noise_multiplier: float, sample_rate: float, budget: float | None,
                         accountant: str = ACCOUNTANT_RDP) -> None:
        """Raise :class:`PrivacyBudgetExhausted` with the figures if the next round does not fit the budget."""
        if self.can_afford(steps, noise_multiplier, sample_rate, budget, accountant):
            return
        spent = self.epsilon(accountant)
        after = self.epsilon(accountant, [(noise_multiplier, sample_rate, steps)])
        raise PrivacyBudgetExhausted(
            f"site {self.site or self.path.parent.name}: {BUDGET_DECLINED}; the next round ({steps} steps at "
            f"sigma={noise_multiplier:.4g}, q={sample_rate:.4g}) would raise epsilon ({accountant}, "
            f"delta={self.delta:.3g}) from {spent:.3f} to {after:.3f}, above the budget of {budget}; "
            f"declining to train (ledger {self.path}, {len(self.rounds)} round(s), {self.total_steps} steps spent)")

    # ---- recording

    def run_noise(self, run_name: str, settings: DPSettings, *, sample_rate: float, planned_steps: int,
                  num_cases: int) -> float:
        """The run's noise multiplier: given, or calibrated once (first round) and kept in the ledger.

        The calibration spends the budget remaining after whatever the ledger already holds over
        ``planned_steps``; a resumed run reuses the stored value, so its sigma never changes.

        Raises:
            PrivacyBudgetExhausted: the remaining budget is too small for the planned steps.
        """
        delta = self.resolve_delta(settings.delta, num_cases)
        stored = self.runs.get(run_name)
        if stored is not None:
            return float(stored["noise_multiplier"])
        if settings.noise_multiplier is not None:
            sigma, calibrated = float(settings.noise_multiplier), False
        else:
            assert settings.epsilon is not None
            sigma = calibrate_noise_multiplier(settings.epsilon, delta, sample_rate, planned_steps,
                                               prior=self.compositions(), accountant=settings.accountant)
            calibrated = True
        self.runs[run_name] = {"noise_multiplier": sigma, "calibrated": calibrated, "sample_rate": sample_rate,
                               "planned_steps": int(planned_steps), "max_grad_norm": settings.max_grad_norm,
                               "epsilon_budget": settings.epsilon, "accountant": settings.accountant,
                               "num_cases": int(num_cases), "started": _now()}
        self.save()
        return sigma

    def record_round(self, run_name: str, round_idx: int, *, noise_multiplier: float, sample_rate: float,
                     steps: int, max_grad_norm: float, num_cases: int) -> None:
        """Append one released round and write the file.

        Raises:
            LedgerError: no delta yet (call :meth:`resolve_delta` first).
        """
        if self.delta is None:
            raise LedgerError(f"{self.path}: resolve the ledger's delta before recording a round")
        self.rounds.append({"run": str(run_name), "round": int(round_idx), "noise_multiplier": float(noise_multiplier),
                            "sample_rate": float(sample_rate), "steps": int(steps),
                            "max_grad_norm": float(max_grad_norm), "num_cases": int(num_cases), "time": _now()})
        self.save()

    def report(self, *, steps_round: int, noise_multiplier: float, sample_rate: float, max_grad_norm: float,
               budget: float | None, accountant: str = ACCOUNTANT_RDP) -> dict[str, float]:
        """The flat scalars a site sends with its update (:data:`REPORT_KEYS`, the budget only when there is
        one); every ε is cumulative over the ledger and finite."""
        eps = self.epsilons()
        out = {DP_NOISE_MULTIPLIER: float(noise_multiplier), DP_SAMPLE_RATE: float(sample_rate),
               DP_MAX_GRAD_NORM: float(max_grad_norm), DP_DELTA: float(self.delta or math.nan),
               DP_STEPS_ROUND: float(steps_round), DP_STEPS_TOTAL: float(self.total_steps),
               DP_EPSILON: eps[accountant]}
        out.update({EPSILON_KEYS[a]: v for a, v in eps.items()})
        if budget is not None:  # no Infinity in history.json: the key is left out when there is no budget
            out[DP_EPSILON_BUDGET] = float(budget)
        return out


# --------------------------------------------------------------------------------------------------
# fast, exact per-sample gradients (registered on our own GradSampleModule subclass only)


def _conv_input(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The input as the convolution sees it, and the padding left to the convolution itself."""
    sd = x.dim() - 2
    if isinstance(layer.padding, str) or getattr(layer, "padding_mode", "zeros") != "zeros":
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=mode), [0] * sd
    return x, list(layer.padding)


@dataclass(frozen=True)
class _ConvGeometry:
    """A (transposed) convolution's arguments for ``aten.convolution_backward``."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    transposed: bool
    output_padding: tuple[int, ...]
    groups: int

    def weight_grad(self, gy: torch.Tensor, x: torch.Tensor, weight_shape: Sequence[int], groups: int) -> torch.Tensor:
        weight = x.new_empty(tuple(weight_shape))  # only its shape is read
        _, grad_weight, _ = torch.ops.aten.convolution_backward(
            gy, x, weight, None, list(self.stride), list(self.padding), list(self.dilation), self.transposed,
            list(self.output_padding), groups, [False, True, False])
        return grad_weight


def _grouped(geo: _ConvGeometry, x: torch.Tensor, gy: torch.Tensor, weight_shape: Sequence[int]) -> torch.Tensor:
    """The batch folded into channels and groups: group ``b`` sees only sample ``b``, so the weight gradient
    of that one grouped convolution is the stack of per-sample gradients."""
    n = x.shape[0]
    gw = geo.weight_grad(gy.reshape(1, -1, *gy.shape[2:]), x.reshape(1, -1, *x.shape[2:]),
                         (n * weight_shape[0], *weight_shape[1:]), geo.groups * n)
    return gw.view(n, *weight_shape)


def _one_by_one(geo: _ConvGeometry, x: torch.Tensor, gy: torch.Tensor, weight_shape: Sequence[int]) -> torch.Tensor:
    """One weight-gradient call per sample."""
    return torch.stack([geo.weight_grad(gy[i : i + 1], x[i : i + 1], weight_shape, geo.groups)
                        for i in range(x.shape[0])])


def _dense(geo: _ConvGeometry, x: torch.Tensor, gy: torch.Tensor, weight_shape: Sequence[int]) -> torch.Tensor:
    """The batch folded into channels *without* groups: every (sample, sample) block is computed and the
    diagonal kept (n times the work, but a dense kernel; pays for very few channels and small batches)."""
    n, o, i = x.shape[0], weight_shape[0], weight_shape[1]
    gw = geo.weight_grad(gy.reshape(1, -1, *gy.shape[2:]), x.reshape(1, -1, *x.shape[2:]),
                         (n * o, n * i, *weight_shape[2:]), 1)
    gw = gw.view(n, o, n, i, *weight_shape[2:])
    return torch.stack([gw[b, :, b] for b in range(n)])


#: how a layer's per-sample weight gradients are computed, chosen once per shape (like cudnn.benchmark):
#: all are exact; which is fastest depends on the convolution backend, channels and batch size
_WEIGHT_GRAD_METHODS = {"grouped": _grouped, "one_by_one": _one_by_one, "dense": _dense}
_CHOSEN_METHOD: dict[tuple, str] = {}


def _fastest(geo: _ConvGeometry, x: torch.Tensor, gy: torch.Tensor, weight_shape: Sequence[int]) -> str:
    candidates = ["grouped", "one_by_one"]
    if geo.groups == 1 and x.shape[0] <= 4:
        candidates.append("dense")
    best, best_s = "grouped", math.inf
    for name in candidates:
        fn = _WEIGHT_GRAD_METHODS[name]
        fn(geo, x, gy, weight_shape)  # warm-up (backend primitive creation)
        seconds = math.inf
        for _ in range(2):
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            fn(geo, x, gy, weight_shape)
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            seconds = min(seconds, time.perf_counter() - start)
        if seconds < best_s:
            best, best_s = name, seconds
    return best


def _per_sample_weight_grad(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor,
                            weight_shape: Sequence[int]) -> torch.Tensor:
    """``[n, *weight_shape]``: each sample's weight gradient of a (transposed) convolution, computed by
    PyTorch's own convolution backward (one of :data:`_WEIGHT_GRAD_METHODS`, the fastest for the shape)."""
    sd = x.dim() - 2
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):  # output_padding from the shapes (forward may
        stride, pad, dil, k = layer.stride, layer.padding, layer.dilation, layer.kernel_size  # get output_size)
        out_pad = tuple(gy.shape[2 + i] - ((x.shape[2 + i] - 1) * stride[i] - 2 * pad[i] + dil[i] * (k[i] - 1) + 1)
                        for i in range(sd))
        geo = _ConvGeometry(tuple(stride), tuple(pad), tuple(dil), True, out_pad, layer.groups)
    else:
        x, padding = _conv_input(layer, x)
        geo = _ConvGeometry(tuple(layer.stride), tuple(padding), tuple(layer.dilation), False, (0,) * sd,
                            layer.groups)
    n = x.shape[0]  # Poisson batches vary in size: time once per power-of-two bucket, not per size
    bucket = n if n <= 4 else 1 << (n - 1).bit_length()
    key = (geo, tuple(weight_shape), bucket, tuple(x.shape[1:]), tuple(gy.shape[1:]), x.device, x.dtype)
    method = _CHOSEN_METHOD.get(key)
    if method is None:
        method = _CHOSEN_METHOD[key] = _fastest(geo, x, gy, weight_shape) if AUTOTUNE_WEIGHT_GRADS else "grouped"
    return _WEIGHT_GRAD_METHODS[method](geo, x, gy, weight_shape)


def conv_grad_sample(layer: nn.Module, activations: Sequence[torch.Tensor],
                     backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of ``Conv{1,2,3}d`` and ``ConvTranspose{1,2,3}d`` (any stride, padding,
    dilation, groups, padding mode, memory layout).

    Args:
        activations: ``[x]``, the layer input ``[n, C_in, *S]``.
        backprops: gradient of the loss w.r.t. the layer output ``[n, C_out, *S']`` (already scaled
            per sample by Opacus).
    """
    x = activations[0].to(backprops.dtype)
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        out[layer.weight] = _per_sample_weight_grad(layer, x, backprops, layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.flatten(2).sum(2)
    return out


#: the epsilon TransUNet's weight standardisation uses (read from the function, so they cannot drift)
_STANDARDIZE_EPS = float(inspect.signature(_standardize).parameters["eps"].default)


def std_conv_grad_sample(layer: nn.Module, activations: Sequence[torch.Tensor],
                         backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the weight-standardised convolutions of TransUNet's ResNet.

    The per-sample gradient ``G`` w.r.t. the standardised weight ``w^ = (w - mean) / s`` (a plain
    convolution's) is mapped back through the standardisation per output filter, as a normalisation
    backward: ``dw = (G - mean(G) - w^ mean(G w^)) / s`` with ``s = sqrt(var + eps)``.
    """
    x = activations[0].to(backprops.dtype)
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        grad_std = _per_sample_weight_grad(layer, x, backprops, layer.weight.shape)  # [n, O, I, *k]
        w = layer.weight.detach().to(grad_std.dtype)
        dims = tuple(range(1, w.dim()))
        var, mean = torch.var_mean(w, dim=dims, keepdim=True, unbiased=False)
        s = torch.sqrt(var + _STANDARDIZE_EPS)
        w_hat = (w - mean) / s
        per_filter = tuple(d + 1 for d in dims)
        out[layer.weight] = (grad_std - grad_std.mean(per_filter, keepdim=True)
                             - w_hat * (grad_std * w_hat).mean(per_filter, keepdim=True)) / s
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.flatten(2).sum(2)
    return out


def prelu_grad_sample(layer: nn.PReLU, activations: Sequence[torch.Tensor],
                      backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient of ``PReLU`` (MONAI's default activation): ``sum(dL/dy * min(x, 0))`` over
    positions (and channels when the slope is shared). Opacus has none and would use ``torch.func``."""
    x = activations[0].to(backprops.dtype)
    g = backprops * x.clamp(max=0)
    n = x.shape[0]
    if layer.weight.numel() == 1:
        return {layer.weight: g.reshape(n, -1).sum(1, keepdim=True)}
    return {layer.weight: g.flatten(2).sum(2) if g.dim() > 2 else g}


#: our grad samplers, by exact module type
FAST_GRAD_SAMPLERS: dict[type[nn.Module], Callable] = {
    nn.Conv1d: conv_grad_sample, nn.Conv2d: conv_grad_sample, nn.Conv3d: conv_grad_sample,
    nn.ConvTranspose1d: conv_grad_sample, nn.ConvTranspose2d: conv_grad_sample, nn.ConvTranspose3d: conv_grad_sample,
    StdConv2d: std_conv_grad_sample, StdConv3d: std_conv_grad_sample,
    nn.PReLU: prelu_grad_sample,
}


def _scaled(sampler: Callable) -> Callable:
    """A grad sampler whose per-sample gradients are multiplied by ``layer._medseg_grad_scale`` (see
    :meth:`FastGradSampleModule.rearrange_grad_samples`)."""

    def scaled_sampler(layer, activations, backprops):
        grads = sampler(layer, activations, backprops)
        scale = layer.__dict__.get("_medseg_grad_scale")
        return {p: g * scale for p, g in grads.items()} if scale not in (None, 1) else grads

    scaled_sampler.__wrapped__ = sampler
    return scaled_sampler


#: module types whose (per-sample) weight gradients our samplers compute without autograd's help
_CONV_TYPES = (nn.modules.conv._ConvNd,)


class FastGradSampleModule(GradSampleModule):
    """Opacus' hooks-based ``GradSampleModule`` with :data:`FAST_GRAD_SAMPLERS` and three savings.

    1. **No wasted weight gradients.** DP-SGD replaces ``p.grad`` by the noisy sum of clipped per-sample
       gradients, so autograd's own weight gradient of a convolution is thrown away. While a convolution
       runs (with an input that requires grad), its parameters are taken out of autograd; the layer's
       full backward hook still receives the output gradient, and our sampler computes the per-sample
       weight gradients from it. Backward then computes only input gradients for those layers.
    2. **Scaling the small tensor.** Opacus multiplies every layer's output gradient by the batch size
       (``loss_reduction="mean"``); here the per-sample gradients (far smaller) are scaled instead.
    3. **float32 per-sample gradients** under bf16/fp16 autocast, so clipping norms are not rounded.

    The samplers live on this class only: stock Opacus elsewhere in the process is untouched.
    """

    GRAD_SAMPLERS = {t: _scaled(f) for t, f in {**GradSampleModule.GRAD_SAMPLERS, **FAST_GRAD_SAMPLERS}.items()}

    def __init__(self, m: nn.Module, *, loss_reduction: str = "mean", **kwargs: Any) -> None:
        super().__init__(m, loss_reduction=loss_reduction, **kwargs)
        self._frozen: list[nn.Parameter] = []
        self._freeze_handles = []
        for module in self._module.modules():
            if isinstance(module, _CONV_TYPES) and type(module) in self.GRAD_SAMPLERS:
                self._freeze_handles += [module.register_forward_pre_hook(self._freeze_weights),
                                         module.register_forward_hook(self._thaw_weights, prepend=True)]

    def _freeze_weights(self, module: nn.Module, inputs: tuple) -> None:
        if not (self.hooks_enabled and module.training and torch.is_grad_enabled()):
            return
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            return  # the first layer: without a weight gradient nothing would flow back to its hooks
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        self._frozen += params

    def _thaw_weights(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        # runs before Opacus' own forward hook, which only records layers whose parameters require grad
        for p in module.parameters(recurse=False):
            if any(p is q for q in self._frozen):
                p.requires_grad_(True)
        self._frozen = [q for q in self._frozen if not q.requires_grad]

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        try:
            return super().forward(*args, **kwargs)
        finally:  # an exception inside a layer must not leave its weights out of autograd
            for p in self._frozen:
                p.requires_grad_(True)
            self._frozen = []

    def rearrange_grad_samples(self, *, module, backprops, loss_reduction, batch_first):  # noqa: D102
        ours = loss_reduction == "mean" and not self.force_functorch and type(module) in self.GRAD_SAMPLERS
        activations, backprops = super().rearrange_grad_samples(
            module=module, backprops=backprops, loss_reduction="sum" if ours else loss_reduction,
            batch_first=batch_first)
        module._medseg_grad_scale = module.max_batch_len if ours else None
        if backprops.dtype in (torch.bfloat16, torch.float16):
            backprops = backprops.float()
            activations = [a.float() if torch.is_floating_point(a) else a for a in activations]
        return activations, backprops

    def _close(self) -> None:  # noqa: D102
        for handle in self._freeze_handles:
            handle.remove()
        self._freeze_handles = []
        for module in self._module.modules():
            module.__dict__.pop("_medseg_grad_scale", None)
        super()._close()


class PrivateOptimizer(DPOptimizer):
    """Opacus' ``DPOptimizer``; its ``scale_grad`` recomputed ``accumulated_iterations`` (a pass over every
    parameter) once per parameter, quadratic in the number of parameter tensors."""

    def scale_grad(self) -> None:  # noqa: D102
        if self.loss_reduction == "mean":
            denominator = self.expected_batch_size * self.accumulated_iterations
            for p in self.params:
                p.grad /= denominator


def wrap_model(model: nn.Module, grad_sample_mode: str = "fast") -> GradSampleModule:
    """The model with per-sample gradient hooks (``loss_reduction="mean"``: our losses average per-sample
    losses over the batch).

    Raises:
        ValueError: unknown mode, or a model that is not DP-compatible (every problem listed).
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
    problems = dp_problems(model)
    if problems:
        raise ValueError(f"{type(model).__name__} is not DP-compatible (build it with dp_compatible=True):\n  "
                         + "\n  ".join(problems))
    if grad_sample_mode == "fast":
        return FastGradSampleModule(model, loss_reduction="mean")
    return GradSampleModule(model, loss_reduction="mean", force_functorch=grad_sample_mode == "functorch")


# --------------------------------------------------------------------------------------------------
# Poisson sampling of patients


def _collate(items: list) -> dict[str, Any]:
    """MONAI's ``list_data_collate``; an empty Poisson batch becomes ``{"image": empty, ...}``."""
    if not items:
        return {"image": torch.empty(0), "label": torch.empty(0, dtype=torch.long), "case_id": []}
    return list_data_collate(items)


def dp_generators(settings: DPSettings, device: torch.device | str = "cpu") -> tuple[torch.Generator, torch.Generator]:
    """Generators for DP noise (on ``device``) and for Poisson sampling (CPU), both secret.

    Seeded from OS entropy, or from ``settings.seed`` (reproducible tests, not private); with
    ``secure_mode`` both are ``torchcsprng``'s cryptographically secure generator, as in Opacus.

    Raises:
        ValueError: ``secure_mode`` without ``torchcsprng`` installed.
    """
    if settings.secure_mode:
        try:
            import torchcsprng
        except ImportError as exc:
            raise ValueError("privacy.secure_mode=true needs the torchcsprng package (pip install torchcsprng)") from exc
        rng = torchcsprng.create_random_device_generator("/dev/urandom")
        return rng, rng
    if settings.seed is None:
        seeds = (secrets.randbits(63), secrets.randbits(63))
    else:
        seeds = (int(settings.seed), int(settings.seed) + 1)
    return torch.Generator(device=device).manual_seed(seeds[0]), torch.Generator().manual_seed(seeds[1])


class PoissonCaseLoader:
    """Poisson-sampled batches of cases (one crop each) over a site's training dataset.

    Each of ``steps_per_epoch`` steps draws every case independently with probability ``sample_rate``.
    A batch without any case is not yielded: :attr:`on_empty` is called instead (the private optimiser's
    noise-only step), so the engine sees only non-empty batches while every sampling step is taken
    and accounted.

    Args:
        dataset: one item per patient, yielding one crop (a dict, or a list of one dict).
        sample_rate: ``q``.
        steps_per_epoch: sampling steps per pass.
        generator: sampling randomness (secret: see :func:`dp_generators`).
        num_workers: DataLoader workers.

    Raises:
        ValueError: an empty dataset or ``sample_rate`` outside (0, 1].
    """

    def __init__(self, dataset, sample_rate: float, steps_per_epoch: int, generator: torch.Generator,
                 num_workers: int = 0) -> None:
        if len(dataset) < 1:
            raise ValueError("the training dataset is empty")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.dataset = dataset
        self.sample_rate = float(sample_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.batch_sampler = UniformWithReplacementSampler(num_samples=len(dataset), sample_rate=sample_rate,
                                                           generator=generator, steps=steps_per_epoch)
        self.loader = DataLoader(dataset, batch_sampler=self.batch_sampler, collate_fn=_collate,
                                 num_workers=num_workers)
        self.on_empty: Callable[[], None] | None = None
        self.empty_batches = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            image = batch["image"]
            if image.shape[0] == 0:
                self.empty_batches += 1
                if self.on_empty is None:
                    raise RuntimeError("an empty Poisson batch needs a noise-only step, but no optimiser is attached")
                self.on_empty()
                continue
            ids = list(batch.get("case_id", []))
            if ids and len(set(ids)) != image.shape[0]:
                raise ValueError(f"a batch of {len(set(ids))} case(s) holds {image.shape[0]} crops: DP-SGD needs "
                                 "exactly one crop per patient per step (transforms.crop.num_samples=1)")
            yield batch


# --------------------------------------------------------------------------------------------------
# the private training of one round


@dataclass
class PrivateTraining:
    """What :func:`make_private` returns: pass ``model``, ``optimizer`` and ``loader`` to the engine.

    Attributes:
        model: the network with per-sample gradient hooks (a ``GradSampleModule``; its
            ``state_dict`` keys are prefixed ``_module.``, use :attr:`module` for the plain one).
        optimizer: Opacus' ``DPOptimizer`` (clips each patient's gradient, adds noise, counts steps).
        loader: Poisson batches of cases, noise-only steps on empty draws.
        settings: the settings used.
        ledger: the site's ledger.
        run_name: the run these rounds belong to.
        noise_multiplier, sample_rate, steps_per_epoch, round_epochs: this round's mechanism.
        steps: noisy steps taken so far (empty batches included).
    """

    model: GradSampleModule
    optimizer: DPOptimizer
    loader: PoissonCaseLoader
    settings: DPSettings
    ledger: PrivacyLedger
    run_name: str
    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int
    round_epochs: int
    num_cases: int
    steps: int = 0
    committed: bool = False

    @property
    def module(self) -> nn.Module:
        """The wrapped network (its ``state_dict`` has the original keys)."""
        return self.model._module

    @property
    def planned_steps(self) -> int:
        """Noisy steps this round will take."""
        return self.round_epochs * self.steps_per_epoch

    def noise_only_step(self) -> None:
        """One DP-SGD step without any patient: zero clipped sum plus noise (what an empty batch is)."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def commit(self, round_idx: int) -> dict[str, float]:
        """Record this round's steps in the ledger (written to disk) and return the scalars to report.

        Call after training and before the update leaves the site.

        Raises:
            RuntimeError: committed twice.
        """
        if self.committed:
            raise RuntimeError(f"round {round_idx} was already recorded in the privacy ledger")
        self.ledger.record_round(self.run_name, round_idx, noise_multiplier=self.noise_multiplier,
                                 sample_rate=self.sample_rate, steps=self.steps,
                                 max_grad_norm=self.settings.max_grad_norm, num_cases=self.num_cases)
        self.committed = True
        return self.ledger.report(steps_round=self.steps, noise_multiplier=self.noise_multiplier,
                                  sample_rate=self.sample_rate, max_grad_norm=self.settings.max_grad_norm,
                                  budget=self.settings.epsilon, accountant=self.settings.accountant)

    def close(self) -> None:
        """Remove the per-sample gradient hooks from the network."""
        self.model._close()


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, loader, settings: DPSettings, *,
                 ledger: PrivacyLedger, run_name: str, planned_epochs: int, round_epochs: int,
                 batch_size: int | None = None,
                 grad_correction: Callable[[nn.Module], None] | None = None) -> PrivateTraining:
    """Make one round of a site's training patient-level differentially private.

    Checks the budget *before* anything is trained: the round's ``round_epochs * steps_per_epoch``
    steps must fit (:meth:`PrivacyLedger.check_can_afford`).

    Args:
        model: the DP-compatible network (``dp_compatible=True``), on its device.
        optimizer: its optimiser (any torch optimiser).
        loader: the site's training loader (``build_site_loaders(...).train``): its ``dataset`` (one item
            per case), ``batch_size`` (the expected Poisson batch size) and ``num_workers`` are used.
        settings: :class:`DPSettings`.
        ledger: the site's :class:`PrivacyLedger`.
        run_name: the run (its sigma is calibrated once and kept in the ledger).
        planned_epochs: local epochs over the whole run (rounds x local epochs), for calibration.
        round_epochs: local epochs this round.
        batch_size: expected batch size (default: ``loader.batch_size``).
        grad_correction: a data-independent gradient term applied after clipping and noise, e.g.
            FedProx's ``mu (w - w_global)`` or SCAFFOLD's ``c - c_i`` (``model -> None``, adds to ``p.grad``);
            the engine's ``extra_loss``/``grad_hook`` would be overwritten by the private optimiser.

    Returns:
        :class:`PrivateTraining`; give its ``model``, ``optimizer``, ``loader`` to ``train_one_epoch``
        with ``grad_clip_norm=None`` for ``round_epochs`` epochs (a step beyond the planned ones raises
        ``RuntimeError``), then call ``commit(round_idx)``.

    Raises:
        PrivacyBudgetExhausted: the round would exceed the budget (no model, optimiser or spending changed).
        ValueError: a model that is not DP-compatible, a dataset whose items are not single cases, bad
            arguments.
    """
    if planned_epochs < round_epochs or round_epochs < 1:
        raise ValueError(f"need 1 <= round_epochs <= planned_epochs, got {round_epochs} and {planned_epochs}")
    dataset = loader.dataset
    num_cases = len(dataset)
    batch_size = int(batch_size or getattr(loader, "batch_size", None) or 1)
    sample_rate, steps_per_epoch = poisson_schedule(num_cases, batch_size)
    sigma = ledger.run_noise(run_name, settings, sample_rate=sample_rate,
                             planned_steps=planned_epochs * steps_per_epoch, num_cases=num_cases)
    stored_q = float(ledger.runs[run_name]["sample_rate"])
    if not math.isclose(stored_q, sample_rate, rel_tol=1e-12):
        warnings.warn(f"run {run_name}: the sampling rate changed from {stored_q:.4g} to {sample_rate:.4g} "
                      "(different number of training cases); epsilon is accounted at the new rate", stacklevel=2)
    ledger.check_can_afford(round_epochs * steps_per_epoch, sigma, sample_rate, settings.epsilon, settings.accountant)

    device = next(model.parameters()).device
    generator, sampling_generator = dp_generators(settings, device)
    gsm = wrap_model(model, settings.grad_sample_mode)
    dp_optimizer = PrivateOptimizer(optimizer, noise_multiplier=sigma, max_grad_norm=settings.max_grad_norm,
                                    expected_batch_size=max(1, round(sample_rate * num_cases)),
                                    loss_reduction="mean", generator=generator, secure_mode=settings.secure_mode)
    dp_loader = PoissonCaseLoader(dataset, sample_rate, steps_per_epoch, sampling_generator,
                                  num_workers=int(getattr(loader, "num_workers", 0) or 0))
    private = PrivateTraining(gsm, dp_optimizer, dp_loader, settings, ledger, run_name, sigma, sample_rate,
                              steps_per_epoch, round_epochs, num_cases)

    def after_noise(_optimizer: DPOptimizer) -> None:  # Opacus calls this once per noisy step, before the update
        if private.steps >= private.planned_steps:  # the budget was checked for the planned steps only
            raise RuntimeError(f"run {run_name}: step {private.steps + 1} of a round planned (and budgeted) for "
                               f"{private.planned_steps} steps; make_private a new round instead")
        private.steps += 1
        if grad_correction is not None:
            grad_correction(model)

    dp_optimizer.attach_step_hook(after_noise)
    dp_loader.on_empty = private.noise_only_step
    return private
