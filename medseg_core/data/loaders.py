"""Data loaders for one site: labelled train / validation, and unlabelled images for pretraining.

Typical use by an engine (centralised or inside a Flower client)::

    site = load_site(path)
    plan = load_plan(run_dir / "plan.json")
    loaders = build_site_loaders(site, plan, cfg)          # cfg: the composed run config
    for batch in loaders.train:   # image [B*num_samples, C, *patch] float32, label [.., 1, *patch] int64
        ...
    num_examples = len(loaders.train.dataset)              # training *cases* (what FedAvg weighs)
    for batch in loaders.val:     # one whole volume per batch, MetaTensors (Invertd-able)
        ...

Caching: the deterministic prefix of the pipeline (load, RAS, normalise, resample, pad) is cached in
memory by MONAI's ``CacheDataset`` (default), or on disk by ``PersistentDataset`` under
``cache_dir/<site>-<plan hash>`` (survives process restarts; a changed plan gets a new folder), or not
at all. Random patch sampling and augmentation run after the cache, every epoch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.transforms import Compose

from medseg_core.data.dataset import Case, SiteDataset
from medseg_core.data.transforms import build_transforms

CACHE_MODES = ("memory", "disk", "none")
#: bump when the deterministic part of the pipeline changes, so on-disk caches are rebuilt
PIPELINE_VERSION = 1


@dataclass(frozen=True)
class LoaderSettings:
    """How a site's data is batched, split and cached.

    Attributes:
        batch_size: cases per training batch (each gives ``num_samples`` patches).
        val_batch_size: volumes per validation batch (1: volumes differ in shape).
        num_workers: DataLoader worker processes (0 on small machines: the cache does the heavy work).
        val_fraction: fraction of the training cases held out for validation (seeded); 0 validates on
            the site's test cases (``imagesTs``) instead.
        split_seed: seed of the train/validation split.
        seed: seed of shuffling and of the random transforms.
        cache: ``"memory"`` (CacheDataset), ``"disk"`` (PersistentDataset) or ``"none"``; ``True`` /
            ``False`` mean ``"memory"`` / ``"none"``.
        cache_dir: folder for ``cache="disk"`` (e.g. the site's state directory).
        cache_workers: threads filling the in-memory cache.
        spatial_dims: 3, or 2 for axial-slice training patches.
        progress: show a progress bar while caching.
    """

    batch_size: int = 2
    val_batch_size: int = 1
    num_workers: int = 0
    val_fraction: float = 0.0
    split_seed: int = 0
    seed: int = 0
    cache: str | bool = "memory"
    cache_dir: str | Path | None = None
    cache_workers: int = 1
    spatial_dims: int = 3
    progress: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "val_batch_size", "cache_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if not 0.0 <= float(self.val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        cache = self.cache
        if isinstance(cache, bool):
            cache = "memory" if cache else "none"
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES} (or true/false), got {self.cache!r}")
        object.__setattr__(self, "cache", cache)
        if cache == "disk" and self.cache_dir is None:
            raise ValueError("cache='disk' needs a cache_dir")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, **overrides: Any) -> LoaderSettings:
        """Settings from the composed run config (``configs/train.yaml``, ``fl.yaml``, ...).

        Reads ``train.batch_size``, ``train.num_workers``, ``data.val_fraction``, ``data.split_seed``,
        ``data.cache``, ``data.cache_dir`` (only used for ``cache: disk``), ``model.spatial_dims`` and
        ``seed`` where present; ``overrides`` win (e.g. ``cache_dir=state_dir / "cache"``).
        """
        cfg = cfg or {}
        train, data, model = (cfg.get(k) or {} for k in ("train", "data", "model"))
        values: dict[str, Any] = {}
        for src, key in ((train, "batch_size"), (train, "num_workers"), (data, "val_fraction"),
                         (data, "split_seed"), (data, "cache"), (data, "cache_dir"), (model, "spatial_dims"),
                         (cfg, "seed")):
            if key in src and src[key] is not None:
                values[key] = src[key]
        if values.get("cache") != "disk":
            values.pop("cache_dir", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown loader setting(s) {unknown}; expected some of {sorted(known)}")
        values.update(overrides)
        return cls(**values)


class SiteLoaders(NamedTuple):
    """The loaders of one site. ``len(train.dataset)`` is the number of training cases."""

    train: DataLoader
    val: DataLoader | None


def case_dicts(cases: Sequence[Case], *, with_label: bool = True) -> list[dict[str, Any]]:
    """MONAI dictionary-transform inputs ``{"image": [paths], "label": path, "case_id": id}``.

    Args:
        cases: the cases.
        with_label: keep the label path (``False``: images only, e.g. for pretraining).

    Raises:
        ValueError: ``with_label`` and a case has no label (naming its first image).
    """
    out = []
    for case in cases:
        d = case.as_dict()
        if with_label and "label" not in d:
            raise ValueError(f"{case.image_paths[0]}: case '{case.case_id}' has no label")
        if not with_label:
            d.pop("label", None)
        out.append(d)
    return out


def split_train_val(cases: Sequence[Case], val_fraction: float, seed: int = 0) -> tuple[list[Case], list[Case]]:
    """Deterministic train / validation split of a site's cases (by case id, so file order is irrelevant).

    ``round(val_fraction * n)`` cases (at least one when ``val_fraction > 0``) are held out, always
    leaving at least one for training.

    Raises:
        ValueError: ``val_fraction`` outside [0, 1), or a split that would leave no training case.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ordered = sorted(cases, key=lambda c: c.case_id)
    if val_fraction == 0.0:
        return ordered, []
    n_val = max(1, round(val_fraction * len(ordered)))
    if n_val >= len(ordered):
        raise ValueError(f"val_fraction={val_fraction} of {len(ordered)} case(s) leaves no training case")
    perm = np.random.default_rng(seed).permutation(len(ordered))
    val_idx = set(perm[:n_val].tolist())
    train = [c for i, c in enumerate(ordered) if i not in val_idx]
    val = [c for i, c in enumerate(ordered) if i in val_idx]
    return train, val


def plan_hash(plan: Mapping[str, Any], *extra: Any) -> str:
    """Short hash of a plan (and anything else the cached pipeline depends on), for cache folder names."""
    text = json.dumps([PIPELINE_VERSION, plan, *extra], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def make_dataset(data: Sequence[dict], transform: Compose, settings: LoaderSettings,
                 cache_subdir: str | None = None) -> Dataset:
    """``Dataset`` / ``CacheDataset`` / ``PersistentDataset`` over ``data`` as ``settings.cache`` says.

    ``cache_subdir`` names the on-disk cache folder under ``settings.cache_dir`` (must depend on
    everything the deterministic transforms depend on: see :func:`plan_hash`).
    """
    if settings.cache == "memory":
        return CacheDataset(data, transform, cache_rate=1.0, num_workers=settings.cache_workers,
                            progress=settings.progress)
    if settings.cache == "disk":
        assert settings.cache_dir is not None
        folder = Path(settings.cache_dir) / (cache_subdir or "cache")
        # track_meta keeps the MetaTensors (affine, applied operations) that Invertd needs; the files are
        # this site's own cache, so loading them without weights_only is safe
        return PersistentDataset(data, transform, cache_dir=folder, track_meta=True, weights_only=False)
    return Dataset(data, transform)


def _seeded(transform: Compose, seed: int) -> Compose:
    transform.set_random_state(seed=seed)
    return transform


def _train_loader(ds: Dataset, settings: LoaderSettings) -> DataLoader:
    return DataLoader(ds, batch_size=settings.batch_size, shuffle=True, num_workers=settings.num_workers,
                      generator=torch.Generator().manual_seed(settings.seed),
                      persistent_workers=settings.num_workers > 0)


def build_site_loaders(site: SiteDataset, plan: Mapping[str, Any], cfg: Mapping[str, Any] | None = None, *,
                       settings: LoaderSettings | None = None,
                       transforms_cfg: Mapping[str, Any] | None = None) -> SiteLoaders:
    """Training and validation loaders of one site, preprocessed as the plan says.

    Args:
        site: the site (its ``train_cases``, and ``test_cases`` when ``val_fraction`` is 0).
        plan: the federated plan.
        cfg: the composed run config; supplies ``settings`` (:meth:`LoaderSettings.from_config`) and
            ``transforms_cfg`` (``cfg.transforms``) when those are not given.
        settings: batch size, split, caching, ... (overrides ``cfg``).
        transforms_cfg: augmentation settings (``configs/transforms/*.yaml``).

    Returns:
        ``SiteLoaders(train, val)``. Training batches: ``image`` ``[B*num_samples, C, *patch]`` float32,
        ``label`` ``[B*num_samples, 1, *patch]`` int64, ``case_id`` list. Validation batches: one whole
        volume on the plan grid (MetaTensors; ``val`` is ``None`` when there is nothing to validate on).

    Raises:
        ValueError: the site has no labelled training case, or bad settings.
    """
    if settings is None:
        settings = LoaderSettings.from_config(cfg)
    if transforms_cfg is None and cfg is not None:
        transforms_cfg = cfg.get("transforms")
    if not site.train_cases:
        raise ValueError(f"site {site.name} ({site.root}) has no labelled training case")
    train_cases, val_cases = split_train_val(site.train_cases, settings.val_fraction, settings.split_seed)
    if settings.val_fraction == 0.0:
        val_cases = sorted(site.test_cases, key=lambda c: c.case_id)
    key = plan_hash(plan, site.channel_names, settings.spatial_dims)
    common = {"spatial_dims": settings.spatial_dims, "modalities": site.channel_names}
    train_tf = _seeded(build_transforms(plan, train=True, cfg=transforms_cfg, **common), settings.seed)
    train_ds = make_dataset(case_dicts(train_cases), train_tf, settings, f"{site.name}-train-{key}")
    val_loader = None
    if val_cases:
        val_tf = build_transforms(plan, train=False, cfg=transforms_cfg, **common)
        val_ds = make_dataset(case_dicts(val_cases), val_tf, settings, f"{site.name}-val-{key}")
        val_loader = DataLoader(val_ds, batch_size=settings.val_batch_size, shuffle=False,
                                num_workers=settings.num_workers)
    return SiteLoaders(_train_loader(train_ds, settings), val_loader)


def build_unlabelled_loader(site: SiteDataset, plan: Mapping[str, Any], cfg: Mapping[str, Any] | None = None, *,
                            cases: Sequence[Case] | None = None, settings: LoaderSettings | None = None,
                            transforms_cfg: Mapping[str, Any] | None = None) -> DataLoader:
    """Loader of images without labels (self-supervised pretraining), with the same preprocessing.

    Args:
        site: the site.
        plan: the federated plan.
        cfg, settings, transforms_cfg: as for :func:`build_site_loaders` (``val_fraction`` is ignored).
        cases: the images to use; default ``site.unlabelled_cases``. Pass e.g.
            ``site.unlabelled_cases + train_cases`` to pretrain on training images too, never evaluation
            cases.

    Returns:
        A shuffled loader of ``{"image": [B*num_samples, C, *patch], "case_id": [...]}`` batches.

    Raises:
        ValueError: no case to load.
    """
    if settings is None:
        settings = LoaderSettings.from_config(cfg)
    if transforms_cfg is None and cfg is not None:
        transforms_cfg = cfg.get("transforms")
    cases = list(site.unlabelled_cases if cases is None else cases)
    if not cases:
        raise ValueError(f"site {site.name} ({site.root}) has no unlabelled image to load")
    tf = _seeded(build_transforms(plan, train=True, cfg=transforms_cfg, with_label=False,
                                  spatial_dims=settings.spatial_dims, modalities=site.channel_names), settings.seed)
    key = plan_hash(plan, site.channel_names, settings.spatial_dims)
    ds = make_dataset(case_dicts(sorted(cases, key=lambda c: c.case_id), with_label=False), tf, settings,
                      f"{site.name}-unlabelled-{key}")
    return _train_loader(ds, settings)
