"""Build a pretraining model from the ``pretrain`` config group and the segmentation model's config.

    model_kwargs = model_config(cfg.model, in_channels=C, out_channels=K, plan=plan)   # medseg_core.workflow
    mae = build_pretrain_model(cfg.pretrain, model_kwargs, seed=cfg.seed)

``method``: ``mim`` (any registry network; CNN U-Nets), ``mae_transunet`` (TransUNet, hybrid or ViT),
``mae_vit`` (UNETR / pure-ViT TransUNet through MONAI's MAE), or ``auto``: ``mae_transunet`` for
TransUNets, ``mae_vit`` for UNETR, ``mim`` otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from medseg_core.workflow import model_config
from pretrain.base import PretrainModel
from pretrain.mae_transunet import TransUNetMAE
from pretrain.mae_vit import ViTMAE
from pretrain.mim import MaskedImageModel

METHODS = ("mim", "mae_transunet", "mae_vit")
_MAE_KEYS = ("decoder_hidden_size", "decoder_num_layers", "decoder_num_heads", "decoder_mlp_dim")
#: config keys each method accepts (besides ``method``), in the ``pretrain`` group
METHOD_KEYS = {
    "mim": ("mask_ratio", "block_size", "norm_pix_loss"),
    "mae_transunet": ("mask_ratio", "block_size", "norm_pix_loss", *_MAE_KEYS),
    "mae_vit": ("mask_ratio", "block_size", "norm_pix_loss", *_MAE_KEYS, "pos_embed_type", "decoder_pos_embed_type"),
}
_ALL_KEYS = sorted({k for keys in METHOD_KEYS.values() for k in keys})


def resolve_method(method: str, model_name: str) -> str:
    """``auto`` -> the natural method for ``model_name``; otherwise checked and returned.

    Raises:
        ValueError: an unknown method.
    """
    if method == "auto":
        if model_name.startswith("transunet"):
            return "mae_transunet"
        return "mae_vit" if model_name == "unetr" else "mim"
    if method not in METHODS:
        raise ValueError(f"pretrain.method={method!r} is not one of {list(METHODS)} or 'auto'")
    return method


def build_pretrain_model(pretrain_cfg: DictConfig | Mapping[str, Any], model_kwargs: Mapping[str, Any], *,
                         seed: int = 0) -> PretrainModel:
    """The masked-reconstruction model for a segmentation model.

    Args:
        pretrain_cfg: the ``pretrain`` group (``method``, ``mask_ratio``, ``block_size``,
            ``norm_pix_loss`` and the method's decoder sizes; see ``configs/pretrain/*.yaml``).
        model_kwargs: registry kwargs of the segmentation model (:func:`medseg_core.workflow.model_config`).
        seed: seed of the mask RNG.

    Raises:
        ValueError: unknown method or settings, or a model the method does not support.
    """
    cfg = OmegaConf.to_container(pretrain_cfg, resolve=True) if isinstance(pretrain_cfg, DictConfig) else dict(pretrain_cfg)
    method = resolve_method(str(cfg.pop("method", "auto")), str(model_kwargs["name"]))
    known = METHOD_KEYS[method]
    settings = {k: v for k, v in cfg.items() if k in known}
    unknown = sorted(set(cfg) - set(known) - set(_ALL_KEYS))
    if unknown:
        raise ValueError(f"unknown pretrain setting(s) {unknown} for method {method!r}; expected some of {list(known)}")
    if "norm_pix_loss" in settings:
        settings["norm_pix"] = settings.pop("norm_pix_loss")
    if method == "mim":
        return MaskedImageModel(model_kwargs, seed=seed, **settings)
    if method == "mae_transunet":
        return TransUNetMAE(model_kwargs, seed=seed, **settings)
    return ViTMAE(model_kwargs, seed=seed, **settings)


def check_patch_size(model: PretrainModel, plan: Mapping[str, Any], spatial_dims: int) -> list[int]:
    """The training patch of the plan, checked against what the model accepts (before any training).

    Raises:
        ValueError: a model with fixed input size that differs from the patch, or a patch not divisible by
            the mask block.
    """
    patch = [int(v) for v in (plan["patch_size"] if spatial_dims == 3 else plan["patch_size_2d"])]
    fixed = model.fixed_input_size
    if fixed is not None and tuple(fixed) != tuple(patch):
        raise ValueError(f"model img_size {tuple(fixed)} differs from the plan's patch size {tuple(patch)}; "
                         f"set model.img_size={patch} (or null) for {model.method}")
    multiple = model.input_multiple
    if any(p % m for p, m in zip(patch, multiple, strict=True)):
        raise ValueError(f"the plan's patch size {patch} is not divisible by the mask block {tuple(multiple)}")
    return patch


def build_for_plan(cfg: DictConfig, plan: Mapping[str, Any]) -> PretrainModel:
    """The pretraining model of a federated run, identical at the server and at every site.

    The configured network (``cfg.model``) for the plan's channels and classes (not a site's own
    ``dataset.json``), wrapped by ``cfg.pretrain``, initialised from ``cfg.seed``, with the plan's patch
    checked against the mask block.

    Raises:
        ValueError: see :func:`build_pretrain_model` and :func:`check_patch_size`.
    """
    kwargs = model_config(cfg.model, in_channels=int(plan["num_channels"]), out_channels=int(plan["num_classes"]),
                          plan=plan)
    torch.manual_seed(int(cfg.seed))
    model = build_pretrain_model(cfg.pretrain, kwargs, seed=int(cfg.seed))
    check_patch_size(model, plan, int(kwargs.get("spatial_dims", 3)))
    return model
