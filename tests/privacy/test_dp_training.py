"""Private training rounds end to end: make_private + the unchanged engine on real MONAI loaders of a
synthetic site, for every model family that supports DP; empty Poisson batches are noisy steps and are
accounted; the noise is not derived from the run's seed; the budget is checked before anything trains."""

from __future__ import annotations

import math

import pytest
import torch

from client.privacy import (
    DP_STEPS_ROUND,
    DP_STEPS_TOTAL,
    DPSettings,
    PrivacyBudgetExhausted,
    PrivacyLedger,
    make_private,
)
from medseg_core.data.dataset import load_site, site_dirs
from medseg_core.data.fingerprint import plan_federation
from medseg_core.data.loaders import LoaderSettings, build_site_loaders
from medseg_core.engine import train_one_epoch
from medseg_core.losses import build_loss
from medseg_core.models import build_model, get_model_spec, list_models, tiny_config

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Using a non-full backward hook:UserWarning"),
]

CPU = torch.device("cpu")
# one case per family (and both TransUNet 2D encoders); V-Net 3D (46 M parameters) would take minutes
FAMILY_CASES = [("dynunet", 3), ("transunet3d", 3), ("transunet_r50_vit_b16", 2), ("transunet_vit_b16", 2),
                ("unet", 3), ("unet", 2), ("unetpp", 3), ("unetr", 3), ("vnet", 2)]


@pytest.fixture(scope="module")
def site_and_plan(synth_fed):
    sites = [load_site(d) for d in site_dirs(synth_fed)]
    _, _, plan = plan_federation(sites)
    return sites[0], plan


@pytest.fixture(scope="module")
def loaders(site_and_plan):
    """Training loaders (4 cases, one crop each) of site 0, 3D and 2D, built once."""
    site, plan = site_and_plan
    return {sd: build_site_loaders(site, plan, settings=LoaderSettings(batch_size=2, spatial_dims=sd),
                                   transforms_cfg={"crop": {"num_samples": 1}}).train for sd in (2, 3)}


def _model(name: str, spatial_dims: int, site) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, in_channels=site.num_channels, out_channels=site.num_classes, dp_compatible=True,
                       **tiny_config(name, spatial_dims))


def _private(model, loader, tmp_path, *, epochs: int = 1, **settings):
    settings = DPSettings(**{"noise_multiplier": 1.0, "epsilon": None, "seed": 0, **settings})
    ledger = PrivacyLedger.open(tmp_path / "privacy-ledger.json", site="site_00")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return make_private(model, opt, loader, settings, ledger=ledger, run_name="run", planned_epochs=epochs,
                        round_epochs=epochs)


def test_every_dp_family_is_covered():
    families = {n for n in list_models() if get_model_spec(n).dp_unsupported is None}
    assert families == {n for n, _ in FAMILY_CASES}


@pytest.mark.parametrize("name,spatial_dims", FAMILY_CASES, ids=[f"{n}-{d}d" for n, d in FAMILY_CASES])
def test_one_private_round_per_model_family(name, spatial_dims, site_and_plan, loaders, tmp_path):
    site, _ = site_and_plan
    model = _model(name, spatial_dims, site)
    before = [p.detach().clone() for p in model.parameters()]
    private = _private(model, loaders[spatial_dims], tmp_path)
    stats = train_one_epoch(private.model, private.loader, build_loss("dice_ce"), private.optimizer, device=CPU,
                            grad_clip_norm=None)
    assert private.steps == private.planned_steps == 2  # 4 cases, expected batch 2
    assert stats["num_steps"] + private.loader.empty_batches == 2
    assert math.isfinite(stats["loss"]) or stats["num_steps"] == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # noise moves all
    private.close()


def test_swin_unetr_cannot_train_under_dp():
    with pytest.raises(ValueError, match="cannot be made DP-compatible: shifted-window attention"):
        build_model("swin_unetr", in_channels=1, out_channels=2, dp_compatible=True, **tiny_config("swin_unetr", 3))


def test_empty_poisson_batches_are_noisy_steps_and_are_accounted(site_and_plan, tmp_path):
    """batch 1 of 4 cases: q = 1/4, 4 steps per epoch, P(empty batch) = 0.32. The engine skips empty
    batches; the private loader takes their noise-only step, so the ledger counts every step."""
    site, plan = site_and_plan
    loader = build_site_loaders(site, plan, settings=LoaderSettings(batch_size=1, spatial_dims=2),
                                transforms_cfg={"crop": {"num_samples": 1}}).train
    model = _model("unet", 2, site)
    private = _private(model, loader, tmp_path, epochs=3)
    calls = []
    private.optimizer.step_hook, hook = None, private.optimizer.step_hook
    private.optimizer.attach_step_hook(lambda opt: (calls.append(1), hook(opt)))
    engine_steps = sum(train_one_epoch(private.model, private.loader, build_loss("dice_ce"), private.optimizer,
                                       device=CPU)["num_steps"] for _ in range(3))
    assert private.loader.empty_batches > 0, "seed 0 draws no empty batch: pick another seed"
    assert private.steps == len(calls) == 12 == engine_steps + private.loader.empty_batches
    report = private.commit(1)
    assert report[DP_STEPS_ROUND] == report[DP_STEPS_TOTAL] == 12
    assert PrivacyLedger.open(tmp_path / "privacy-ledger.json").total_steps == 12
    with pytest.raises(RuntimeError, match="already recorded"):
        private.commit(1)


def test_noise_only_step_moves_the_weights_by_noise(site_and_plan, loaders, tmp_path):
    site, _ = site_and_plan
    model = _model("unet", 2, site)
    private = _private(model, loaders[2], tmp_path)
    before = [p.detach().clone() for p in model.parameters()]
    private.noise_only_step()
    moved = [(p - b).abs().max().item() for p, b in zip(model.parameters(), before, strict=True)]
    assert all(m > 0 for m in moved) and private.steps == 1


def test_noise_does_not_come_from_the_runs_seed(site_and_plan, loaders, tmp_path):
    """The run seeds torch from a value the server knows; DP noise must not follow it."""
    site, _ = site_and_plan

    def train(seed):
        torch.manual_seed(1234)  # what the client does with round_seed(...)
        model = _model("unet", 2, site)
        private = _private(model, loaders[2], tmp_path / str(seed), seed=seed)
        private.noise_only_step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(train(7), train(7))  # an explicit seed (tests only) is reproducible
    assert not torch.equal(train(None), train(None))  # the default draws from OS entropy


def test_budget_is_checked_before_training(site_and_plan, loaders, tmp_path):
    site, _ = site_and_plan
    ledger = PrivacyLedger.open(tmp_path / "privacy-ledger.json", site="site_00")
    ledger.resolve_delta(None, num_cases=4)
    ledger.record_round("earlier", 1, noise_multiplier=1.0, sample_rate=0.5, steps=40, max_grad_norm=1.0,
                        num_cases=4)
    model = _model("unet", 2, site)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(PrivacyBudgetExhausted, match="site site_00: privacy budget reached"):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loaders[2],
                     DPSettings(noise_multiplier=1.0, epsilon=ledger.epsilon() + 0.1), ledger=ledger,
                     run_name="run", planned_epochs=5, round_epochs=1)
    assert len(PrivacyLedger.open(ledger.path).rounds) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_data_independent_gradient_terms_are_applied_after_the_noise(site_and_plan, loaders, tmp_path):
    """FedProx / SCAFFOLD terms go through grad_correction (the engine's hooks act before Opacus
    replaces p.grad): it runs once per noisy step, on the private gradient."""
    site, _ = site_and_plan
    model = _model("unet", 2, site)
    seen = []

    def correction(m):
        seen.append(all(p.grad is not None for p in m.parameters()))

    settings = DPSettings(noise_multiplier=1.0, epsilon=None, seed=0)
    ledger = PrivacyLedger.open(tmp_path / "privacy-ledger.json")
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loaders[2], settings, ledger=ledger,
                           run_name="r", planned_epochs=1, round_epochs=1, grad_correction=correction)
    train_one_epoch(private.model, private.loader, build_loss("dice_ce"), private.optimizer, device=CPU)
    assert seen == [True] * private.steps and private.steps == 2


def test_more_than_one_crop_per_patient_is_refused(site_and_plan, tmp_path):
    site, plan = site_and_plan
    loader = build_site_loaders(site, plan, settings=LoaderSettings(batch_size=4, spatial_dims=2),
                                transforms_cfg={"crop": {"num_samples": 2}}).train
    private = _private(_model("unet", 2, site), loader, tmp_path)
    with pytest.raises(ValueError, match=r"holds \d+ crops: DP-SGD needs exactly one crop per patient"):
        next(iter(private.loader))


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_stock_opacus_grad_sample_modes_train_too(mode, site_and_plan, loaders, tmp_path):
    site, _ = site_and_plan
    model = _model("unet", 2, site)
    private = _private(model, loaders[2], tmp_path, grad_sample_mode=mode)
    assert type(private.model).__name__ == "GradSampleModule"
    train_one_epoch(private.model, private.loader, build_loss("dice_ce"), private.optimizer, device=CPU)
    assert private.steps == 2
    private.close()


def test_steps_beyond_the_budgeted_round_are_refused(site_and_plan, loaders, tmp_path):
    site, _ = site_and_plan
    private = _private(_model("unet", 2, site), loaders[2], tmp_path)
    for _ in range(private.planned_steps):
        private.noise_only_step()
    with pytest.raises(RuntimeError, match="planned \\(and budgeted\\) for 2 steps"):
        private.noise_only_step()
