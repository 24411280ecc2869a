"""Which hospital this node is, where its data and its state live, and its data (cached per process).

Per-site values come only from the node config, never from shared YAML (``DESIGN.md`` §3):

* deployment: ``flower-supernode --node-config "site-dir='/data/site' state-dir='/var/lib/medseg'
  site-id='hospital_a'"`` (``medseg-site`` writes this);
* simulation: Flower sets ``partition-id`` / ``num-partitions``; partition *k* is the *k*-th site
  (sorted by name) of the configured federation (``data.root``, or the embedded synthetic one, made
  on first use), restricted to ``data.sites`` when given.

State that must survive between rounds and restarts (FedBN's normalisation weights, SCAFFOLD's
control variate) is kept in files under ``<state-dir>/<run-name>/``; it never travels to the server.
No Flower import here.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from omegaconf import DictConfig

from medseg_core.data.dataset import SiteDataset, site_dirs
from medseg_core.data.loaders import LoaderSettings, SiteLoaders, build_site_loaders, plan_hash
from medseg_core.data.source import ensure_data_root
from medseg_core.data.transforms import build_transforms
from medseg_core.federation import (
    NODE_NUM_PARTITIONS,
    NODE_PARTITION_ID,
    NODE_SITE_DIR,
    NODE_SITE_ID,
    NODE_STATE_DIR,
    SITE_MODEL,
    check_safe_name,
)
from medseg_core.workflow import to_container, validated_site

#: in-memory cache budget of one process when the config has no ``data.process_cache_gb``
DEFAULT_PROCESS_CACHE_GB = 4.0
#: per-round state files kept (SCAFFOLD variates, optimiser state: a round needs only the last; one more
#: covers a crash mid-round)
KEEP_STATE_FILES = 2


class SiteConfigError(ValueError):
    """The node config does not say which site this node is, or names one that does not exist."""


@dataclass(frozen=True)
class SiteRef:
    """Where one site's data and state live.

    Attributes:
        name: the site id (folder name unless ``site-id`` is given).
        data_dir: the site folder (nnU-Net raw layout, see :mod:`medseg_core.data.dataset`).
        state_root: folder for the site's state; each run has a subfolder named after the run.
        note: something the server should tell the user (e.g. sites a simulation leaves out).
        simulated: a partition of a simulation (``partition-id``), not a deployed site.
    """

    name: str
    data_dir: Path
    state_root: Path
    note: str = ""
    simulated: bool = False


def _simulated_site_dirs(cfg: DictConfig) -> list[Path]:
    root = ensure_data_root(cfg.data)
    dirs = site_dirs(root)
    wanted = list(cfg.data.sites) if cfg.data.get("sites") else None
    if wanted:
        by_name = {d.name: d for d in dirs}
        unknown = [s for s in wanted if s not in by_name]
        if unknown:
            raise SiteConfigError(
                f"data.sites names {unknown}, not found under {root}; available {sorted(by_name)}"
            )
        dirs = [by_name[s] for s in wanted]
    if not dirs:
        raise SiteConfigError(f"no site folder (with dataset.json) under {root}")
    return dirs


def resolve_site(cfg: DictConfig, node_config: Mapping[str, Any]) -> SiteRef:
    """The site this node serves, from its node config.

    Args:
        cfg: the composed run config (``data`` in simulation; ``fl.state_dir`` when the node config
            gives no ``state-dir``).
        node_config: ``context.node_config``.

    Raises:
        SiteConfigError: neither ``site-dir`` nor ``partition-id`` is set, the folder does not exist,
            or the simulation has a different number of nodes than the federation has sites.
    """
    if node_config.get(NODE_SITE_DIR):
        data_dir = Path(str(node_config[NODE_SITE_DIR])).expanduser()
        if not data_dir.is_dir():
            raise SiteConfigError(f"node config {NODE_SITE_DIR}={str(data_dir)!r} is not a folder")
        name = check_safe_name(str(node_config.get(NODE_SITE_ID) or data_dir.name), NODE_SITE_ID)
        state = node_config.get(NODE_STATE_DIR)
        state_root = (
            Path(str(state)).expanduser() if state else Path(str(cfg.fl.state_dir)).expanduser() / name
        )
        return SiteRef(name, data_dir, state_root)
    if NODE_PARTITION_ID in node_config:
        dirs = _simulated_site_dirs(cfg)
        pid, n = int(node_config[NODE_PARTITION_ID]), int(node_config.get(NODE_NUM_PARTITIONS, len(dirs)))
        hint = f'flwr run . --federation-config "num-supernodes={len(dirs)} client-resources-num-cpus=1"'
        if n > len(dirs):
            raise SiteConfigError(
                f"the simulation runs {n} SuperNodes but the federation has only {len(dirs)} "
                f"site(s) {[d.name for d in dirs]}: run one SuperNode per site ({hint})"
            )
        note = ""
        if n < len(dirs):  # Flower's default is 2 SuperNodes: run, but say which sites are left out
            note = (
                f"the simulation runs {n} SuperNode(s) for the {len(dirs)} sites of the federation: sites "
                f"{[d.name for d in dirs[n:]]} are not simulated; for all of them: {hint}"
            )
        data_dir = dirs[pid]
        name = check_safe_name(data_dir.name, "site folder name")
        return SiteRef(name, data_dir, Path(str(cfg.fl.state_dir)).expanduser() / name, note, simulated=True)
    raise SiteConfigError(
        f"node config {dict(node_config)} names no site: a deployed SuperNode needs "
        f"--node-config \"{NODE_SITE_DIR}='/path/to/site' {NODE_STATE_DIR}='/path/to/state'\" (see medseg-site)"
    )


# --------------------------------------------------------------------------------------------------
# data, cached per process


@dataclass
class SiteData:
    """A validated site and its loaders for one plan."""

    site: SiteDataset
    loaders: SiteLoaders
    settings: LoaderSettings
    test_loader: DataLoader | None = None

    @property
    def num_train_cases(self) -> int:
        """Training cases (what FedAvg weighs by), after the validation split."""
        return len(self.loaders.train.dataset)

    def reseed(self, seed: int) -> None:
        """Make this round's crops, augmentation and shuffling a function of ``seed`` only."""
        dataset = self.loaders.train.dataset
        transform = getattr(dataset, "transform", None)
        if transform is not None and hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=seed)
        generator = self.loaders.train.generator
        if generator is not None:
            generator.manual_seed(seed)


_LOCK = threading.Lock()
_SITES: dict[tuple, SiteDataset] = {}
_DATA: OrderedDict[tuple, SiteData] = OrderedDict()


def load_validated_site(ref: SiteRef, cfg: DictConfig) -> SiteDataset:
    """Validate and load the site (once per process); bad data stops here with every problem listed.

    Raises:
        DatasetError: the site's data is not usable (every problem with its file).
    """
    skip_bad = bool(cfg.data.get("skip_bad_cases", False))
    key = (str(ref.data_dir.resolve()), skip_bad)
    with _LOCK:
        if key not in _SITES:
            _SITES[key] = validated_site(ref.data_dir, skip_bad=skip_bad)
        return _SITES[key]


def site_data(ref: SiteRef, cfg: DictConfig, plan: Mapping[str, Any]) -> SiteData:
    """The site's loaders for ``plan`` (built once per process and plan, least recently used dropped).

    Raises:
        DatasetError: invalid data. ValueError: no labelled training case.
    """
    site = load_validated_site(ref, cfg)
    container = to_container(cfg)
    settings = LoaderSettings.from_config(container, progress=False)
    key = (
        str(ref.data_dir.resolve()),
        plan_hash(plan),
        repr(settings),
        json.dumps(container.get("transforms"), sort_keys=True, default=str),
    )
    with _LOCK:
        if key in _DATA:
            _DATA.move_to_end(key)
            return _DATA[key]
    data = SiteData(site, build_site_loaders(site, plan, container, settings=settings), settings)
    with _LOCK:
        _DATA[key] = data
        trim_cache(_DATA, cfg, lambda d: cached_bytes(d.loaders.train, d.loaders.val, d.test_loader))
    return data


def trim_cache(cache: OrderedDict, cfg: DictConfig, size: Callable[[Any], int]) -> None:
    """Drop the least recently used entries of a per-process site cache beyond ``data.process_cache_gb``.

    A simulation actor serves many sites: every site whose data fits stays cached (rebuilding one costs a
    pass over its volumes on every call); the most recent entry always stays. Call with the lock held.
    """
    budget = float(cfg.data.get("process_cache_gb", DEFAULT_PROCESS_CACHE_GB)) * 2**30
    total = sum(size(v) for v in cache.values())
    while len(cache) > 1 and total > budget:
        total -= size(cache.popitem(last=False)[1])


def cached_bytes(*loaders: DataLoader | None) -> int:
    """Bytes of arrays held by the in-memory caches (MONAI ``CacheDataset``) behind ``loaders``."""
    return sum(_nbytes(getattr(getattr(ld, "dataset", None), "_cache", None)) for ld in loaders if ld is not None)


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, Mapping):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def held_out_loader(data: SiteData, plan: Mapping[str, Any]) -> DataLoader | None:
    """Whole-volume loader of the site's held-out test cases (``imagesTs``), or ``None`` if it has none."""
    if data.test_loader is None and data.site.test_cases:
        tf = build_transforms(
            plan, train=False, modalities=data.site.channel_names, spatial_dims=data.settings.spatial_dims
        )
        cases = sorted(data.site.test_cases, key=lambda c: c.case_id)
        data.test_loader = DataLoader(Dataset([c.as_dict() for c in cases], tf), batch_size=1)
    return data.test_loader


# --------------------------------------------------------------------------------------------------
# state that stays at the site


class SiteState:
    """Files a site keeps for one run: ``<state_root>/<run-name>/{local,control}_<round>.pt``, and
    :data:`medseg_core.federation.SITE_MODEL`.

    Each round writes its own file, and a round reads the newest file written *before* it, so a
    server that crashes in the middle of a round and is resumed finds the site's state exactly as it
    was after the last completed round.
    """

    def __init__(self, state_root: str | Path, run_name: str) -> None:
        self.dir = Path(state_root) / check_safe_name(run_name, "run name")

    @property
    def model_path(self) -> Path:
        """The site's copy of the best model, a checkpoint ``medseg-predict`` reads."""
        return self.dir / SITE_MODEL

    def _path(self, kind: str, round_idx: int) -> Path:
        return self.dir / f"{kind}_{int(round_idx):04d}.pt"

    def _rounds(self, kind: str) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.stem.split("_")[1]) for p in self.dir.glob(f"{kind}_*.pt"))

    def load(self, kind: str, before_round: int) -> dict[str, np.ndarray] | None:
        """The arrays saved by the newest round ``< before_round`` (``None`` if there is none)."""
        rounds = [r for r in self._rounds(kind) if r < before_round]
        if not rounds:
            return None
        payload = torch.load(self._path(kind, rounds[-1]), map_location="cpu", weights_only=False)
        # tensors since session 7; files written before hold NumPy arrays
        return {k: v.numpy() if torch.is_tensor(v) else np.asarray(v) for k, v in payload.items()}

    def save(
        self, kind: str, round_idx: int, arrays: Mapping[str, np.ndarray], keep: int | None = None
    ) -> Path:
        """Write this round's arrays atomically; keep only the ``keep`` newest files when given."""
        path = self._path(kind, round_idx)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                # as tensors: torch.save pickles NumPy arrays element-wise slowly (a 2 M-parameter model's
                # AdamW moments took 0.3 s to save and 0.2 s to load, every site and round; tensors 0.02 s)
                torch.save({k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}, f)
            os.replace(tmp, path)  # atomic: a crash never leaves half a state file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if keep is not None:
            for r in self._rounds(kind)[:-keep]:
                self._path(kind, r).unlink(missing_ok=True)
        return path
