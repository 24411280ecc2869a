"""Benchmark: utility vs privacy, test Dice of the federated model vs each site's patient-level ε budget.

    python bench/dp_utility.py                     # eps in {1, 4, 8, inf}, seeds 0 1 2 (about 7-10 min on 2 CPUs)
    python bench/dp_utility.py --quick             # 2 rounds, one seed: a smoke run
    python bench/dp_utility.py --write-docs        # also update "## Utility vs privacy" in docs/benchmarks.md

Each point is a whole federated run in this process (real ServerApp loop and ClientApp over
:class:`server.inprocess.InProcessGrid`, no Ray) on a small synthetic federation (2 sites, 32^3 volumes,
a tiny 3D U-Net, FedAvg). ``eps`` is each site's total budget for the run (``privacy=dp``): the noise
multiplier is calibrated once from it over all rounds x local epochs (RDP, Opacus' conversion, delta =
1/(10 N)), with per-patient clipping C = 1 and Poisson sampling. ``inf`` is the same model, data and
schedule without DP (the DP-compatible network, one crop per patient per step, no gradient clipping).
The figure is the case-weighted test Dice (``imagesTs``) of the best round's global model, mean and
standard deviation over seeds (model initialisation, crops; DP noise and sampling come from OS entropy).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from docs_block import write_block

from client.app import app as client_app
from medseg_core.config import load_config
from medseg_core.federation import DICE
from medseg_core.privacy_report import DP_EPSILON, DP_NOISE_MULTIPLIER
from server.inprocess import InProcessGrid
from server.loop import FederatedRun

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "## Utility vs privacy"
SETUP = ("data.synthetic.n_sites=2 data.synthetic.cases_per_site={cases} data.synthetic.n_test=2 "
         "fl.num_rounds={rounds} fl.local_epochs={epochs} fl.final_test=true train.batch_size=2")
NO_DP = "model.dp_compatible=true transforms.crop.num_samples=1 train.grad_clip_norm=null"


def run_point(cache: Path, epsilon: float, seed: int, setup: str, work: Path) -> dict:
    """One federated run; returns test Dice, the sites' final epsilon and sigma, and the time."""
    privacy = NO_DP if math.isinf(epsilon) else f"privacy=dp privacy.epsilon={epsilon} privacy.ledger_scope=run"
    run_dir = work / f"eps{epsilon}-seed{seed}"
    rc = {"experiment": "fl_smoke",
          "overrides": f"data.cache_dir={cache} paths.run_dir={run_dir} seed={seed} {setup} {privacy}"}
    cfg = load_config(rc)
    n = int(cfg.data.synthetic.n_sites)
    grid = InProcessGrid([client_app] * n, [{"partition-id": i, "num-partitions": n} for i in range(n)], run_config=rc)
    t0 = time.perf_counter()
    history = FederatedRun(grid, cfg, say=lambda _line: None).run()
    last = history["rounds"][-1]["train"]
    return {
        "epsilon_budget": epsilon,
        "seed": seed,
        "test_dice": float(history["test"]["aggregate"].get(DICE, math.nan)),
        "best_round": history["best"]["round"],
        "epsilon_spent": max((m.get(DP_EPSILON, 0.0) for m in last.values()), default=0.0),
        "noise_multiplier": max((m.get(DP_NOISE_MULTIPLIER, 0.0) for m in last.values()), default=0.0),
        "seconds": time.perf_counter() - t0,
    }


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation of test Dice per budget."""
    out = []
    for eps in sorted({r["epsilon_budget"] for r in rows}):
        sel = [r for r in rows if r["epsilon_budget"] == eps]
        dice = [r["test_dice"] for r in sel]
        out.append({
            "epsilon_budget": eps,
            "dice_mean": statistics.fmean(dice),
            "dice_sd": statistics.stdev(dice) if len(dice) > 1 else 0.0,
            "epsilon_spent": statistics.fmean(r["epsilon_spent"] for r in sel),
            "noise_multiplier": statistics.fmean(r["noise_multiplier"] for r in sel),
            "seeds": len(sel),
            "seconds": statistics.fmean(r["seconds"] for r in sel),
        })
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["| ε budget per site | σ (calibrated) | ε spent | test Dice (mean ± sd) | seeds | s / run |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        eps = "∞ (no DP)" if math.isinf(s["epsilon_budget"]) else f"{s['epsilon_budget']:g}"
        sigma = "-" if math.isinf(s["epsilon_budget"]) else f"{s['noise_multiplier']:.2f}"
        spent = "-" if math.isinf(s["epsilon_budget"]) else f"{s['epsilon_spent']:.2f}"
        lines.append(f"| {eps} | {sigma} | {spent} | {s['dice_mean']:.3f} ± {s['dice_sd']:.3f} | {s['seeds']} | "
                     f"{s['seconds']:.0f} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [s for s in summary if not math.isinf(s["epsilon_budget"])]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar([s["epsilon_budget"] for s in finite], [s["dice_mean"] for s in finite],
                yerr=[s["dice_sd"] for s in finite], marker="o", capsize=3, label="DP-SGD per site")
    for s in summary:
        if math.isinf(s["epsilon_budget"]):
            ax.axhspan(s["dice_mean"] - s["dice_sd"], s["dice_mean"] + s["dice_sd"], alpha=0.2, color="grey")
            ax.axhline(s["dice_mean"], color="grey", linestyle="--", label="no DP (ε = ∞)")
    ax.set_xscale("log")
    ax.set_xlabel("ε budget per site (δ = 1/(10 N))")
    ax.set_ylabel("test Dice (foreground mean)")
    ax.set_title("Utility vs privacy, synthetic federation")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_docs(table: str, command: str, png: Path, setup: str) -> None:
    """Rewrite this bench's block of the ``## Utility vs privacy`` section of docs/benchmarks.md."""
    body = (f"Command: `{command}` ({setup}; {torch.get_num_threads()} thread(s), "
            f"{time.strftime('%Y-%m-%d')}).\n\n{table}\n\n![Dice vs epsilon]({png.relative_to(DOCS.parent)})\n\n"
            "Each site's budget covers the whole run (σ calibrated once over all rounds × local epochs). "
            "Validation Dice, used to pick the best round, and the test Dice come from held-out patients "
            "and are outside the guarantee.")
    write_block("dp_utility", SECTION, body, DOCS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0, math.inf])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cases", type=int, default=12, help="labelled cases per site (before the val split)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--cache", type=Path, default=None, help="data cache (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, seed 0 only")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seeds = 2, [0]
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    setup = SETUP.format(cases=args.cases, rounds=args.rounds, epochs=args.epochs)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dp-utility-") as tmp:
        cache = args.cache or Path(tmp) / "cache"
        for seed in args.seeds:
            for eps in args.epsilons:
                row = run_point(cache, eps, seed, setup, Path(tmp) / "runs")
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = summarise(rows)
    table = markdown(summary)
    print(table)
    png = plot(summary, DOCS.parent / "img" / "dp_utility.png")
    print(f"plot: {png}")
    if args.write_docs:
        command = "python " + " ".join(["bench/dp_utility.py", *(argv if argv is not None else sys.argv[1:])])
        write_docs(table, command, png, setup)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
