"""``medseg-compare``: a FLamby-style table — federated vs pooled vs local-only training, per site.

    flwr run . --stream --run-config "overrides='strategy=fedavg seed=0 paths.run_dir=runs/fedavg-s0'" ...
    flwr run . --stream --run-config "overrides='strategy=fedbn seed=0 paths.run_dir=runs/fedbn-s0'" ...
    medseg-compare --federated runs/fedavg-s0 runs/fedbn-s0 --out runs/compare

Each federated run directory brings its strategy, seed and test Dice per site (the best global model on
each site's ``imagesTs``; FedBN with each site's own normalisation). The baselines are trained here with
``medseg-train``'s code on the same data, model, loss, optimiser and augmentation (the federated run's
``resolved_config.yaml``) and the same number of passes over the data (``fl.num_rounds *
fl.local_epochs`` epochs): *pooled* (all sites' cases together, as if they could be shared) and
*local-only* (each site alone, tested on its own test split). Seeds are those of the federated runs.

``--grid scan`` compares the test Dice on each scan's own grid (what ``medseg-predict`` delivers and where
nnU-Net reports) instead of the plan's resampled grid (the default, ``plan``). Federated runs must have
scored it (``eval.original_grid``, the default since it exists); a reused baseline that predates it is
scored now from its ``best.pt``.

Writes ``comparison.json``, ``comparison.md`` (mean ± sd over seeds) and ``comparison.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from omegaconf import OmegaConf

from medseg_core.checkpoint import write_json, write_text
from medseg_core.config import compose_config
from medseg_core.federation import DICE
from server.report import ORIGINAL_DICE
from server.run_files import RunFiles

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

POOLED, LOCAL = "pooled", "local-only"
#: config groups / keys a baseline takes from the federated run (what is trained, on what, and how)
SHARED_KEYS = ("seed", "device", "data", "transforms", "model", "loss", "optim", "eval")
#: where the test Dice is read: the plan's grid (resampled labels) or each scan's own grid
GRIDS = ("plan", "scan")
GRID_WORDS = {"plan": "on the plan's grid", "scan": "on each scan's own grid"}


def _check_grid(grid: str) -> str:
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, not {grid!r}")
    return grid


def load_federated(run_dir: Path, grid: str = "plan") -> dict[str, Any]:
    """Strategy, seed, config and per-site test Dice (on ``grid``) of a finished federated run.

    Raises:
        FileNotFoundError: no ``history.json`` / ``resolved_config.yaml``.
        ValueError: the run has no final test evaluation, or (``grid="scan"``) none on the scans' grids.
    """
    key = DICE if _check_grid(grid) == "plan" else ORIGINAL_DICE
    files = RunFiles(Path(run_dir))
    for path in (files.history, files.resolved_config):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {run_dir} a federated run directory?")
    history = json.loads(files.history.read_text())
    cfg = OmegaConf.load(files.resolved_config)
    sites = history.get("test", {}).get("sites", {})
    if not sites:
        raise ValueError(f"{run_dir}: no test evaluation in history.json (status {history.get('status')!r})")
    missing = sorted(s for s, m in sites.items() if key not in m)
    if grid == "scan" and missing:
        raise ValueError(f"{run_dir}: sites {missing} have no test Dice on the scans' own grids in history.json "
                         "(the run predates that scoring or set eval.original_grid=false); use --grid plan")
    return {
        "method": str(history.get("strategy") or cfg.strategy.name),
        "seed": int(cfg.seed),
        "cfg": cfg,
        "dice": {s: float(m.get(key, math.nan)) for s, m in sites.items()},
        "run_dir": str(run_dir),
    }


def baseline_config(fed_cfg, *, seed: int, epochs: int, run_dir: Path, sites: Sequence[str] | None):
    """The ``train`` config of a baseline matching a federated run's settings."""
    cfg = compose_config("train")
    merged = OmegaConf.to_container(cfg, resolve=False)
    fed = OmegaConf.to_container(fed_cfg, resolve=True)
    for key in SHARED_KEYS:
        if key in fed:
            merged[key] = fed[key]
    merged["seed"] = int(seed)
    merged["data"]["sites"] = list(sites) if sites else None
    merged["train"].update(
        epochs=int(epochs),
        progress=False,
        batch_size=fed["train"]["batch_size"],
        grad_clip_norm=fed["train"]["grad_clip_norm"],
        amp=fed["train"]["amp"],
        # model selection at the federated run's granularity: it validates once per round (local_epochs epochs)
        val_every=int(fed["fl"]["local_epochs"]),
    )
    merged["eval"] = {**merged["eval"], "postprocess": False}  # federated runs score raw predictions too
    merged["paths"] = {"run_dir": str(run_dir)}
    sched = dict(fed.get("sched") or {})
    for horizon in ("total_iters", "T_max"):  # the federated schedule spans rounds; a baseline's spans epochs
        if horizon in sched:
            sched[horizon] = int(epochs)
    merged["sched"] = sched or None
    return OmegaConf.create(merged)


def _train_or_reuse(cfg, run_dir: Path, grid: str = "plan") -> dict[str, Any]:
    """``medseg-train``'s summary for ``run_dir``: a finished run there is reused (with ``grid="scan"``, scored
    on the scans' grids now if it predates that), otherwise trained."""
    from medseg_core.train_cli import add_original_grid_scores, run_training  # heavy: only for baselines

    done = run_dir / "history.json"
    if done.is_file():
        summary = json.loads(done.read_text()).get("summary")
        if summary and summary.get("test_per_site"):
            if grid == "scan" and not summary.get("test_per_site_original_grid"):
                summary = add_original_grid_scores(run_dir)
            return summary
    return run_training(cfg, run_dir)


def _site_dice(summary: Mapping[str, Any], grid: str) -> dict[str, float]:
    """A baseline's test Dice per site on ``grid``."""
    return dict(summary["test_per_site_original_grid" if grid == "scan" else "test_per_site"])


def train_baselines(
    fed: Mapping[str, Any], sites: Sequence[str], out: Path, log=print, local: bool = True, grid: str = "plan"
) -> list[dict[str, Any]]:
    """Pooled and (with ``local``) local-only training for one federated run's settings and seed; baselines
    already finished under ``out`` are reused."""

    cfg = fed["cfg"]
    epochs = int(cfg.fl.num_rounds) * int(cfg.fl.local_epochs)
    seed = fed["seed"]
    rows = []
    pooled_dir = out / f"{POOLED}-seed{seed}"
    log(f"pooled baseline, seed {seed}: {epochs} epochs over {list(sites)} -> {pooled_dir}")
    summary = _train_or_reuse(
        baseline_config(cfg, seed=seed, epochs=epochs, run_dir=pooled_dir, sites=sites), pooled_dir, grid
    )
    rows.append({"method": POOLED, "seed": seed, "dice": _site_dice(summary, grid), "run_dir": str(pooled_dir)})
    if not local:
        return rows
    local_dice: dict[str, float] = {}
    for site in sites:
        site_dir = out / f"{LOCAL}-{site}-seed{seed}"
        log(f"local-only baseline {site}, seed {seed}: {epochs} epochs -> {site_dir}")
        summary = _train_or_reuse(
            baseline_config(cfg, seed=seed, epochs=epochs, run_dir=site_dir, sites=[site]), site_dir, grid
        )
        local_dice[site] = float(_site_dice(summary, grid).get(site, math.nan))
    rows.append({"method": LOCAL, "seed": seed, "dice": local_dice, "run_dir": str(out)})
    return rows


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {site | "mean": {"mean", "sd", "n"}}}`` over seeds (the site mean is taken per seed)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        runs = [r for r in rows if r["method"] == method]
        sites = sorted({s for r in runs for s in r["dice"]})
        cells: dict[str, list[float]] = {s: [r["dice"].get(s, math.nan) for r in runs] for s in sites}
        cells["mean"] = [float(np.nanmean([r["dice"][s] for s in r["dice"]])) for r in runs]
        out[method] = {}
        for key, values in cells.items():
            v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
            out[method][key] = {
                "mean": float(v.mean()) if v.size else math.nan,
                "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
                "n": int(v.size),
            }
    return out


def markdown_table(summary: Mapping[str, Mapping[str, Mapping[str, float]]], grid: str = "plan") -> str:
    """Methods as rows, sites (and the mean over sites) as columns: test Dice mean ± sd over seeds."""
    sites = sorted({s for cells in summary.values() for s in cells if s != "mean"})
    cols = [*sites, "mean"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for method, cells in summary.items():
        row = []
        for c in cols:
            cell = cells.get(c)
            row.append(
                "-"
                if not cell or not math.isfinite(cell["mean"])
                else f"{cell['mean']:.3f} ± {cell['sd']:.3f}"
                if cell["n"] > 1
                else f"{cell['mean']:.3f}"
            )
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    n = max((c["n"] for cells in summary.values() for c in cells.values()), default=0)
    lines.append("")
    lines.append(
        f"Test Dice (foreground mean) per site {GRID_WORDS[grid]}, mean ± sd over {n} seed(s); local-only: "
        f"each site's model on its own test split."
    )
    return "\n".join(lines)


def plot(summary: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path, grid: str = "plan") -> Path:
    """Grouped bars: per site (and mean), one bar per method, error bars = sd over seeds."""
    sites = sorted({s for cells in summary.values() for s in cells if s != "mean"}) + ["mean"]
    methods = list(summary)
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(sites) + 2), 4))
    x = np.arange(len(sites))
    for i, method in enumerate(methods):
        means = [summary[method].get(s, {}).get("mean", math.nan) for s in sites]
        sds = [summary[method].get(s, {}).get("sd", 0.0) for s in sites]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=sds, capsize=3, label=method)
    ax.set_xticks(x, sites)
    ax.set_ylabel(f"test Dice ({grid} grid)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("federated vs pooled vs local-only")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(federated: Sequence[str | Path], out: str | Path, *, baselines: bool = True, local: bool = True,
            log=print, grid: str = "plan") -> dict:
    """Build the comparison; see the module docstring. Returns what ``comparison.json`` holds.

    Raises:
        ValueError: no federated run, runs on different sites, an unknown ``grid``, or (``grid="scan"``) a
            federated run without scan-grid test scores.
    """
    _check_grid(grid)
    if not federated:
        raise ValueError("give at least one federated run directory (--federated)")
    out = Path(out)
    feds = [load_federated(Path(d), grid) for d in federated]
    sites = sorted(feds[0]["dice"])
    for fed in feds[1:]:
        if sorted(fed["dice"]) != sites:
            raise ValueError(f"{fed['run_dir']} was tested on sites {sorted(fed['dice'])}, not {sites}")
    rows = [{k: f[k] for k in ("method", "seed", "dice", "run_dir")} for f in feds]
    if baselines:
        seen: set[int] = set()
        for fed in feds:  # one set of baselines per seed (the settings of the first run with that seed)
            if fed["seed"] not in seen:
                seen.add(fed["seed"])
                rows += train_baselines(fed, sites, out, log=log, local=local, grid=grid)
    summary = summarise(rows)
    result = {"sites": sites, "grid": grid, "rows": rows, "summary": summary}
    write_json(result, out / "comparison.json")
    table = markdown_table(summary, grid)
    write_text(
        f"# Federated vs pooled vs local-only\n\n{table}\n\n![comparison](comparison.png)\n",
        out / "comparison.md",
    )
    plot(summary, out / "comparison.png", grid)
    log(table)
    log(f"wrote {out / 'comparison.md'}, {out / 'comparison.json'}, {out / 'comparison.png'}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medseg-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--federated", nargs="+", required=True, help="finished federated run directories")
    parser.add_argument(
        "--out", default="runs/compare", help="output folder (baselines are trained under it)"
    )
    parser.add_argument("--no-baselines", action="store_true", help="only tabulate the federated runs")
    parser.add_argument("--no-local", action="store_true", help="pooled baseline only (no local-only runs)")
    parser.add_argument("--grid", choices=GRIDS, default="plan",
                        help="score on the plan's grid (default) or on each scan's own grid, as medseg-predict "
                             "delivers it")
    args = parser.parse_args(argv)
    try:
        compare(args.federated, args.out, baselines=not args.no_baselines, local=not args.no_local,
                grid=args.grid)
    except (FileNotFoundError, ValueError) as exc:
        print(f"medseg-compare: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
