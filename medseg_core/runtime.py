"""Device, precision and seeding helpers shared by every entry point."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; otherwise ``torch.device(spec)``.

    Raises:
        ValueError: a CUDA device is asked for on a machine without one.
    """
    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(str(spec))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available on this machine")
    return device


def amp_enabled(setting: bool | str | None, device: torch.device) -> bool:
    """Resolve the ``train.amp`` setting: ``"auto"`` means bf16 autocast on CUDA, off on CPU.

    Raises:
        ValueError: an unknown setting.
    """
    if setting in (None, False, "false", "off"):
        return False
    if setting in (True, "true", "on"):
        return True
    if setting == "auto":
        return device.type == "cuda"
    raise ValueError(f"train.amp must be auto/true/false, got {setting!r}")


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device (no gradient scaler needed for bf16), or a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy, torch and MONAI's random transforms."""
    from monai.utils import set_determinism

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    set_determinism(seed=seed, use_deterministic_algorithms=deterministic or None)


def rng_state() -> dict:
    """Every RNG state needed to continue a run bit-for-bit (for checkpoints)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
