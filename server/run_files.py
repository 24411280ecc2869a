"""The run directory of a federated run: where everything the server writes lives.

::

    <run_dir>/resolved_config.yaml    the composed config (what every site must also compose)
              fingerprints.json       each site's fingerprint (aggregates only) as received in round 0
              plan.json               the federated plan sent to every site
              checkpoints/round_NNN.pt global model + strategy state + RNG + history after round NNN
              best.pt                 the global model with the best case-weighted validation Dice
              history.json            per round: per-site and aggregated metrics, faults, timings, privacy
              test_metrics.json       the best model on every site's test split
              dice.png  loss.png      curves per site vs round
              epsilon.png             privacy=dp: cumulative epsilon per site vs round
              report.md               a short human-readable summary

Every file is written atomically, so a crash never leaves a half-written one; a run killed after
round *k* resumes from ``checkpoints/round_k.pt`` (``fl.resume=true paths.run_dir=<run_dir>``).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from medseg_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

ROUND_CHECKPOINT = re.compile(r"^round_(\d{3,})\.pt$")


@dataclass(frozen=True)
class RunFiles:
    """Paths inside one run directory."""

    root: Path

    @property
    def resolved_config(self) -> Path:
        return self.root / "resolved_config.yaml"

    @property
    def fingerprints(self) -> Path:
        return self.root / "fingerprints.json"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        return self.root / "best.pt"

    @property
    def history(self) -> Path:
        return self.root / "history.json"

    @property
    def test_metrics(self) -> Path:
        return self.root / "test_metrics.json"

    @property
    def dice_plot(self) -> Path:
        return self.root / "dice.png"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def epsilon_plot(self) -> Path:
        return self.root / "epsilon.png"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    def round_checkpoint(self, round_idx: int) -> Path:
        return self.checkpoints / f"round_{int(round_idx):03d}.pt"

    def latest_round_checkpoint(self) -> Path | None:
        """The checkpoint of the last completed round, or ``None``."""
        if not self.checkpoints.is_dir():
            return None
        found = [
            (int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := ROUND_CHECKPOINT.match(p.name))
        ]
        return max(found)[1] if found else None


def resolve_run_dir(cfg: DictConfig, *, resume: bool) -> Path:
    """``paths.run_dir``, or ``runs/fl-<timestamp>`` under the current directory.

    Raises:
        ValueError: resuming without ``paths.run_dir``.
        FileNotFoundError: resuming a run directory that does not exist.
    """
    given = cfg.paths.get("run_dir")
    if resume:
        if not given:
            raise ValueError("fl.resume=true needs paths.run_dir=<the run directory to continue>")
        run_dir = Path(str(given)).expanduser().resolve()
        if not run_dir.is_dir():
            raise FileNotFoundError(f"fl.resume=true: run directory {run_dir} does not exist")
        return run_dir
    if given:
        return Path(str(given)).expanduser().resolve()
    return (Path.cwd() / "runs" / time.strftime("fl-%Y%m%d-%H%M%S")).resolve()


def run_name_for(run_dir: Path) -> str:
    """A name for the run, safe as a folder name at the sites (they keep their state under it).

    The folder name plus a short hash of the absolute path, so two runs whose folders share a name
    never share site state, while a resumed run (same folder) finds its own.
    """
    name = re.sub(r"[^A-Za-z0-9._-]", "-", run_dir.name).strip(".-") or "run"
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]
    return f"{name[:100]}-{digest}"


def save_round_checkpoint(
    path: Path, *, global_arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], **extra: Any
) -> Path:
    """A self-describing checkpoint of the global model (``medseg-predict`` can use it) plus run state.

    Args:
        global_arrays: the global weights.
        meta: ``model_config``, ``plan``, ``labels``, ``channel_names`` and the config hashes.
        **extra: ``round_idx``, ``strategy_state``, ``rng``, ``history``, ``best``, ``run_name`` ...
    """
    state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in global_arrays.items()}
    return save_checkpoint(path, state_dict=state, **dict(meta), **extra)


def load_round_checkpoint(path: Path) -> dict[str, Any]:
    """Load a round checkpoint; the global weights come back as NumPy arrays under ``arrays``.

    Raises:
        CheckpointError: unreadable, or not a round checkpoint of a federated run.
    """
    payload = load_checkpoint(path)
    for key in ("round_idx", "strategy_state", "rng", "history", "run_name", "resume_identity"):
        if key not in payload:
            raise CheckpointError(f"{path}: not a federated round checkpoint (no '{key}')")
    payload["arrays"] = {k: v.numpy() for k, v in payload["state_dict"].items()}
    return payload
