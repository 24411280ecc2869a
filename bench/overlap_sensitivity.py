"""Benchmark: how much the federated-vs-pooled comparison depends on the test's sliding-window overlap.

    python bench/overlap_sensitivity.py --work /tmp/fvo --strategies fedavg fedbn --seeds 0 1 2

Re-scores the finished runs of a ``bench/federated_vs_pooled.py`` work folder on each site's test patients,
on the plan's grid, at several sliding-window overlaps (default 0.25, the validation passes' setting, and
0.5, ``medseg-predict``'s and nnU-Net's), with the same models the tables used: each site's copy of the
best federated model (``model_best.pt`` in the run's site state, FedBN's own layers included) and the
pooled baselines' ``best.pt`` (no post-processing in any arm). Prints one table per overlap (mean ± sd over
seeds, as ``medseg-compare``) and the FedAvg - pooled gap. Nothing is trained.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from monai.data import DataLoader, Dataset
from omegaconf import OmegaConf

from client.site import SiteState
from medseg_core.checkpoint import load_checkpoint, model_from_checkpoint
from medseg_core.data.source import ensure_data_root
from medseg_core.data.transforms import build_transforms
from medseg_core.engine import evaluate
from medseg_core.workflow import foreground_classes, roi_size, validated_sites
from server.compare import POOLED, markdown_table, summarise


def site_dice(payload: dict, site, overlaps: list[float]) -> dict[float, float]:
    """Foreground-mean test Dice of one site's test patients at each overlap, plan grid, raw predictions."""
    plan = payload["plan"]
    model = model_from_checkpoint(payload).eval()
    tf = build_transforms(plan, train=False, modalities=site.channel_names, spatial_dims=3)
    loader = DataLoader(Dataset([c.as_dict() for c in site.test_cases], tf), batch_size=1)
    return {ov: evaluate(model, loader, device=torch.device("cpu"), roi_size=roi_size(plan, 3),
                         class_values=foreground_classes(site.labels), overlap=ov, hd95=False)["mean_dice"]
            for ov in overlaps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a bench/federated_vs_pooled.py work folder")
    parser.add_argument("--strategies", nargs="+", default=["fedavg", "fedbn"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the per-run figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    first = args.work / f"{args.strategies[0]}-s{args.seeds[0]}"
    cfg = OmegaConf.load(first / "resolved_config.yaml")
    sites = validated_sites(ensure_data_root(cfg.data, progress=False), cfg.data.sites, log=lambda *_: None)
    rows: dict[float, list[dict]] = {ov: [] for ov in args.overlaps}
    for seed in args.seeds:
        for method in [*args.strategies, POOLED]:
            dice: dict[float, dict[str, float]] = {ov: {} for ov in args.overlaps}
            for site in sites:
                if method == POOLED:
                    payload = load_checkpoint(args.work / "compare" / f"{POOLED}-seed{seed}" / "best.pt")
                else:
                    run = args.work / f"{method}-s{seed}"
                    run_name = json.loads((run / "history.json").read_text())["run_name"]
                    state_root = Path(str(OmegaConf.load(run / "resolved_config.yaml").fl.state_dir)) / site.name
                    payload = load_checkpoint(SiteState(state_root, run_name).model_path)
                for ov, value in site_dice(payload, site, args.overlaps).items():
                    dice[ov][site.name] = value
            for ov in args.overlaps:
                rows[ov].append({"method": method, "seed": seed, "dice": dice[ov]})
            print(f"{method} seed {seed}: " + "; ".join(
                f"overlap {ov:g} {({k: round(v, 3) for k, v in dice[ov].items()})}" for ov in args.overlaps),
                flush=True)
    for ov in args.overlaps:
        summary = summarise(rows[ov])
        print(f"\nOverlap {ov:g} (plan grid):\n\n{markdown_table(summary)}")
        if "fedavg" in summary:
            gap = 100 * (summary[POOLED]["mean"]["mean"] - summary["fedavg"]["mean"]["mean"])
            print(f"\nFedAvg vs pooled at overlap {ov:g}: gap {gap:+.1f} Dice points")
    if args.json:
        args.json.write_text(json.dumps({str(ov): r for ov, r in rows.items()}, indent=1))
    print(f"\n{(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
