"""``medseg-train``: pooled (centralised) or single-site training with the shared engine.

    medseg-train                                   # pooled over every site of the synthetic federation
    medseg-train data.root=/data/fed 'data.sites=[site_01]' train.epochs=100   # local-only baseline

These are the honest baselines for the federation: same data contract, validation, plan, transforms,
model, loss and engine as the Flower client. Artefacts (under ``hydra.run.dir``, or ``paths.run_dir``):
``resolved_config.yaml``, ``fingerprints.json``, ``plan.json``, ``history.json``, ``curves.png``,
``last.pt``, ``best.pt``, ``test_metrics.json``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import nibabel as nib
import numpy as np
from hydra.core.hydra_config import HydraConfig
from monai.data import DataLoader, Dataset
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from medseg_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, write_json, write_text
from medseg_core.config import CONFIG_PATH, config_hash
from medseg_core.data.fingerprint import plan_federation, save_json
from medseg_core.data.loaders import LoaderSettings, build_site_loaders
from medseg_core.data.problems import DatasetError
from medseg_core.data.source import ensure_data_root
from medseg_core.data.transforms import build_transforms, input_channel_names
from medseg_core.engine import (
    build_optimizer,
    build_scheduler,
    compile_model,
    evaluate,
    prepare_model,
    train_one_epoch,
)
from medseg_core.metrics import aggregate, case_metrics
from medseg_core.models.pretrained import PretrainedMismatchError, load_pretrained_from_config
from medseg_core.plots import plot_curves
from medseg_core.postprocess import (
    SAFE_FRACTION_OF_SMALLEST,
    PostProcessing,
    choose_postprocessing,
    smallest_structures_mm3,
)
from medseg_core.runtime import amp_enabled, resolve_device, seed_everything
from medseg_core.workflow import (
    build_configured_model,
    foreground_classes,
    model_config,
    plan_options,
    pooled_loader,
    roi_size,
    to_container,
    validated_sites,
)


def _eval_kwargs(cfg: DictConfig, plan: dict, spatial_dims: int, labels: dict, device, amp: bool) -> dict:
    ev = cfg.eval
    return {
        "device": device, "roi_size": roi_size(plan, spatial_dims), "class_values": foreground_classes(labels),
        "sw_batch_size": int(ev.sw_batch_size), "overlap": float(ev.overlap), "mode": str(ev.mode),
        "amp": amp, "nsd_tolerance_mm": float(ev.nsd_tolerance_mm), "hd95": bool(ev.hd95),
        "model_spatial_dims": spatial_dims,
    }


def _pooled_eval(results: dict[str, dict]) -> dict[str, Any]:
    """Aggregate the cases of every site together (each case weighs the same)."""
    cases = [c["metrics"] for r in results.values() for c in r["cases"]]
    return aggregate(cases) if cases else {}


def run_training(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train, validate each epoch, keep best/last checkpoints, evaluate the best on the test split.

    Returns:
        A summary: best epoch, best validation Dice, test metrics per site and pooled, run directory.

    Raises:
        DatasetError: the data did not pass validation (before anything is trained).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = bool(cfg.train.progress)
    seed_everything(int(cfg.seed))
    device = resolve_device(cfg.device)
    amp = amp_enabled(cfg.train.amp, device)
    write_text(OmegaConf.to_yaml(cfg, resolve=True), run_dir / "resolved_config.yaml")

    root = ensure_data_root(cfg.data, progress=progress)
    sites = validated_sites(root, cfg.data.sites, skip_bad=bool(cfg.data.skip_bad_cases))
    fingerprints, _merged, plan = plan_federation(sites, **plan_options(cfg))
    save_json({s.name: fp for s, fp in zip(sites, fingerprints, strict=True)}, run_dir / "fingerprints.json")
    save_json(plan, run_dir / "plan.json")

    spatial_dims = int(cfg.model.spatial_dims)
    settings = LoaderSettings.from_config(to_container(cfg), progress=progress)
    site_loaders = {s.name: build_site_loaders(s, plan, to_container(cfg), settings=settings) for s in sites}
    train_loader = pooled_loader([ld.train for ld in site_loaders.values()], batch_size=settings.batch_size,
                                 seed=int(cfg.seed))
    labels = dict(sites[0].labels)
    channel_names = input_channel_names(plan, sites)
    for note in plan.get("notes", []):
        print(f"medseg-train: {note}")

    kwargs = model_config(cfg.model, in_channels=sites[0].num_channels, out_channels=sites[0].num_classes,
                          plan=plan)
    model = build_configured_model(kwargs)
    pretrained = load_pretrained_from_config(model, cfg.model, model_config=kwargs)  # None: from scratch
    model = prepare_model(model, device, channels_last=bool(cfg.train.channels_last), spatial_dims=spatial_dims)
    forward_model = compile_model(model) if cfg.train.compile else model
    loss_fn = hydra.utils.instantiate(cfg.loss)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    scheduler = build_scheduler(cfg.get("sched"), optimizer)
    eval_kwargs = _eval_kwargs(cfg, plan, spatial_dims, labels, device, amp)
    ckpt_meta = {"model_config": kwargs, "plan": plan, "labels": labels, "channel_names": channel_names,
                 "config_hash": config_hash(cfg)}

    epochs = int(cfg.train.epochs)
    history: dict[str, Any] = {"sites": [s.name for s in sites], "epochs": [],
                               "pretrained": pretrained.as_dict() if pretrained is not None else None}
    best = {"dice": -math.inf, "epoch": None}
    print(f"medseg-train: {len(sites)} site(s) {history['sites']}, "
          f"{sum(len(ld.train.dataset) for ld in site_loaders.values())} training case(s), "
          f"model {kwargs['name']} ({sum(p.numel() for p in model.parameters()):,} parameters), device {device}, "
          f"patch {eval_kwargs['roi_size']}, run dir {run_dir}")
    start = time.perf_counter()
    for epoch in tqdm(range(1, epochs + 1), desc="epochs", disable=not progress, dynamic_ncols=True):
        stats = train_one_epoch(
            forward_model, train_loader, loss_fn, optimizer, device=device,
            grad_clip_norm=cfg.train.grad_clip_norm, amp=amp, channels_last=bool(cfg.train.channels_last),
            progress=progress, desc=f"epoch {epoch}",
        )
        entry: dict[str, Any] = {"epoch": epoch, "train_loss": stats["loss"], "lr": optimizer.param_groups[0]["lr"],
                                 "train_seconds": stats["seconds"]}
        if scheduler is not None:
            scheduler.step()
        if epoch % int(cfg.train.val_every) == 0 or epoch == epochs:
            val = {name: evaluate(model, ld.val, **eval_kwargs) for name, ld in site_loaders.items() if ld.val}
            pooled = _pooled_eval(val)
            entry["val_dice"] = {name: r["mean_dice"] for name, r in val.items()}
            entry["val_mean_dice"] = float(pooled.get("mean", {}).get("dice", math.nan)) if pooled else math.nan
            entry["val_class_dice"] = {c: m["dice"]["mean"] for c, m in pooled.get("per_class", {}).items()}
            if entry["val_mean_dice"] > best["dice"]:
                best = {"dice": entry["val_mean_dice"], "epoch": epoch}
                save_checkpoint(run_dir / "best.pt", state_dict=model.state_dict(), epoch=epoch,
                                metrics={"val_mean_dice": entry["val_mean_dice"]}, **ckpt_meta)
        history["epochs"].append(entry)
        save_checkpoint(run_dir / "last.pt", state_dict=model.state_dict(), epoch=epoch,
                        optimizer=optimizer.state_dict(), **ckpt_meta)
        write_json(history, run_dir / "history.json")
        val_txt = ""
        if "val_mean_dice" in entry:
            per_class = " ".join(f"{c} {v:.3f}" for c, v in entry["val_class_dice"].items())
            val_txt = f" val Dice {entry['val_mean_dice']:.4f} ({per_class})"
        print(f"epoch {epoch}/{epochs} loss {stats['loss']:.4f}{val_txt} ({stats['seconds']:.1f} s)", flush=True)
    history["train_seconds"] = time.perf_counter() - start
    if best["epoch"] is None:  # no validation split anywhere: the last model is the best we know
        save_checkpoint(run_dir / "best.pt", state_dict=model.state_dict(), epoch=epochs, **ckpt_meta)
    _plot(history, run_dir / "curves.png")

    # final: the best model, post-processing chosen on the validation cases, every site's test split
    best_payload = load_checkpoint(run_dir / "best.pt")
    model.load_state_dict(best_payload["state_dict"])
    # the test, and the post-processing choice applied to it, use medseg-predict's overlap (eval.test_overlap)
    test_kwargs = {**eval_kwargs, "overlap": float(cfg.eval.get("test_overlap", cfg.eval.overlap))}
    post = _choose_postprocessing(cfg, model, site_loaders, test_kwargs, labels, sites)
    if post is not None:
        history["postprocessing"] = post.as_dict()
        best_payload["postprocessing"] = post.as_dict()  # medseg-predict applies it
        save_checkpoint(run_dir / "best.pt", **best_payload)
    test, test_raw = {}, {}
    for s in sites:
        if not s.test_cases:
            continue
        tf = build_transforms(plan, train=False, modalities=s.channel_names, spatial_dims=3)
        loader = DataLoader(Dataset([c.as_dict() for c in s.test_cases], tf), batch_size=1)
        result = evaluate(model, loader, **test_kwargs, keep_predictions=post is not None and post.active)
        test_raw[s.name] = result
        if post is not None and post.active:  # score the same predictions after post-processing
            cases = [{"case_id": c["case_id"], "metrics": case_metrics(
                post(p, sp), g, spacing_mm=sp, class_values=foreground_classes(labels),
                nsd_tolerance_mm=float(cfg.eval.nsd_tolerance_mm), hd95=bool(cfg.eval.hd95))}
                for c, (p, g, sp) in zip(result["cases"], result.pop("predictions"), strict=True)]
            agg = aggregate([c["metrics"] for c in cases])
            result = {**result, "cases": cases, "aggregate": agg,
                      "mean_dice": float(agg.get("mean", {}).get("dice", math.nan))}
        test[s.name] = result
    pooled_test = _pooled_eval(test)
    pooled_raw = _pooled_eval(test_raw)
    original = _test_on_original_grid(cfg, best_payload, sites, device) if cfg.eval.get("original_grid", True) else {}
    summary = {
        "run_dir": str(run_dir), "best_epoch": best["epoch"], "best_val_mean_dice": best["dice"],
        "test_mean_dice": float(pooled_test.get("mean", {}).get("dice", math.nan)) if pooled_test else math.nan,
        "test_per_site": {n: r["mean_dice"] for n, r in test.items()},
        "test_mean_dice_without_postprocessing": (
            float(pooled_raw.get("mean", {}).get("dice", math.nan)) if pooled_raw else math.nan),
        "postprocessing": post.as_dict()["min_size_mm3"] if post is not None else {},
        "train_seconds": history["train_seconds"], "test_overlap": test_kwargs["overlap"],
    }
    original_block = _original_grid_block(original)
    summary.update(_original_grid_summary(original_block))
    write_json({"summary": summary, "pooled": pooled_test, "pooled_without_postprocessing": pooled_raw,
                "sites": {n: {"aggregate": r["aggregate"], "cases": r["cases"]} for n, r in test.items()},
                **({"original_grid": original_block} if original_block else {})},
               run_dir / "test_metrics.json")
    history["summary"] = summary
    write_json(history, run_dir / "history.json")
    print(f"test mean foreground Dice {summary['test_mean_dice']:.4f} "
          f"per site {({k: round(v, 4) for k, v in summary['test_per_site'].items()})}; best epoch {best['epoch']}"
          + (f"; without post-processing {summary['test_mean_dice_without_postprocessing']:.4f}"
             if post is not None and post.active else ""))
    if original:
        print(f"test mean foreground Dice on the scans' original grids {summary['test_mean_dice_original_grid']:.4f} "
              f"per site {({k: round(v, 4) for k, v in summary['test_per_site_original_grid'].items()})}")
    return summary


def _original_grid_block(original: dict[str, dict]) -> dict[str, Any]:
    """``test_metrics.json``'s ``original_grid`` entry: pooled and per-site scan-grid results ({} if none)."""
    return {"pooled": _pooled_eval(original), "sites": original} if original else {}


def _original_grid_summary(block: dict[str, Any]) -> dict[str, Any]:
    """The summary's scan-grid keys from an ``original_grid`` entry ({} if it is empty)."""
    if not block:
        return {}
    pooled = block["pooled"]
    return {"test_mean_dice_original_grid": float(pooled.get("mean", {}).get("dice", math.nan)) if pooled else math.nan,
            "test_per_site_original_grid": {n: r["mean_dice"] for n, r in block["sites"].items()}}


def add_original_grid_scores(run_dir: str | Path) -> dict[str, Any]:
    """A finished ``medseg-train`` run's summary, with its test cases scored on the scans' own grids.

    Runs made before ``medseg-train`` scored the scans' grids, or with ``eval.original_grid=false``, have
    no ``test_per_site_original_grid``. This scores their ``best.pt`` now, exactly as the run would have
    (its resolved config, data and post-processing), and adds the figures to ``history.json`` and
    ``test_metrics.json``; nothing else in the run changes. A run that has them is returned as it is.

    Raises:
        FileNotFoundError: ``run_dir`` lacks ``history.json``, ``resolved_config.yaml`` or ``best.pt``.
        ValueError: the run has not finished (no summary in ``history.json``).
    """
    run_dir = Path(run_dir)
    for name in ("history.json", "resolved_config.yaml", "best.pt"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} not found: is {run_dir} a finished medseg-train run?")
    history = json.loads((run_dir / "history.json").read_text())
    summary = history.get("summary")
    if not summary:
        raise ValueError(f"{run_dir / 'history.json'}: the run has not finished (no test summary)")
    if summary.get("test_per_site_original_grid"):
        return summary
    cfg = OmegaConf.load(run_dir / "resolved_config.yaml")
    sites = validated_sites(ensure_data_root(cfg.data, progress=False), cfg.data.sites,
                            skip_bad=bool(cfg.data.skip_bad_cases))
    block = _original_grid_block(
        _test_on_original_grid(cfg, load_checkpoint(run_dir / "best.pt"), sites, resolve_device(cfg.device)))
    summary.update(_original_grid_summary(block))
    write_json(history, run_dir / "history.json")
    metrics_path = run_dir / "test_metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics["summary"] = summary
    if block:
        metrics["original_grid"] = block
    write_json(metrics, metrics_path)
    return summary


def _test_on_original_grid(cfg: DictConfig, payload: dict, sites: list, device) -> dict[str, dict]:
    """Every site's test cases scored on the scans' own grids (:func:`medseg_core.predict.score_on_original_grid`).

    Returns:
        ``{site: {"cases", "aggregate", "mean_dice", "num_cases"}}`` for the sites with labelled test cases.
    """
    from medseg_core.predict import score_on_original_grid

    results: dict[str, dict] = {}
    for s in sites:
        if any(c.label_path is not None for c in s.test_cases):
            results[s.name] = score_on_original_grid(
                payload, s.test_cases, modalities=s.channel_names,
                device=str(device), sw_batch_size=int(cfg.eval.sw_batch_size),
                nsd_tolerance_mm=float(cfg.eval.nsd_tolerance_mm), hd95=bool(cfg.eval.hd95))
    return results


def _choose_postprocessing(cfg: DictConfig, model, site_loaders: dict, eval_kwargs: dict,
                           labels: dict, sites: list) -> PostProcessing | None:
    """Per-class small-component removal chosen on the validation cases (``eval.postprocess``), or None; no
    size above ``eval.postprocess_safe_fraction`` of the class's smallest true structure in the labelled
    training data is tried (null: no such limit)."""
    if not bool(cfg.eval.get("postprocess", True)):
        return None
    fraction = cfg.eval.get("postprocess_safe_fraction", SAFE_FRACTION_OF_SMALLEST)
    cases = []
    for ld in site_loaders.values():
        if ld.val:
            cases += evaluate(model, ld.val, **{**eval_kwargs, "hd95": False}, keep_predictions=True)["predictions"]
    if not cases:
        return None
    post = choose_postprocessing(
        cases, foreground_classes(labels),
        **({} if fraction is None else {"smallest_true_mm3": _smallest_true_structures(sites, labels),
                                        "safe_fraction": float(fraction)}))
    steps = ", ".join(f"{n} {d['min_size_mm3']:g} mm³ (val Dice {d['before']:.3f} -> {d['after']:.3f})"
                      for n, d in post.chosen_on["dice"].items())
    caps = ", ".join(f"{n} {v:g} mm³" for n, v in post.chosen_on.get("max_size_mm3", {}).items())
    print(f"post-processing chosen on {len(cases)} validation case(s): remove components below {steps}"
          + (f" (largest size tried: {caps}, {fraction:g} x the smallest true structure)" if caps else ""))
    return post


def _smallest_true_structures(sites: list, labels: dict) -> dict[str, float]:
    """Smallest true structure (mm³) of each class over every site's labelled training cases, on their grids."""
    def label_maps():
        for site in sites:
            for case in site.train_cases:
                img = nib.load(str(case.label_path))
                data = np.asanyarray(img.dataobj)
                yield data, img.header.get_zooms()[: data.ndim]

    return smallest_structures_mm3(label_maps(), foreground_classes(labels))


def _plot(history: dict[str, Any], path: Path) -> None:
    epochs = history["epochs"]
    val_sites = sorted({k for e in epochs for k in e.get("val_dice", {})})
    plot_curves(
        {
            "training loss": {"train": [e["train_loss"] for e in epochs]},
            "validation Dice (foreground mean)": {
                **{s: [e.get("val_dice", {}).get(s, math.nan) for e in epochs] for s in val_sites},
                "pooled": [e.get("val_mean_dice", math.nan) for e in epochs],
            },
        },
        path, title="medseg-train",
    )


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    run_dir = cfg.paths.run_dir or HydraConfig.get().runtime.output_dir
    try:
        run_training(cfg, run_dir)
    except (DatasetError, FileNotFoundError, CheckpointError, PretrainedMismatchError) as exc:
        print(f"medseg-train: refusing to train: {exc}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
