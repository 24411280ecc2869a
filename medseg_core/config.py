"""The only bridge between the project and Hydra.

Every entry point composes its configuration here, from the YAML tree in the ``configs`` package:

* Flower apps call :func:`load_config` with ``context.run_config`` (kebab-case scalar keys declared in
  ``pyproject.toml``: ``experiment`` names a file in ``configs/experiment/``, ``overrides`` is a string of
  Hydra overrides, any other key becomes one dotted override).
* Command-line tools (``medseg-train`` ...) use ``@hydra.main(config_path=CONFIG_PATH, ...)``; the
  objects are then built from the same YAML.

Kebab-case (TOML, run-config) is converted to snake_case (Python, YAML) in :func:`kebab_to_snake`, and
nowhere else.
"""

from __future__ import annotations

import hashlib
import shlex
import threading
from collections.abc import Iterable, Mapping
from functools import lru_cache

from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

CONFIG_MODULE = "configs"
CONFIG_PATH = "pkg://configs"
PRIMARY_CONFIGS = ("fl", "train", "pretrain")
RUN_CONFIG_EXPERIMENT = "experiment"
RUN_CONFIG_OVERRIDES = "overrides"
# Keys that describe *where* a run happens rather than *what* is trained (folders that differ from machine
# to machine by design, e.g. ``data.cache_dir`` from ``$MEDSEG_CACHE_DIR``); they never enter the hash
# that sites compare with the server's, nor the one a resumed run compares with its checkpoint.
SITE_LOCAL_KEYS = ("paths", "data.root", "data.cache_dir", "fl.state_dir")

# Hydra's global state is not thread-safe; Flower may call ClientApps from several threads.
_LOCK = threading.Lock()


def kebab_to_snake(key: str) -> str:
    """``"num-server-rounds"`` -> ``"num_server_rounds"`` (dots are kept: ``"fl.num-rounds"``)."""
    return key.replace("-", "_")


def snake_to_kebab(key: str) -> str:
    """``"num_server_rounds"`` -> ``"num-server-rounds"``."""
    return key.replace("_", "-")


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def run_config_overrides(run_config: Mapping[str, object] | None) -> tuple[str, ...]:
    """Turn a Flower run-config into a tuple of Hydra overrides.

    Args:
        run_config: e.g. ``{"experiment": "unet3d_fedavg", "overrides": "privacy=dp fl.num_rounds=3",
            "fl.local-epochs": 2}``. Empty strings mean "not set".

    Returns:
        Overrides in a stable order: experiment first, then the ``overrides`` string, then other keys
        sorted by name.

    Raises:
        ValueError: the overrides string cannot be split (unbalanced quotes).
    """
    rc = dict(run_config or {})
    out: list[str] = []
    experiment = str(rc.pop(RUN_CONFIG_EXPERIMENT, "") or "").strip()
    if experiment:
        out.append(f"experiment={experiment}")
    raw = str(rc.pop(RUN_CONFIG_OVERRIDES, "") or "").strip()
    if raw:
        try:
            out.extend(shlex.split(raw))
        except ValueError as exc:
            raise ValueError(f"run-config 'overrides' cannot be parsed ({exc}): {raw!r}") from exc
    for key in sorted(rc):
        out.append(f"{kebab_to_snake(key)}={_format_value(rc[key])}")
    return tuple(out)


@lru_cache(maxsize=64)
def _compose_cached(config_name: str, overrides: tuple[str, ...]) -> DictConfig:
    with _LOCK, initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def compose_config(config_name: str = "fl", overrides: Iterable[str] = ()) -> DictConfig:
    """Compose a primary config with Hydra overrides (cached, read-only).

    Raises:
        ValueError: unknown primary config name.
        hydra.errors.HydraException: an override names an unknown group option or key.
    """
    if config_name not in PRIMARY_CONFIGS:
        raise ValueError(f"unknown primary config {config_name!r}; expected one of {PRIMARY_CONFIGS}")
    return _compose_cached(config_name, tuple(overrides))


def load_config(
    run_config: Mapping[str, object] | None = None,
    *,
    config_name: str = "fl",
    overrides: Iterable[str] = (),
) -> DictConfig:
    """Compose the project configuration from a Flower run-config and/or explicit overrides.

    Both the ServerApp and every ClientApp call this with the same ``context.run_config``, so they see
    the same resolved configuration; :func:`config_hash` lets a client check it.

    Args:
        run_config: Flower run-config (kebab-case keys), or ``None``.
        config_name: primary config (``fl``, ``train`` or ``pretrain``).
        overrides: extra Hydra overrides applied last.

    Returns:
        A read-only ``DictConfig`` (shared between callers: copy it with ``OmegaConf.to_container`` or
        ``copy.deepcopy`` before changing anything).
    """
    return compose_config(config_name, run_config_overrides(run_config) + tuple(overrides))


def config_hash(cfg: DictConfig, ignore: Iterable[str] = ()) -> str:
    """Short SHA-256 of the resolved config, without :data:`SITE_LOCAL_KEYS` and ``ignore``.

    The keys (dotted paths) are blanked *before* interpolations are resolved, so values derived from
    them (``train.epochs: ${fl.num_rounds}``, ``fl.state_dir: ${data.cache_dir}/...``) are ignored too.

    Raises:
        omegaconf.errors.InterpolationResolutionError: the config has an unresolvable interpolation.
    """
    container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)
    for dotted in (*SITE_LOCAL_KEYS, *ignore):
        node: object = container
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[leaf] = None
    resolved = OmegaConf.to_container(OmegaConf.create(container), resolve=True)
    text = OmegaConf.to_yaml(OmegaConf.create(resolved), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
