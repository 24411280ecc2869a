"""Export the transferable part of a pretraining model as an encoder checkpoint.

The checkpoint holds the weights under the *segmentation model's* keys, with metadata (model name,
model-config hash, run-config hash, method, held keys, scope), so ``model.pretrained=PATH`` can load
it into the initial model of ``medseg-train`` or of a federation and report loaded / missing /
unexpected keys (:func:`medseg_core.models.pretrained.load_pretrained_encoder`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medseg_core.models.pretrained import save_encoder_checkpoint
from pretrain.base import PretrainModel


def pretrain_settings(model: PretrainModel) -> dict[str, Any]:
    """The masking settings of a pretraining model (stored with the encoder)."""
    gen = model.mask_generator
    out: dict[str, Any] = {"method": model.method, "mask_ratio": gen.ratio, "norm_pix_loss": model.norm_pix}
    out["block_size"] = list(model.block) if hasattr(model, "block") else gen.block_size
    return out


def export_encoder(model: PretrainModel, path: str | Path, *, config_hash: str | None = None, **extra: Any) -> Path:
    """Write ``model``'s encoder weights and metadata to ``path`` (atomically).

    Args:
        model: the pretraining model (any :class:`PretrainModel`).
        path: output file, e.g. ``run_dir / "encoder.pt"``.
        config_hash: hash of the resolved pretraining config (:func:`medseg_core.config.config_hash`).
        **extra: stored as is (``plan``, ``labels``, ``channel_names``, ``epoch``, ``sites``, ``num_images`` ...).

    Returns:
        The path written.
    """
    scope = model.encoder_scope
    return save_encoder_checkpoint(
        path, model.encoder_state_dict(), model_config=model.target_config, scope_prefixes=scope.prefixes,
        excluded_keys=scope.excluded, method=model.method, config_hash=config_hash,
        pretrain=pretrain_settings(model), **extra,
    )
