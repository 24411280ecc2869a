"""Benchmark: federated (FedAvg, FedBN) vs pooled vs local-only test Dice on a heterogeneous federation.

    python bench/federated_vs_pooled.py                 # 3 seeds, FedAvg + FedBN + baselines (~30 min on 2 CPUs)
    python bench/federated_vs_pooled.py --quick         # 2 rounds, one seed: a smoke run
    python bench/federated_vs_pooled.py --write-docs    # also update "## Federated vs pooled" in docs/benchmarks.md

The synthetic federation has three scanners (CT in HU, MR-T1 with a bias field, MR-T2 at 4x intensity
scale with permuted axes), 12 labelled training patients per site (9 train, 3 validation) and 8 test
patients per site. Each federated run is the real ServerApp loop and ClientApp code over
:class:`server.inprocess.InProcessGrid` (no Flower transport; its cost is measured by
``bench/federation_overhead.py``). The baselines are ``medseg-compare``'s: pooled (all training cases
together) and local-only (each site alone), trained with ``medseg-train``'s code on the same data, model,
loss, optimiser, augmentation and number of passes over the data (rounds x local epochs). The score is
the best model's foreground-mean test Dice on each site's test patients (FedBN: with each site's own
normalisation layers), mean ± sd over seeds.

Checks printed (and written to the docs): FedAvg's mean per-site test Dice within 2 Dice points of pooled,
and FedBN at least as good as FedAvg on the intensity-shifted (MR) sites.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from docs_block import write_block
from omegaconf import OmegaConf

from client.app import app as client_app
from client.site import SiteState
from medseg_core.checkpoint import write_json
from medseg_core.config import load_config
from medseg_core.data.source import ensure_data_root
from medseg_core.predict import original_grid_metrics
from medseg_core.workflow import validated_sites
from server.compare import GRIDS, POOLED, compare, markdown_table
from server.inprocess import InProcessGrid
from server.loop import FederatedRun
from server.report import ORIGINAL_DICE

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "## Federated vs pooled"
#: the federation and training settings shared by every arm (the baselines read them from the runs)
SETUP = ("data.synthetic.n_sites=3 data.synthetic.cases_per_site={cases} data.synthetic.n_test={test_cases} "
         "data.synthetic.n_unlabelled=0 data.synthetic.shape=[{shape},{shape},{shape}] "
         "data.planning.max_patch_voxels={patch_voxels} transforms.crop.num_samples=4 "
         "fl.num_rounds={rounds} fl.local_epochs={epochs} fl.final_test=true "
         "fl.min_train_nodes=3 fl.min_evaluate_nodes=3 fl.min_available_nodes=3 "
         "model.channels=[16,32,64,128] model.num_res_units=2 optim.lr=0.002 sched=poly")
#: sites whose intensities differ from the CT site's (FedBN's case)
SHIFTED_SITES = ("site_01", "site_02")


def run_federated(cache: Path, strategy: str, seed: int, setup: str, work: Path) -> Path:
    """One federated run in this process (a completed one in ``work`` is reused); returns its run directory."""
    run_dir = work / f"{strategy}-s{seed}"
    done = run_dir / "history.json"
    if done.is_file() and json.loads(done.read_text()).get("status") == "completed":
        print(f"{strategy} seed {seed}: reusing the completed run in {run_dir}", flush=True)
        return run_dir
    rc = {"experiment": "", "overrides": f"data.cache_dir={cache} paths.run_dir={run_dir} seed={seed} "
                                         f"strategy={strategy} {setup}"}
    cfg = load_config(rc)
    n = int(cfg.data.synthetic.n_sites)
    grid = InProcessGrid([client_app] * n, [{"partition-id": i, "num-partitions": n} for i in range(n)],
                         run_config=rc)
    t0 = time.perf_counter()
    history = FederatedRun(grid, cfg, say=lambda _line: None).run()
    test = {s: round(m.get("dice", math.nan), 3) for s, m in history["test"]["sites"].items()}
    print(f"{strategy} seed {seed}: test Dice {test} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return run_dir


def score_on_scan_grids(run_dir: Path) -> None:
    """A federated run finished before its sites scored the final test on the scans' own grids: score each
    site's copy of the best model now (``model_best.pt`` in the run's site state, FedBN's own layers
    included), exactly as the client's final test does, and add it to ``history.json`` and
    ``test_metrics.json`` (marked ``original_grid_scored_later``). Runs that have it are left alone."""
    history = json.loads((run_dir / "history.json").read_text())
    test = history["test"]
    if all(ORIGINAL_DICE in m for m in test["sites"].values()):
        return
    cfg = OmegaConf.load(run_dir / "resolved_config.yaml")
    sites = {s.name: s for s in validated_sites(ensure_data_root(cfg.data, progress=False), cfg.data.sites,
                                                skip_bad=bool(cfg.data.skip_bad_cases))}
    ev = cfg.eval
    for name, metrics in test["sites"].items():
        model = SiteState(Path(str(cfg.fl.state_dir)) / name, history["run_name"]).model_path
        metrics.update(original_grid_metrics(
            model, sites[name].test_cases, modalities=sites[name].channel_names, device="cpu",
            sw_batch_size=int(ev.sw_batch_size), nsd_tolerance_mm=float(ev.nsd_tolerance_mm), hd95=bool(ev.hd95)))
    test["original_grid_scored_later"] = True
    write_json(history, run_dir / "history.json")
    write_json(test, run_dir / "test_metrics.json")
    dice = {n: round(m[ORIGINAL_DICE], 3) for n, m in test["sites"].items()}
    print(f"{run_dir.name}: scored on the scans' own grids after the run: {dice}", flush=True)


def checks(summary: dict) -> list[str]:
    """The issue's two acceptance statements, evaluated on the summary (mean over seeds)."""
    lines = []
    fedavg, fedbn, pooled = summary.get("fedavg", {}), summary.get("fedbn", {}), summary.get(POOLED, {})
    if fedavg and pooled:
        gap = 100 * (pooled["mean"]["mean"] - fedavg["mean"]["mean"])
        verdict = "met" if gap <= 2.0 else "not met"
        lines.append(f"FedAvg vs pooled, mean per-site test Dice: {fedavg['mean']['mean']:.3f} vs "
                     f"{pooled['mean']['mean']:.3f}, gap {gap:+.1f} Dice points (target ≤ 2): **{verdict}**.")
    if fedavg and fedbn:
        rows = []
        for site in SHIFTED_SITES:
            a, b = fedavg.get(site, {}).get("mean", math.nan), fedbn.get(site, {}).get("mean", math.nan)
            rows.append(f"{site} {b:.3f} vs {a:.3f} ({'≥' if b >= a else '<'})")
        ok = all(fedbn.get(s, {}).get("mean", -1) >= fedavg.get(s, {}).get("mean", math.inf) for s in SHIFTED_SITES)
        lines.append(f"FedBN vs FedAvg on the intensity-shifted MR sites: {', '.join(rows)}: "
                     f"**{'met' if ok else 'not met'}**.")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=["fedavg", "fedbn"])
    parser.add_argument("--cases", type=int, default=12, help="labelled training cases per site (9 train + 3 val)")
    parser.add_argument("--test-cases", type=int, default=8,
                        help="held-out test patients per site (scored only; a lesion Dice on 3 is mostly noise)")
    parser.add_argument("--shape", type=int, default=48, help="stored volume side in voxels")
    parser.add_argument("--patch-voxels", type=int, default=32768, help="data.planning.max_patch_voxels")
    parser.add_argument("--norm", choices=["instance", "batch", "group"], default="instance",
                        help="the U-Net's normalisation (FedBN is defined for BatchNorm statistics)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-fed-vs-pooled"))
    parser.add_argument("--quick", action="store_true", help="2 rounds, seed 0: a smoke run")
    parser.add_argument("--no-baselines", action="store_true", help="only the federated runs")
    parser.add_argument("--no-local", action="store_true", help="pooled baseline only (no local-only runs)")
    parser.add_argument("--set", dest="extra", default="",
                        help="more overrides for the federated runs, e.g. 'fl.keep_optimizer_state=false'")
    parser.add_argument("--grid", choices=GRIDS, default="plan",
                        help="test Dice on the plan's grid or on each scan's own grid (medseg-compare --grid); "
                             "runs that predate scan-grid scoring are scored from their sites' model_best.pt")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.rounds, args.cases, args.test_cases, args.shape = [0], 2, 4, 2, 32
    torch.set_num_threads(args.threads)
    work = args.work.resolve()
    cache = work / "cache"
    setup = SETUP.format(cases=args.cases, test_cases=args.test_cases, shape=args.shape,
                         patch_voxels=args.patch_voxels, rounds=args.rounds, epochs=args.local_epochs)
    if args.norm != "instance":
        setup += f" model.norm={args.norm}"
    if args.extra:
        setup += f" {args.extra}"
    t0 = time.perf_counter()
    runs = [run_federated(cache, strategy, seed, setup, work) for seed in args.seeds for strategy in args.strategies]
    if args.grid == "scan":
        for run in runs:
            score_on_scan_grids(run)
    result = compare(runs, work / "compare", baselines=not args.no_baselines, local=not args.no_local,
                     grid=args.grid)
    minutes = (time.perf_counter() - t0) / 60
    summary = result["summary"]
    verdicts = checks(summary)
    table = markdown_table(summary, args.grid)
    print(table)
    print("\n".join(verdicts))
    (work / "verdicts.json").write_text(json.dumps({"checks": verdicts, "minutes": minutes}, indent=2))
    if args.write_docs:
        png = DOCS.parent / "img" / "federated_vs_pooled.png"
        png.write_bytes((work / "compare" / "comparison.png").read_bytes())
        command = "python bench/federated_vs_pooled.py " + " ".join(argv if argv is not None else sys.argv[1:])
        body = (f"Command: `{command.strip()}` ({setup}; {torch.get_num_threads()} thread(s), {minutes:.0f} min, "
                f"{time.strftime('%Y-%m-%d')}).\n\n{table}\n\n" + "\n".join(f"- {v}" for v in verdicts) +
                f"\n\n![federated vs pooled]({png.relative_to(DOCS.parent)})")
        write_block("federated_vs_pooled", SECTION, body, DOCS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
