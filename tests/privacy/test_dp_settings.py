"""DP settings and configuration: bad values are refused with the value named; privacy=dp makes the
rest of the configuration DP-safe, and later overrides that break it are refused; the privacy group's
options combine (sample-level DP, client-level DP, secure aggregation)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from client.privacy import DPSettings, check_training_config, default_delta
from medseg_core.config import compose_config


def _cfg(*overrides: str) -> dict:
    return OmegaConf.to_container(compose_config("fl", list(overrides)), resolve=True)


@pytest.mark.parametrize("kwargs,match", [
    ({"noise_multiplier": -1.0}, r"privacy.noise_multiplier must be a finite number > 0, got -1.0"),
    ({"epsilon": 0}, r"privacy.epsilon must be a finite number > 0, got 0"),
    ({"epsilon": float("inf")}, r"privacy.epsilon must be a finite number > 0, got inf"),
    ({"max_grad_norm": "1"}, r"privacy.max_grad_norm must be a finite number > 0, got '1'"),
    ({"delta": 1.0}, r"privacy.delta must be in \(0, 1\) or null, got 1.0"),
    ({"noise_multiplier": None, "epsilon": None}, "set noise_multiplier, or an epsilon budget"),
    ({"accountant": "gdp"}, r"privacy.accountant must be one of \('rdp', 'rdp_classic', 'prv'\), got 'gdp'"),
    ({"grad_sample_mode": "ghost"}, r"privacy.grad_sample_mode must be one of .*got 'ghost'"),
    ({"ledger_scope": "global"}, r"privacy.ledger_scope must be one of .*got 'global'"),
    ({"seed": 1.5}, r"privacy.seed must be an integer or null, got 1.5"),
])
def test_bad_settings_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPSettings(**kwargs)


def test_from_config():
    assert DPSettings.from_config(None) is None
    assert DPSettings.from_config({"mode": "none"}) is None
    assert DPSettings.from_config({"secagg": {"num_shares": 1.0}}) is None  # server-side options only
    s = DPSettings.from_config({"mode": "dp", "noise_multiplier": 1.2, "epsilon": None, "client_dp": {}})
    assert s.noise_multiplier == 1.2 and s.epsilon is None
    with pytest.raises(ValueError, match="privacy.mode must be 'none' or 'dp', got 'local'"):
        DPSettings.from_config({"mode": "local"})
    with pytest.raises(ValueError, match=r"unknown privacy setting\(s\) \['epsilonn'\]"):
        DPSettings.from_config({"mode": "dp", "epsilonn": 3})
    assert default_delta(100) == pytest.approx(1e-3)


def test_privacy_dp_makes_the_configuration_dp_safe():
    plain = _cfg()
    assert plain["transforms"]["crop"]["num_samples"] != 1  # what dp.yaml has to change
    cfg = _cfg("privacy=dp")
    assert cfg["privacy"]["mode"] == "dp"
    assert cfg["transforms"]["crop"]["num_samples"] == 1
    assert cfg["train"]["channels_last"] is False and cfg["train"]["grad_clip_norm"] is None
    assert cfg["model"]["dp_compatible"] is True
    check_training_config(cfg)
    check_training_config(plain)  # no DP: nothing to check
    assert DPSettings.from_config(cfg["privacy"]) == DPSettings()


def test_options_of_the_privacy_group_combine():
    cfg = _cfg("privacy=[dp,client_dp_fixed,secagg]")
    assert cfg["privacy"]["mode"] == "dp"
    assert cfg["privacy"]["client_dp"]["clipping"] == "fixed" and cfg["privacy"]["client_dp"]["side"] == "client"
    assert cfg["privacy"]["secagg"]["reconstruction_threshold"] == 0.67
    assert DPSettings.from_config(cfg["privacy"]) is not None
    assert _cfg("privacy=client_dp_adaptive")["privacy"]["client_dp"]["clipping"] == "adaptive"
    assert DPSettings.from_config(_cfg("privacy=[none,secagg]")["privacy"]) is None


def test_overrides_that_break_dp_are_refused_with_the_fix():
    cfg = _cfg("privacy=dp", "transforms.crop.num_samples=2", "train.channels_last=true",
               "model.dp_compatible=false", "strategy=fedprox", "privacy.grad_sample_mode=hooks", "train.amp=true")
    with pytest.raises(ValueError) as info:
        check_training_config(cfg)
    text = str(info.value)
    for fix in ("set transforms.crop.num_samples=1", "set train.channels_last=false", "set model.dp_compatible=true",
                "strategy=fedprox: its client-side gradient term would be discarded",
                "use privacy.grad_sample_mode=fast or train.amp=false"):
        assert fix in text
