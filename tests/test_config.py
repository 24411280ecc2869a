"""The Hydra bridge: every primary and every option of every config group composes, and every
``_target_`` in them instantiates."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ReadonlyConfigError

import configs
from medseg_core.config import (
    PRIMARY_CONFIGS,
    compose_config,
    config_hash,
    kebab_to_snake,
    load_config,
    run_config_overrides,
)
from medseg_core.workflow import build_configured_model, model_config

CONFIG_DIR = Path(configs.__file__).parent
GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and not p.name.startswith("_"))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _primary_for(group: str) -> str:
    for name in ("train", "fl", "pretrain"):
        defaults = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{name}.yaml")).get("defaults", [])
        for d in defaults:
            if isinstance(d, dict) and group in d:
                return name
    pytest.fail(f"config group {group!r} is not in the defaults list of any primary config")


def _tiny_params() -> list[torch.nn.Parameter]:
    return list(torch.nn.Linear(2, 2).parameters())


def _instantiate_all(node, path: str = "") -> int:
    """Instantiate every node that has a ``_target_``; returns how many were built."""
    built = 0
    if isinstance(node, DictConfig):
        if "_target_" in node:
            obj = hydra.utils.instantiate(node)
            if node.get("_partial_", False):
                if "lr_scheduler" in str(node._target_):
                    obj = obj(torch.optim.SGD(_tiny_params(), lr=0.1))
                elif "optim" in str(node._target_):
                    obj = obj(_tiny_params())
            assert obj is not None, f"{path} instantiated to None"
            return 1
        for key in node:
            built += _instantiate_all(node[key], f"{path}.{key}")
    return built


@pytest.mark.parametrize("name", PRIMARY_CONFIGS)
def test_primary_composes_and_instantiates(name):
    cfg = compose_config(name)
    assert cfg.seed == 0
    assert "data" in cfg and "model" in cfg
    # resolvable, and at least the model/optimiser objects really get built
    OmegaConf.to_container(cfg, resolve=True)
    assert _instantiate_all(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))) >= 2


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in GROUPS for o in _options(g) if g not in ("experiment",)],
)
def test_every_group_option_composes_and_instantiates(group, option):
    primary = _primary_for(group)
    overrides = [f"{group}={option}"]
    if group == "data" and option == "folder":
        overrides.append("data.root=/nonexistent")  # mandatory value
    cfg = compose_config(primary, overrides)
    node = cfg[group]
    if node is None:  # an empty option (e.g. sched=none) is allowed: it means "off"
        return
    if group == "model":  # as the trainers build it: plan-dependent values (img_size: null) from a plan
        plan = {"patch_size": [32, 32, 32], "patch_size_2d": [32, 32]}
        if option in ("transunet_r50_vit_b16", "transunet_vit_b16"):  # official size: no memory needed
            with torch.device("meta"):
                build_configured_model(model_config(node, in_channels=1, out_channels=3, plan=plan))
        else:
            build_configured_model(model_config(node, in_channels=1, out_channels=3, plan=plan))
        return
    _instantiate_all(OmegaConf.create(OmegaConf.to_container(node, resolve=True)), group)


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes(experiment):
    cfg = load_config({"experiment": experiment})
    OmegaConf.to_container(cfg, resolve=True)


def test_run_config_is_converted_from_kebab_case():
    assert kebab_to_snake("fl.num-rounds") == "fl.num_rounds"
    ov = run_config_overrides({"experiment": "smoke", "overrides": "seed=3 'train.amp=false'", "fl.local-epochs": 2})
    assert ov == ("experiment=smoke", "seed=3", "train.amp=false", "fl.local_epochs=2")
    cfg = load_config({"experiment": "smoke", "overrides": "seed=3", "fl.local-epochs": 2})
    assert cfg.seed == 3 and cfg.fl.local_epochs == 2 and cfg.fl.num_rounds == 2


def test_config_is_cached_and_read_only():
    a = load_config({"overrides": "seed=5"})
    b = load_config({"overrides": "seed=5"})
    assert a is b
    with pytest.raises(ReadonlyConfigError):
        a.seed = 6


def test_config_hash_tracks_training_settings_not_paths():
    base = load_config()
    assert config_hash(base) == config_hash(load_config({"overrides": "paths.run_dir=/somewhere"}))
    assert config_hash(base) != config_hash(load_config({"overrides": "seed=1"}))


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="unknown primary"):
        compose_config("nope")
    with pytest.raises(ValueError, match="cannot be parsed"):
        run_config_overrides({"overrides": "seed='1"})
    with pytest.raises(Exception, match="nonexistent_option"):
        load_config({"overrides": "model=nonexistent_option"})


def test_config_hash_ignores_site_local_folders_and_what_derives_from_them():
    base = load_config()
    for where in ("data.root=/a", "data.cache_dir=/b", "fl.state_dir=/c"):
        assert config_hash(load_config({"overrides": where})) == config_hash(base), where
    longer = load_config({"overrides": "fl.num_rounds=7"})  # train.epochs: ${fl.num_rounds} follows it
    assert config_hash(longer) != config_hash(base)
    assert config_hash(longer, ignore=["fl.num_rounds"]) == config_hash(base, ignore=["fl.num_rounds"])


@pytest.mark.parametrize("primary", ["train", "fl"])
@pytest.mark.parametrize("model", ["dynunet", "unetpp"])
def test_a_deep_supervision_model_gets_a_deep_supervision_loss(primary, model):
    """The loss follows ``model.deep_supervision`` (it used to stay plain, and training crashed)."""
    from medseg_core.losses import DeepSupervisionLoss

    on = compose_config(primary, [f"model={model}", "model.deep_supervision=true"])
    off = compose_config(primary, [f"model={model}"])
    assert isinstance(hydra.utils.instantiate(on.loss), DeepSupervisionLoss)
    assert not isinstance(hydra.utils.instantiate(off.loss), DeepSupervisionLoss)
    # for every loss, and a model without the option (unet3d) gets the plain loss
    for loss in _options("loss"):
        assert isinstance(hydra.utils.instantiate(compose_config(primary, [
            f"model={model}", "model.deep_supervision=true", f"loss={loss}"]).loss), DeepSupervisionLoss), loss
    assert not isinstance(hydra.utils.instantiate(compose_config(primary, ["model=unet3d"]).loss),
                          DeepSupervisionLoss)
