"""Whole-volume inference: sliding window (MONAI), mirror test-time augmentation, post-processing."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from medseg_core.runtime import autocast


def main_output(output: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The full-resolution prediction of a network that may return deep-supervision outputs.

    Args:
        output: ``[B, C, *spatial]``, a list/tuple whose first item is the full-resolution output, or
            MONAI DynUNet's training-mode stack ``[B, S, C, *spatial]`` (never seen in eval mode).
    """
    if isinstance(output, (list, tuple)):
        return output[0]
    return output


def mirror_axes(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every non-empty combination of spatial axes (tensor dims 2..), for mirror TTA: 3 in 2D, 7 in 3D."""
    axes = range(2, 2 + spatial_dims)
    return [c for r in range(1, spatial_dims + 1) for c in itertools.combinations(axes, r)]


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int],
    *,
    sw_batch_size: int = 2,
    overlap: float = 0.25,
    mode: str = "gaussian",
    tta: bool = False,
    amp: bool = False,
    model_spatial_dims: int | None = None,
) -> torch.Tensor:
    """Softmax probabilities of a whole volume by sliding-window inference.

    Args:
        model: segmentation network (put in eval mode by the caller or here).
        image: ``[B, C_in, *spatial]`` on the model's device.
        roi_size: window size (the training patch size).
        tta: average over the identity and every mirror flip (nnU-Net's mirroring).
        amp: run the network under the device's autocast (see :func:`medseg_core.runtime.autocast`).
        model_spatial_dims: 2 for a 2D network applied slice by slice to a 3D volume (axial slices, the
            last axis, as in training); default: the image's dimensionality.

    Returns:
        ``[B, C_out, *spatial]`` float32 probabilities on the image's device.

    Raises:
        ValueError: ``roi_size`` does not match the image's spatial dimensionality.
    """
    spatial_dims = image.ndim - 2
    model_dims = model_spatial_dims or spatial_dims
    slice_wise = model_dims == 2 and spatial_dims == 3
    if len(roi_size) != model_dims or not (model_dims == spatial_dims or slice_wise):
        raise ValueError(
            f"roi_size {tuple(roi_size)} of a {model_dims}D model does not fit a {spatial_dims}D image "
            f"{tuple(image.shape)}"
        )
    if slice_wise:  # windows of one axial slice: [B, C, h, w, 1] -> 2D model -> back
        roi_size = (*roi_size, 1)
    model.eval()

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, amp):
            if slice_wise:
                return main_output(model(x[..., 0])).float()[..., None]
            return main_output(model(x)).float()

    def run(x: torch.Tensor) -> torch.Tensor:
        logits = sliding_window_inference(
            x, roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, predictor=predictor,
            overlap=overlap, mode=mode,
        )
        return torch.softmax(torch.as_tensor(logits), dim=1)

    probs = run(image)
    if tta:
        flips = mirror_axes(spatial_dims)
        for axes in flips:
            probs += torch.flip(run(torch.flip(image, axes)), axes)
        probs /= 1 + len(flips)
    return probs


def keep_largest_component(labels: np.ndarray, class_values: Sequence[int]) -> np.ndarray:
    """Keep only the largest connected component of each given foreground class (26/8-connectivity).

    Args:
        labels: integer label map ``[*spatial]``.
        class_values: classes to clean (others are left as they are).

    Returns:
        A new label map; removed voxels become background (0).
    """
    out = labels.copy()
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    for value in class_values:
        mask = labels == value
        if not mask.any():
            continue
        comp, n = ndimage.label(mask, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        out[(comp != int(sizes.argmax())) & mask] = 0
    return out
