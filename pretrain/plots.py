"""Reconstruction pictures: input / masked input / reconstruction / reconstruction pasted into the input."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pretrain.base import ReconstructionView  # noqa: E402


def _slice(volume: np.ndarray) -> np.ndarray:
    """A 2D image of ``[*S]``: itself in 2D, the middle slice of the last (axial, after RAS) axis in 3D."""
    return volume if volume.ndim == 2 else volume[..., volume.shape[-1] // 2]


def plot_reconstruction(view: ReconstructionView, path: str | Path, *, max_samples: int = 2, max_channels: int = 3,
                        channel_names: Mapping[int, str] | None = None, title: str = "") -> Path:
    """One row per (sample, channel): input, masked input, reconstruction, reconstruction + visible input.

    Args:
        view: from :meth:`PretrainModel.reconstruct` / :func:`pretrain.engine.reconstruction_example`.
        path: output PNG.
        max_samples, max_channels: rows shown.
        channel_names: channel index -> modality, for row labels.
    """
    image, masked, recon, pasted = (t.detach().cpu().float().numpy()
                                    for t in (view.image, view.masked, view.reconstruction, view.pasted()))
    samples = min(max_samples, image.shape[0])
    channels = min(max_channels, image.shape[1])
    rows = [(b, c) for b in range(samples) for c in range(channels)]
    fig, axes = plt.subplots(len(rows), 4, figsize=(12, 3 * len(rows)), squeeze=False)
    columns = ("input", "masked input", "reconstruction", "reconstruction + visible")
    for r, (b, c) in enumerate(rows):
        ref = _slice(image[b, c])
        lo, hi = np.percentile(ref, [1, 99]) if ref.size else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1.0
        for k, data in enumerate((image, masked, recon, pasted)):
            ax = axes[r][k]
            ax.imshow(_slice(data[b, c]).T, cmap="gray", vmin=lo, vmax=hi, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[k])
        name = (channel_names or {}).get(c, f"channel {c}")
        axes[r][0].set_ylabel(f"sample {b}, {name}")
    fig.suptitle(title or f"masked reconstruction (loss {view.loss:.4f})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
