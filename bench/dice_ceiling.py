"""Benchmark: how much Dice a one-voxel boundary error costs each structure on the metric's grid.

    python bench/dice_ceiling.py --run RUN_DIR                 # the federation and plan a medseg-train run used
    python bench/dice_ceiling.py --run RUN_DIR --write-docs    # also update docs/benchmarks.md

Dice is scored on the plan's grid (``medseg_core.engine.evaluate``), where a small lesion has a few dozen
voxels, most of them on its surface. This script takes every held-out (test) case of every site, resamples
its label map exactly as evaluation does, and scores the ground truth against itself grown or shrunk by one
voxel (6-connected dilation / erosion) and shifted by one voxel along each axis. Those are the smallest
errors a segmentation can make, so their Dice is what a near-perfect model can still lose per structure;
it puts a model's figures (and a target such as "mean foreground Dice >= 0.85") in proportion.
No model is involved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from docs_block import write_block
from monai.data import Dataset
from omegaconf import OmegaConf
from scipy import ndimage as ndi

from medseg_core.data.transforms import build_transforms
from medseg_core.workflow import validated_sites

SECTION = "### Dice ceiling on the metric's grid (bench/dice_ceiling.py)"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (both empty: 1)."""
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def perturbations(mask: np.ndarray) -> dict[str, float]:
    """Dice of ``mask`` [X, Y, Z] against its one-voxel dilation, erosion and the mean over the 6 shifts."""
    struct = ndi.generate_binary_structure(3, 1)
    shifts = []
    for axis in range(3):
        for step in (-1, 1):
            shifts.append(dice(mask, np.roll(mask, step, axis=axis)))
    return {"dilate_1": dice(mask, ndi.binary_dilation(mask, struct)),
            "erode_1": dice(mask, ndi.binary_erosion(mask, struct)),
            "shift_1": statistics.fmean(shifts)}


def measure(run_dir: Path) -> dict:
    """Per test case and foreground class: voxel count and the Dice of each one-voxel perturbation."""
    cfg = OmegaConf.load(run_dir / "resolved_config.yaml")
    plan = json.loads((run_dir / "plan.json").read_text())
    sites = validated_sites(cfg.data.root, cfg.data.sites, log=lambda *a: None)
    labels = {int(v): k for k, v in dict(sites[0].labels).items() if int(v) != 0}
    rows = []
    for site in sites:
        tf = build_transforms(plan, train=False, modalities=site.channel_names, spatial_dims=3)
        for case in site.test_cases:
            label = np.asarray(Dataset([case.as_dict()], tf)[0]["label"])[0]  # [X, Y, Z] on the plan's grid
            for value, name in labels.items():
                mask = label == value
                if mask.any():
                    rows.append({"site": site.name, "case": case.case_id, "class": name,
                                 "voxels": int(mask.sum()), **perturbations(mask)})
    return {"run_dir": str(run_dir), "spacing_mm": plan["target_spacing_mm"],
            "classes": list(labels.values()), "rows": rows}


def markdown(result: dict, command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "Test cases of every site, label maps on the plan's grid (the grid Dice is scored on). Each "
             "column is the Dice of the ground truth against itself after the smallest possible error.", "",
             "| class | structures | voxels: median (min–max) | 1-voxel dilation | 1-voxel erosion | 1-voxel shift |",
             "|---|---|---|---|---|---|"]
    for name in result["classes"]:
        rows = [r for r in result["rows"] if r["class"] == name]
        if not rows:
            continue
        vox = [r["voxels"] for r in rows]
        lines.append(f"| {name} | {len(rows)} | {statistics.median(vox):.0f} ({min(vox)}–{max(vox)}) | "
                     + " | ".join(f"{statistics.fmean(r[k] for r in rows):.3f}"
                                  for k in ("dilate_1", "erode_1", "shift_1")) + " |")
    lines += ["", "Per structure:", "", "| site | case | class | voxels | dilation | erosion | shift |",
              "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['site']} | {r['case']} | {r['class']} | {r['voxels']} | {r['dilate_1']:.3f} | "
                     f"{r['erode_1']:.3f} | {r['shift_1']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a medseg-train run directory (resolved_config.yaml, "
                                                            "plan.json)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args(argv)
    for name in ("resolved_config.yaml", "plan.json"):
        if not (args.run / name).is_file():
            p.error(f"{args.run / name} does not exist: --run must be a medseg-train run directory")
    result = measure(args.run)
    command = "python bench/dice_ceiling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = markdown(result, command.strip())
    print(md)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.write_docs:
        print("wrote", write_block("dice_ceiling", SECTION, md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
