"""Benchmark: label efficiency of self-supervised pretraining (scratch vs pretrained initialisation).

    python bench/label_efficiency.py                               # defaults: ~20-40 min on 2 CPU cores
    python bench/label_efficiency.py --quick                       # smoke run (minutes)
    python bench/label_efficiency.py --federated-encoder run/encoder.pt   # + an encoder from a real `flwr run .`

Protocol (the same for every arm):

- data: a synthetic federation (``--sites`` sites with different scanners/modalities; per site
  ``--cases`` labelled training patients, ``--test`` evaluation patients and ``--unlabelled`` scans
  without labels); one plan for everything (fingerprint of the labelled training cases, as
  ``medseg-train`` does; identical for every arm);
- pretraining never sees an evaluation patient: it reads the unlabelled scans and the *images* of the
  training patients (never a label; the test images are excluded);
- arms: ``scratch``; ``central`` (``medseg-pretrain``'s building blocks on the pooled images);
  ``federated`` (the Flower app's federated pretraining, ``experiment=fl_pretrain``: the real ServerApp
  loop :class:`server.pretrain_loop.FederatedPretrainRun` and ClientApp over
  :class:`server.inprocess.InProcessGrid`; each site trains on its own images, FedAvg by image count,
  the server exports ``encoder.pt``) unless ``--fed-rounds 0``; ``flwr-run`` from ``--federated-encoder``
  (an encoder from a real ``flwr run`` with the same model and images);
- fine-tuning: ``--fractions`` of the labelled patients (stratified by site, nested: the 10 % subset
  is inside the 25 % one), ``--seeds`` seeds (each seed draws its own subsets, decoder initialisation,
  crops and augmentations; all arms share them), the same number of optimiser steps, learning rate,
  loss (Dice + CE) and augmentations in every arm;
- evaluation: Dice per class on every site's evaluation patients (sliding window, whole volumes), mean
  over the patients; the headline compares ``--metric`` (default: the organ, the class the budget
  learns; ``class-mean`` averages the classes); deltas are paired (same fraction, same seed): mean +- sd
  over seeds, plus the fraction of full-label scratch Dice and the share of the gap to it closed.

Prints JSON lines and a markdown table; writes ``results.json`` and ``label_efficiency.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from monai.losses import DiceCELoss  # noqa: E402

from client.app import app as client_app  # noqa: E402
from medseg_core.config import load_config  # noqa: E402
from medseg_core.data.fingerprint import plan_federation, save_json  # noqa: E402
from medseg_core.data.loaders import LoaderSettings, build_site_loaders, build_unlabelled_loader  # noqa: E402
from medseg_core.data.synthetic import make_federation  # noqa: E402
from medseg_core.engine import evaluate, train_one_epoch  # noqa: E402
from medseg_core.federation import TRAIN_LOSS  # noqa: E402
from medseg_core.models.pretrained import load_pretrained_encoder  # noqa: E402
from medseg_core.runtime import seed_everything  # noqa: E402
from medseg_core.workflow import build_configured_model, foreground_classes, pooled_loader, validated_sites  # noqa: E402
from pretrain.builder import build_pretrain_model  # noqa: E402
from pretrain.data import pretraining_cases  # noqa: E402
from pretrain.engine import pretrain_one_epoch, reseed_loader  # noqa: E402
from pretrain.export import export_encoder  # noqa: E402
from server.inprocess import InProcessGrid  # noqa: E402
from server.pretrain_loop import ENCODER_FILE, FederatedPretrainRun  # noqa: E402

MODEL = {"name": "unet", "spatial_dims": 3, "channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1,
         "norm": "instance", "dp_compatible": False}
PRETRAIN = {"method": "mim", "mask_ratio": 0.6, "block_size": None, "norm_pix_loss": False}


def _settings(seed: int, batch_size: int, num_samples: int) -> tuple[LoaderSettings, dict]:
    settings = LoaderSettings(batch_size=batch_size, val_fraction=0.0, seed=seed, cache="memory")
    return settings, {"crop": {"num_samples": num_samples}}


def stratified_order(sites, seed: int) -> list[tuple[str, Any]]:
    """Labelled training patients in a seeded order, sites interleaved (prefixes are site-balanced)."""
    g = torch.Generator().manual_seed(seed)
    per_site = []
    for s in sites:
        cases = sorted(s.train_cases, key=lambda c: c.case_id)
        per_site.append([(s.name, cases[i]) for i in torch.randperm(len(cases), generator=g).tolist()])
    order = []
    for i in range(max(len(p) for p in per_site)):
        order += [p[i] for p in per_site if i < len(p)]
    return order


def subset_sites(sites, chosen: list[tuple[str, Any]]):
    """Copies of the sites holding only the chosen labelled training cases (their test cases kept)."""
    by_site: dict[str, list] = {}
    for name, case in chosen:
        by_site.setdefault(name, []).append(case)
    return [dataclasses.replace(s, cases=by_site[s.name] + s.test_cases) for s in sites if s.name in by_site]


def pretrain_images(sites) -> dict[str, list]:
    """Per site: unlabelled scans + images of the labelled training patients; never a test patient."""
    return {s.name: pretraining_cases(s, unlabelled=True, test=False, train=True) for s in sites}


def pretrain_central(sites, plan, args, out: Path, log) -> Path:
    seed_everything(0)
    settings, tf = _settings(0, args.batch_size, args.num_samples)
    images = pretrain_images(sites)
    loader = pooled_loader([build_unlabelled_loader(s, plan, cases=images[s.name], settings=settings,
                                                    transforms_cfg=tf) for s in sites],
                           batch_size=args.batch_size, seed=0)
    model = build_pretrain_model(PRETRAIN, {**MODEL, "in_channels": 1, "out_channels": args.classes}, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.05)
    losses, start = [], time.perf_counter()
    for epoch in range(args.pretrain_epochs):
        reseed_loader(loader, epoch)
        losses.append(pretrain_one_epoch(model, loader, opt, device=torch.device("cpu"), grad_clip_norm=3.0)["loss"])
    log({"pretrain": "central", "images": sum(map(len, images.values())), "epochs": args.pretrain_epochs,
         "loss_first": losses[0], "loss_last": losses[-1], "seconds": time.perf_counter() - start})
    return export_encoder(model, out / "encoder_central.pt", loss_curve=losses)


def pretrain_federated(data: Path, plan_path: Path, args, out: Path, log) -> Path:
    """Federated pretraining with the Flower app (in-process grid), on the same images as ``central``."""
    run_dir = out / "fl-pretrain"
    model = (f"model.channels=[{','.join(map(str, MODEL['channels']))}] "
             f"model.strides=[{','.join(map(str, MODEL['strides']))}] model.num_res_units={MODEL['num_res_units']}")
    rc = {"experiment": "fl_pretrain", "overrides": (
        f"data.root={data} plan={plan_path} paths.run_dir={run_dir} data.cache_dir={out / 'cache'} {model} "
        f"pretrain.mask_ratio={PRETRAIN['mask_ratio']} images.unlabelled=true images.train=true images.test=false "
        f"images.val_fraction=0 fl.num_rounds={args.fed_rounds} fl.local_epochs={args.fed_local_epochs} "
        f"fl.min_train_nodes={args.sites} fl.min_evaluate_nodes={args.sites} fl.min_available_nodes={args.sites} "
        f"optim.lr={args.pretrain_lr} optim.weight_decay=0.05 sched=none train.batch_size={args.batch_size} "
        f"transforms.crop.num_samples={args.num_samples} seed=0")}
    cfg = load_config(rc)
    grid = InProcessGrid([client_app] * args.sites,
                         [{"partition-id": i, "num-partitions": args.sites} for i in range(args.sites)], run_config=rc)
    start = time.perf_counter()
    history = FederatedPretrainRun(grid, cfg, say=lambda _line: None).run()
    losses = [r.get("train_aggregate", {}).get(TRAIN_LOSS, math.nan) for r in history["rounds"]]
    log({"pretrain": "federated", "rounds": args.fed_rounds, "local_epochs": args.fed_local_epochs,
         "loss_first": losses[0], "loss_last": losses[-1], "seconds": time.perf_counter() - start})
    return run_dir / ENCODER_FILE


def finetune(arm: str, encoder: Path | None, sites, subset, test_loaders, plan, seed: int, args) -> dict[str, Any]:
    seed_everything(seed)
    settings, tf = _settings(seed, args.batch_size, args.num_samples)
    loader = pooled_loader([build_site_loaders(s, plan, settings=settings, transforms_cfg=tf).train
                            for s in subset_sites(sites, subset)], batch_size=args.batch_size, seed=seed)
    cfg = {**MODEL, "in_channels": 1, "out_channels": args.classes}
    torch.manual_seed(seed)  # same initial decoder/head in every arm
    model = build_configured_model(cfg)
    if encoder is not None:
        report = load_pretrained_encoder(model, encoder, model_config=cfg)
        assert report.clean, report.summary()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    steps, start = 0, time.perf_counter()
    epoch = 0
    while steps < args.steps:
        reseed_loader(loader, seed * 10_000 + epoch)
        steps += train_one_epoch(model, loader, loss_fn, opt, device=torch.device("cpu"), grad_clip_norm=12.0,
                                 max_steps=args.steps - steps)["num_steps"]
        epoch += 1
    train_s = time.perf_counter() - start
    classes = foreground_classes(sites[0].labels)
    cases = []
    for loader_ in test_loaders.values():
        cases += evaluate(model, loader_, device=torch.device("cpu"), roi_size=plan["patch_size"], class_values=classes,
                          hd95=False)["cases"]
    per_case = [_mean([m["dice"] for m in c["metrics"].values()]) for c in cases]
    per_class = {n: _mean([c["metrics"][n]["dice"] for c in cases]) for n in classes}
    return {"arm": arm, "seed": seed, "patients": len(subset), "dice": _mean(per_case),
            "dice_per_class": per_class, "train_seconds": train_s}


def _mean(values: list[float]) -> float:
    """Mean of the non-NaN values (NaN: a class absent from both prediction and ground truth), NaN if none."""
    finite = [v for v in values if not math.isnan(v)]
    return statistics.mean(finite) if finite else math.nan


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def score(row: dict, metric: str) -> float:
    """The Dice a row is compared by: one class's (mean over test cases), ``class-mean`` (mean of the
    classes'), or ``case-mean`` (per case, mean over the classes present; sensitive to a few false-positive
    voxels of a class absent from a case, which score that case's class 0)."""
    if metric == "case-mean":
        return row["dice"]
    if metric == "class-mean":
        return statistics.mean(row["dice_per_class"].values())
    return row["dice_per_class"][metric]


def summarise(rows: list[dict], arms: list[str], fractions: list[float], metric: str) -> tuple[str, dict]:
    by = {(r["arm"], r["fraction"], r["seed"]): score(r, metric) for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    full = max(fractions)
    scratch_full = statistics.mean(by[("scratch", full, s)] for s in seeds)
    lines = ["| labels (patients) | " + " | ".join(f"{a} Dice" for a in arms) + " | "
             + " | ".join(f"Δ {a} − scratch (paired)" for a in arms[1:]) + " |",
             "|---|" + "---|" * (2 * len(arms) - 1)]
    stats: dict[str, Any] = {"scratch_full_label_dice": scratch_full, "fractions": {}}
    for f in fractions:
        patients = next(r["patients"] for r in rows if r["fraction"] == f)
        cells = [_ms([by[(a, f, s)] for s in seeds]) for a in arms]
        deltas, entry = [], {}
        for a in arms[1:]:
            d = [by[(a, f, s)] - by[("scratch", f, s)] for s in seeds]
            deltas.append(_ms(d))
            entry[a] = {"delta_mean": statistics.mean(d), "delta_sd": statistics.stdev(d) if len(d) > 1 else 0.0,
                        "dice_mean": statistics.mean(by[(a, f, s)] for s in seeds),
                        "fraction_of_full_scratch": statistics.mean(by[(a, f, s)] for s in seeds) / scratch_full}
        scratch_f = statistics.mean(by[("scratch", f, s)] for s in seeds)
        gap = scratch_full - scratch_f
        for a in arms[1:]:
            entry[a]["gap_closed"] = (entry[a]["dice_mean"] - scratch_f) / gap if gap > 1e-9 else math.nan
        entry["scratch"] = {"dice_mean": scratch_f, "fraction_of_full_scratch": scratch_f / scratch_full}
        stats["fractions"][str(f)] = entry
        lines.append(f"| {f:.0%} ({patients}) | " + " | ".join(cells) + " | " + " | ".join(deltas) + " |")
    low = str(min(fractions))
    lines.append("")
    for a in arms[1:]:
        lo, hi = stats["fractions"][low][a], stats["fractions"][str(full)][a]
        lines.append(
            f"- {a}: at {float(low):.0%} labels {lo['fraction_of_full_scratch']:.1%} of full-label scratch Dice "
            f"(target >= 90 %; scratch {stats['fractions'][low]['scratch']['fraction_of_full_scratch']:.1%}), "
            f"gap closed {lo['gap_closed']:.0%} (target >= 40 %); at {full:.0%} Δ {hi['delta_mean']:+.3f} "
            f"(target within ±0.01)")
    return "\n".join(lines), stats


def per_class_table(rows: list[dict], arms: list[str], fractions: list[float]) -> str:
    """Mean Dice per class (over seeds) for every arm and fraction."""
    classes = list(rows[0]["dice_per_class"])
    lines = ["| labels | " + " | ".join(f"{a}: {c}" for a in arms for c in classes) + " |",
             "|---|" + "---|" * (len(arms) * len(classes))]
    for f in fractions:
        cells = []
        for a in arms:
            sel = [r for r in rows if r["arm"] == a and r["fraction"] == f]
            cells += [f"{statistics.mean(r['dice_per_class'][c] for r in sel):.3f}" for c in classes]
        lines.append(f"| {f:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], arms: list[str], fractions: list[float], path: Path, metric: str) -> None:
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["arm"], r["fraction"], r["seed"]): score(r, metric) for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = [100 * f for f in fractions]
    for i, a in enumerate(arms):
        vals = [[by[(a, f, s)] for s in seeds] for f in fractions]
        axes[0].errorbar(xs, [statistics.mean(v) for v in vals], color=f"C{i}",
                         yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], marker="o", capsize=3, label=a)
        if a != "scratch":
            d = [[by[(a, f, s)] - by[("scratch", f, s)] for s in seeds] for f in fractions]
            axes[1].errorbar(xs, [statistics.mean(v) for v in d], color=f"C{i}",
                             yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in d], marker="o", capsize=3, label=a)
    axes[0].set(xscale="log", xlabel="labelled patients (%)", ylabel=f"test Dice ({metric})",
                title="fine-tuned Dice (mean ± sd over seeds)")
    axes[1].axhline(0, color="grey", lw=1)
    axes[1].set(xscale="log", xlabel="labelled patients (%)", ylabel="Δ Dice vs scratch (paired)",
                title="pretrained − scratch, same subset and seed")
    for ax in axes:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/label_efficiency"))
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--cases", type=int, default=10, help="labelled training patients per site")
    p.add_argument("--test", type=int, default=3, help="evaluation patients per site")
    p.add_argument("--unlabelled", type=int, default=10, help="scans without labels per site")
    p.add_argument("--shape", type=int, default=40, help="volume edge (voxels)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400, help="fine-tuning optimiser steps (every arm and fraction)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=2, help="crops per case")
    p.add_argument("--pretrain-epochs", type=int, default=20)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--fed-rounds", type=int, default=10, help="federated pretraining rounds (0: no 'federated' arm)")
    p.add_argument("--fed-local-epochs", type=int, default=2)
    p.add_argument("--federated-encoder", type=Path, default=None,
                   help="encoder.pt exported by a real `flwr run` federated pretraining: adds the 'flwr-run' arm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--metric", default="organ",
                   help="Dice compared: a class name (synthetic data: organ, lesion), class-mean or case-mean")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--from-log", action="store_true", help="only re-summarise the rows in --out/log.jsonl")
    args = p.parse_args(argv)
    if args.from_log:
        rows = [r for r in map(json.loads, (args.out / "log.jsonl").read_text().splitlines()) if "arm" in r]
        arms = list(dict.fromkeys(r["arm"] for r in rows))
        fractions = sorted({r["fraction"] for r in rows})
        table, _ = summarise(rows, arms, fractions, args.metric)
        plot(rows, arms, fractions, args.out / "label_efficiency.png", args.metric)
        print(table)
        print(per_class_table(rows, arms, fractions))
        return
    if args.quick:
        args.sites, args.cases, args.test, args.unlabelled, args.shape = 2, 4, 1, 2, 32
        args.seeds, args.steps, args.pretrain_epochs, args.fed_rounds, args.fed_local_epochs = [0, 1], 4, 1, 1, 1
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "log.jsonl"

    def log(obj: dict) -> None:
        print(json.dumps(obj), flush=True)
        with log_path.open("a") as f:
            f.write(json.dumps(obj) + "\n")

    start = time.perf_counter()
    data = args.out / f"data-{args.sites}x{args.cases}+{args.test}+{args.unlabelled}-{args.shape}"
    if not (data / ".complete").exists():
        make_federation(data, n_sites=args.sites, cases_per_site=args.cases, seed=0, shape=(args.shape,) * 3,
                        n_test=args.test, n_unlabelled=args.unlabelled)
        (data / ".complete").write_text("ok")
    sites = validated_sites(data, log=lambda *_: None)
    plan = plan_federation(sites)[2]
    plan_path = save_json(plan, args.out / "plan.json")
    args.classes = sites[0].num_classes
    settings, tf = _settings(0, 1, args.num_samples)
    test_loaders = {s.name: build_site_loaders(s, plan, settings=settings, transforms_cfg=tf).val for s in sites}

    encoders: dict[str, Path | None] = {"scratch": None}
    encoders["central"] = pretrain_central(sites, plan, args, args.out, log)
    if args.fed_rounds > 0:
        encoders["federated"] = pretrain_federated(data.resolve(), Path(plan_path).resolve(), args,
                                                   args.out.resolve(), log)
    if args.federated_encoder is not None:
        encoders["flwr-run"] = args.federated_encoder
    arms = list(encoders)

    rows = []
    for seed in args.seeds:
        order = stratified_order(sites, seed)
        for f in sorted(args.fractions):
            subset = order[: max(1, round(f * len(order)))]
            for arm, enc in encoders.items():
                row = {**finetune(arm, enc, sites, subset, test_loaders, plan, seed, args), "fraction": f}
                rows.append(row)
                log(row)
    table, stats = summarise(rows, arms, sorted(args.fractions), args.metric)
    plot(rows, arms, sorted(args.fractions), args.out / "label_efficiency.png", args.metric)
    total = time.perf_counter() - start
    cmd = "python bench/label_efficiency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (f"Command: `{cmd.strip()}`; {platform.machine()} CPU, {args.threads} thread(s), torch {torch.__version__}; "
              f"{len(sites)} sites x {args.cases} labelled + {args.test} test + {args.unlabelled} unlabelled "
              f"patients, {args.shape}^3, {args.steps} fine-tuning steps, seeds {args.seeds}; total {total / 60:.1f} min.")
    classes = per_class_table(rows, arms, sorted(args.fractions))
    print(header)
    print(table)
    print(classes)
    (args.out / "results.json").write_text(json.dumps({"header": header, "table": table, "per_class": classes,
                                                        "stats": stats,
                                                        "rows": rows, "args": {k: str(v) for k, v in vars(args).items()}},
                                                       indent=2))


if __name__ == "__main__":
    main()
