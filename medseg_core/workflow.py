"""Steps shared by every training entry point (``medseg-train``, the Flower client, pretraining).

Each is a plain function so the federated client does at its site exactly what the pooled baseline
does over all sites: validate, plan, build loaders, build the model from config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader, list_data_collate
from omegaconf import DictConfig, OmegaConf

from medseg_core.data.dataset import Case, SiteDataset, load_site, site_dirs
from medseg_core.data.problems import ERROR, DatasetError, problem
from medseg_core.data.validate import ensure_valid, skip_bad_cases
from medseg_core.models import build_model, get_model_spec


def to_container(cfg: DictConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    """A plain, resolved ``dict`` of a config node (``{}`` for ``None``)."""
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def plan_options(cfg: DictConfig | Mapping[str, Any]) -> dict[str, int]:
    """Keyword arguments of :func:`medseg_core.data.fingerprint.make_plan` from ``cfg.data.planning``.

    Raises:
        ValueError: a limit that is not a positive integer, or an unknown key.
    """
    planning = to_container((cfg.get("data") or {}).get("planning"))
    allowed = {"max_patch_voxels", "max_patch_pixels_2d"}
    unknown = sorted(set(planning) - allowed)
    if unknown:
        raise ValueError(f"data.planning: unknown setting(s) {unknown}; expected {sorted(allowed)}")
    out = {}
    for key, value in planning.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"data.planning.{key} must be a positive integer, got {value!r}")
        out[key] = value
    return out


def validated_site(path: str | Path, *, skip_bad: bool = False, log=print) -> SiteDataset:
    """Validate a site folder and load it; refuse bad data (or drop bad cases when asked).

    Raises:
        DatasetError: every error with its file and reason (``skip_bad=False``), or site-level errors.
    """
    if skip_bad:
        site, skipped, _report = skip_bad_cases(path)
        for case in skipped:
            log(f"warning: skipping bad case {case.case_id} of site {site.name} ({case.image_paths[0]})")
        return site
    ensure_valid(path)
    return load_site(path)


def validated_sites(root: str | Path, sites: Sequence[str] | None = None, *, skip_bad: bool = False,
                    log=print) -> list[SiteDataset]:
    """Validate and load every (or the named) site of a federation root; check they agree on labels.

    Raises:
        DatasetError: no site, unknown site names, invalid data, or sites that disagree on the label
            set or number of channels (they cannot train one model).
    """
    dirs = site_dirs(root)
    if not dirs:
        raise DatasetError([problem(ERROR, "no-sites", root, "no site folder (with dataset.json) found")], root)
    if sites:
        by_name = {d.name: d for d in dirs}
        unknown = [s for s in sites if s not in by_name]
        if unknown:
            raise DatasetError(
                [problem(ERROR, "unknown-site", root, f"site(s) {unknown} not found; available: {sorted(by_name)}")],
                root,
            )
        dirs = [by_name[s] for s in sites]
    loaded = [validated_site(d, skip_bad=skip_bad, log=log) for d in dirs]
    ref = loaded[0]
    for s in loaded[1:]:
        if s.labels != ref.labels or s.num_channels != ref.num_channels:
            raise DatasetError(
                [problem(ERROR, "incompatible-sites", s.root / "dataset.json",
                         f"labels {s.labels} / {s.num_channels} channel(s) differ from site {ref.name}'s "
                         f"{ref.labels} / {ref.num_channels}")],
                root,
            )
    return loaded


def model_config(model_cfg: DictConfig | Mapping[str, Any], *, in_channels: int, out_channels: int,
                 plan: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The registry kwargs of the configured model for this data (``name`` included, no ``_target_``).

    ``in_channels``/``out_channels`` come from the dataset; an ``img_size`` left ``null`` in the config
    (transformers) becomes the plan's patch size.

    Raises:
        ValueError: a model whose inputs must be exactly ``img_size`` (UNETR) configured with another size
            than the plan's patch, which every trainer feeds it (found here, before any training).
    """
    kwargs = to_container(model_cfg)
    kwargs.pop("_target_", None)
    kwargs.pop("pretrained", None)
    kwargs["in_channels"], kwargs["out_channels"] = int(in_channels), int(out_channels)
    if "img_size" in kwargs and plan is not None:
        dims = int(kwargs.get("spatial_dims", 3))
        patch = [int(v) for v in (plan["patch_size"] if dims == 3 else plan["patch_size_2d"])]
        size = kwargs["img_size"]
        if size is None:
            kwargs["img_size"] = patch
        elif get_model_spec(str(kwargs.get("name"))).fixed_input_size:
            size = (int(size),) * dims if isinstance(size, int) else tuple(int(v) for v in size)
            if size != tuple(patch):
                raise ValueError(
                    f"model {kwargs.get('name')!r}: img_size {size} differs from the plan's patch size "
                    f"{tuple(patch)}, which training and sliding-window inference feed it, and its position "
                    f"embeddings are fixed; set model.img_size=null to take the plan's patch"
                )
    return kwargs


def build_configured_model(kwargs: Mapping[str, Any]) -> torch.nn.Module:
    """Build a model from :func:`model_config`'s output."""
    kwargs = dict(kwargs)
    return build_model(kwargs.pop("name"), **kwargs)


def roi_size(plan: Mapping[str, Any], spatial_dims: int) -> list[int]:
    """Sliding-window size: the plan's training patch (3D) or slice patch (2D)."""
    return [int(v) for v in (plan["patch_size"] if spatial_dims == 3 else plan["patch_size_2d"])]


def pooled_loader(loaders: Sequence[DataLoader], *, batch_size: int, seed: int = 0) -> DataLoader:
    """One shuffled loader over several sites' training datasets (each keeps its own preprocessing)."""
    dataset = torch.utils.data.ConcatDataset([ld.dataset for ld in loaders])
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=list_data_collate,
                      generator=torch.Generator().manual_seed(seed))


def foreground_classes(labels: Mapping[str, int]) -> dict[str, int]:
    """Class name -> value without background."""
    return {name: int(v) for name, v in labels.items() if int(v) != 0}


def case_ids(cases: Sequence[Case]) -> list[str]:
    return [c.case_id for c in cases]
