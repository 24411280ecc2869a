"""What every self-supervised pretraining model offers the engine, the CLI and the federated client.

A :class:`PretrainModel` wraps (a part of) a registry segmentation network:

- ``model(images)`` -> scalar reconstruction loss on the masked blocks (``images``: ``[B, C, *S]``);
- ``model.reconstruct(images)`` -> :class:`ReconstructionView` for pictures;
- ``model.encoder_state_dict()`` -> the weights to transfer, under the *segmentation model's* keys;
- ``model.encoder_scope`` -> which keys of the segmentation model those weights are meant to cover
  (key prefixes, minus keys deliberately left out such as the output head).

The whole wrapper's ``state_dict`` (encoder + decoder + mask token) is what a federated server averages.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from pretrain.masking import MaskGenerator


@dataclass(frozen=True)
class ReconstructionView:
    """One masked-reconstruction pass, for display (all ``[B, C, *S]`` except ``mask``).

    Attributes:
        image: the input.
        masked: what the network saw (masked blocks set to 0).
        reconstruction: the prediction in image intensities (norm-pix predictions de-normalised with
            the true patch statistics, as MAE's visualisation does).
        mask: ``[B, 1, *S]``, 1 = masked.
        loss: the loss of this pass.
    """

    image: torch.Tensor
    masked: torch.Tensor
    reconstruction: torch.Tensor
    mask: torch.Tensor
    loss: float

    def pasted(self) -> torch.Tensor:
        """Reconstruction on the masked blocks, the input elsewhere ``[B, C, *S]``."""
        return self.image * (1 - self.mask) + self.reconstruction * self.mask


@dataclass(frozen=True)
class EncoderScope:
    """Which keys of the segmentation model an encoder checkpoint covers.

    Attributes:
        prefixes: state-dict key prefixes (``("encoder.",)`` for TransUNet, ``("vit.",)`` for UNETR,
            ``("",)`` for a whole CNN U-Net).
        excluded: keys under those prefixes that are deliberately not transferred (e.g. the output head,
            whose shape depends on the number of classes).
    """

    prefixes: tuple[str, ...]
    excluded: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, list[str]]:
        return {"prefixes": list(self.prefixes), "excluded": list(self.excluded)}


class PretrainModel(nn.Module, abc.ABC):
    """Base class of the masked-reconstruction wrappers.

    Attributes:
        method: ``"mim"``, ``"mae_transunet"`` or ``"mae_vit"``.
        target_config: registry kwargs of the segmentation model the encoder is for (``name`` included).
        spatial_dims, in_channels: of the input images.
        mask_generator: the seeded :class:`MaskGenerator`.
        norm_pix: MAE's per-patch normalised targets.
    """

    method: str = ""

    def __init__(self, target_config: Mapping[str, Any], mask_generator: MaskGenerator, norm_pix: bool) -> None:
        super().__init__()
        self.target_config = dict(target_config)
        self.spatial_dims = int(self.target_config["spatial_dims"])
        self.in_channels = int(self.target_config["in_channels"])
        self.mask_generator = mask_generator
        if not isinstance(norm_pix, bool):
            raise ValueError(f"norm_pix={norm_pix!r} must be true or false")
        self.norm_pix = norm_pix

    def check_input(self, x: torch.Tensor, multiple: tuple[int, ...]) -> None:
        """Raise ``ValueError`` unless ``x`` is ``[B, in_channels, *S]`` with ``S`` divisible by ``multiple``."""
        if (
            x.ndim != self.spatial_dims + 2
            or x.shape[1] != self.in_channels
            or any(s % m for s, m in zip(x.shape[2:], multiple, strict=True))
        ):
            raise ValueError(
                f"{type(self).__name__} expects [B, {self.in_channels}, *S] with S divisible by {multiple}, "
                f"got {tuple(x.shape)}"
            )

    @property
    @abc.abstractmethod
    def input_multiple(self) -> tuple[int, ...]:
        """Every input side must be a multiple of this (the mask block / token stride), per axis."""

    @property
    def fixed_input_size(self) -> tuple[int, ...] | None:
        """The only input size the model accepts, if it has one (fixed position embeddings)."""
        return None

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scalar masked-reconstruction loss of a batch ``[B, C, *S]``."""

    @abc.abstractmethod
    def reconstruct(self, x: torch.Tensor) -> ReconstructionView:
        """Mask, reconstruct and return everything needed for a picture."""

    @abc.abstractmethod
    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The transferable weights, keyed like the segmentation model's ``state_dict``."""

    @property
    @abc.abstractmethod
    def encoder_scope(self) -> EncoderScope:
        """Which segmentation-model keys :meth:`encoder_state_dict` covers."""
