"""Where a run's data comes from: a given folder, or the embedded synthetic federation (made once)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

READY_MARKER = ".complete"


def _plain(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def synthetic_root(data_cfg: DictConfig | Mapping[str, Any]) -> Path:
    """The cache folder of the synthetic federation described by ``data.synthetic`` (one per setting)."""
    data = _plain(data_cfg)
    params = data["synthetic"]
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return Path(str(data["cache_dir"])).expanduser() / f"synthetic-{key}"


def ensure_data_root(data_cfg: DictConfig | Mapping[str, Any], progress: bool = False) -> Path:
    """Return the federation root to use, generating the synthetic federation on first use.

    Safe when several processes (simulated clients) ask at once: one generates into a temporary folder
    under a file lock and renames it into place; the others wait and reuse it.

    Raises:
        FileNotFoundError: ``data.root`` is given but does not exist.
    """
    data = _plain(data_cfg)
    if data.get("root"):
        root = Path(str(data["root"])).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"data.root {root} does not exist")
        return root
    from medseg_core.data.synthetic import make_federation

    root = synthetic_root(data)
    if (root / READY_MARKER).exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / READY_MARKER).exists():
            return root
        params = data["synthetic"]
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
        try:
            make_federation(
                tmp, n_sites=int(params["n_sites"]), cases_per_site=int(params["cases_per_site"]),
                seed=int(params["seed"]), shape=tuple(int(s) for s in params["shape"]),
                n_test=int(params["n_test"]), n_unlabelled=int(params["n_unlabelled"]), progress=progress,
            )
            (tmp / READY_MARKER).write_text(json.dumps(params, sort_keys=True))
            if root.exists():  # an incomplete earlier attempt
                shutil.rmtree(root)
            tmp.rename(root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return root
