"""``medseg-pretrain``: self-supervised pretraining on unlabelled scans; writes an encoder checkpoint.

    medseg-pretrain                                        # MIM, 3D U-Net, the synthetic federation's scans
    medseg-pretrain model=transunet3d_small pretrain=mae_transunet train.epochs=200
    medseg-pretrain data.root=/data/fed 'data.sites=[site_00]' 'images.extra_dirs=[/data/more_ct]'
    medseg-pretrain paths.run_dir=runs/pre1 train.epochs=40       # same run dir again: resumes

Steps: validate the sites (as ``medseg-train``), plan (or ``plan=PATH``), collect the images
(``images.*``; labels are never loaded), train the masked-reconstruction model with a validation loss
on held-out images, and write to the run directory (``hydra.run.dir`` or ``paths.run_dir``):
``resolved_config.yaml``, ``plan.json``, ``images.json`` (which images were used), ``history.json``,
``loss_curve.png``, ``reconstruction.png``, ``last.pt`` (resumable state) and ``encoder.pt``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from medseg_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, write_json, write_text
from medseg_core.config import CONFIG_PATH, config_hash
from medseg_core.data.dataset import Case, SiteDataset
from medseg_core.data.fingerprint import load_plan, plan_federation, save_json
from medseg_core.data.loaders import LoaderSettings, build_unlabelled_loader
from medseg_core.data.problems import DatasetError
from medseg_core.data.source import ensure_data_root
from medseg_core.engine import build_optimizer, build_scheduler, prepare_model
from medseg_core.plots import plot_curves
from medseg_core.runtime import amp_enabled, resolve_device, seed_everything
from medseg_core.workflow import model_config, plan_options, pooled_loader, to_container, validated_sites
from pretrain.builder import build_pretrain_model, check_patch_size
from pretrain.data import image_folder_site, manifest, pretraining_cases, split_images
from pretrain.engine import evaluate_pretraining, pretrain_one_epoch, reconstruction_example, reseed_loader
from pretrain.export import export_encoder
from pretrain.plots import plot_reconstruction

#: settings that may change when a run is resumed (more epochs, quieter output)
RESUMABLE_KEYS = ("train.epochs", "train.progress", "train.vis_every", "resume")
#: scheduler state that is progress (kept on resume); the rest (e.g. T_max = train.epochs) follows the config
SCHEDULER_PROGRESS = ("last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step")
CHECKPOINT_KIND = "pretrain-state"


def resume_hash(cfg: DictConfig) -> str:
    """Hash of the config without the settings a resumed run may change (:data:`RESUMABLE_KEYS`; a
    cosine schedule's ``T_max: ${train.epochs}`` follows them)."""
    return config_hash(cfg, ignore=RESUMABLE_KEYS)


def collect_images(cfg: DictConfig, sites: list[SiteDataset]) -> dict[str, tuple[SiteDataset, list[Case]]]:
    """site name -> (site, image-only cases) for every site and extra folder with at least one image.

    Raises:
        DatasetError: an extra folder is unusable.
        ValueError: no image at all.
    """
    sel = cfg.images
    chosen: dict[str, tuple[SiteDataset, list[Case]]] = {}
    for site in sites:
        cases = pretraining_cases(site, unlabelled=bool(sel.unlabelled), test=bool(sel.test), train=bool(sel.train))
        if cases:
            chosen[site.name] = (site, cases)
    for i, folder in enumerate(sel.extra_dirs or []):
        extra = image_folder_site(folder, sites[0], name=f"extra{i:02d}-{Path(str(folder)).name}")
        chosen[extra.name] = (extra, extra.cases)
    if not chosen:
        raise ValueError(
            f"no image to pretrain on in sites {[s.name for s in sites]} with images.unlabelled={sel.unlabelled}, "
            f"images.test={sel.test}, images.train={sel.train} and no images.extra_dirs"
        )
    return chosen


def _loader(parts: list[tuple[SiteDataset, list[Case]]], plan: dict, cfg: dict, settings: LoaderSettings,
            seed: int):
    loaders = [build_unlabelled_loader(site, plan, cfg, cases=cases, settings=settings)
               for site, cases in parts if cases]
    if not loaders:
        return None
    return pooled_loader(loaders, batch_size=settings.batch_size, seed=seed)


def _plan(sites: list[SiteDataset], cfg: DictConfig) -> dict:
    """The plan ``medseg-train`` would make (fingerprints of the labelled training cases); sites holding
    only unlabelled scans take part through the shared plan but add no statistics."""
    planning = [s for s in sites if s.train_cases]
    if not planning:
        raise ValueError(f"sites {[s.name for s in sites]} have no labelled training case to plan the "
                         "preprocessing from; pass plan=PATH (e.g. the federation's plan.json)")
    return plan_federation(planning, **plan_options(cfg))[2]


def run_pretraining(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Pretrain, checkpoint every epoch (resumable), export the encoder.

    Returns:
        Summary: run directory, encoder path, epochs, final train / validation loss, number of images.

    Raises:
        DatasetError: the data did not pass validation (before anything is trained).
        ValueError: nothing to pretrain on, bad settings, or a run directory holding another run.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    last_path = run_dir / "last.pt"
    state = None
    if last_path.exists():
        if not cfg.resume:
            raise ValueError(f"{run_dir} already holds a pretraining run (last.pt); use resume=true to continue it "
                             "or another paths.run_dir")
        state = load_checkpoint(last_path)
        if state.get("kind") != CHECKPOINT_KIND:
            raise CheckpointError(f"{last_path}: not a medseg-pretrain state checkpoint")
        if state.get("resume_hash") != resume_hash(cfg):
            raise ValueError(f"{last_path} was written with another configuration; only train.epochs / progress / "
                             "vis_every may change on resume. Use another paths.run_dir for a new run")

    progress = bool(cfg.train.progress)
    seed = int(cfg.seed)
    seed_everything(seed)
    device = resolve_device(cfg.device)
    amp = amp_enabled(cfg.train.amp, device)
    write_text(OmegaConf.to_yaml(cfg, resolve=True), run_dir / "resolved_config.yaml")

    root = ensure_data_root(cfg.data, progress=progress)
    sites = validated_sites(root, cfg.data.sites, skip_bad=bool(cfg.data.skip_bad_cases))
    plan = load_plan(cfg.plan) if cfg.plan else _plan(sites, cfg)
    save_json(plan, run_dir / "plan.json")

    spatial_dims = int(cfg.model.spatial_dims)
    container = to_container(cfg)
    settings = LoaderSettings.from_config(container, progress=progress)
    chosen = collect_images(cfg, sites)
    split = {name: split_images(cases, float(cfg.images.val_fraction), seed) for name, (_, cases) in chosen.items()}
    write_json({"train": manifest({n: s[0] for n, s in split.items()}),
                "val": manifest({n: s[1] for n, s in split.items() if s[1]}),
                "selection": to_container(cfg.images)}, run_dir / "images.json")
    train_loader = _loader([(chosen[n][0], s[0]) for n, s in split.items()], plan, container, settings, seed)
    val_loader = _loader([(chosen[n][0], s[1]) for n, s in split.items()], plan, container, settings, seed)
    num_images = {n: len(s[0]) for n, s in split.items()}

    kwargs = model_config(cfg.model, in_channels=sites[0].num_channels, out_channels=sites[0].num_classes, plan=plan)
    model = build_pretrain_model(cfg.pretrain, kwargs, seed=seed)
    patch = check_patch_size(model, plan, spatial_dims)
    model = prepare_model(model, device)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    scheduler = build_scheduler(cfg.get("sched"), optimizer)
    run_hash = config_hash(cfg)
    history: dict[str, Any] = {"method": model.method, "model": kwargs["name"], "num_images": num_images,
                               "epochs": []}
    start_epoch = 1
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            fresh = scheduler.state_dict()
            fresh.update({k: v for k, v in state["scheduler"].items() if k in SCHEDULER_PROGRESS})
            scheduler.load_state_dict(fresh)
            # with more epochs the schedule changes (T_max = train.epochs): restart from its closed form at
            # the current epoch, not from the old schedule's last (possibly zero) learning rate
            closed_form = getattr(scheduler, "_get_closed_form_lr", None)
            if callable(closed_form):
                for group, lr in zip(optimizer.param_groups, closed_form(), strict=True):
                    group["lr"] = lr
        history = state["history"]
        start_epoch = int(state["epoch"]) + 1
        print(f"medseg-pretrain: resuming {run_dir} after epoch {state['epoch']}")

    epochs = int(cfg.train.epochs)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"medseg-pretrain: {model.method} for {kwargs['name']} ({n_params:,} parameters), "
          f"{sum(num_images.values())} image(s) from {list(chosen)}, "
          f"{sum(len(s[1]) for s in split.values())} held out, patch {patch}, device {device}, run dir {run_dir}")
    vis_every = max(1, int(cfg.train.get("vis_every", 5) or 1))
    meta = {"plan": plan, "labels": dict(sites[0].labels), "channel_names": dict(sites[0].channel_names)}
    for epoch in tqdm(range(start_epoch, epochs + 1), desc="pretrain epochs", disable=not progress,
                      dynamic_ncols=True):
        reseed_loader(train_loader, seed * 100_003 + epoch)
        model.mask_generator.reseed(seed * 100_003 + epoch)
        stats = pretrain_one_epoch(model, train_loader, optimizer, device=device,
                                   grad_clip_norm=cfg.train.grad_clip_norm, amp=amp, progress=progress,
                                   desc=f"epoch {epoch}")
        entry: dict[str, Any] = {"epoch": epoch, "train_loss": stats["loss"], "lr": optimizer.param_groups[0]["lr"],
                                 "seconds": stats["seconds"], "samples_per_s": stats["samples_per_s"]}
        if scheduler is not None:
            scheduler.step()
        if val_loader is not None:
            entry["val_loss"] = evaluate_pretraining(model, val_loader, device=device, seed=seed, amp=amp)["loss"]
        history["epochs"].append(entry)
        save_checkpoint(last_path, state_dict=model.state_dict(), model_config=kwargs, kind=CHECKPOINT_KIND,
                        epoch=epoch, optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict() if scheduler is not None else None, history=history,
                        resume_hash=resume_hash(cfg), config_hash=run_hash, **meta)
        write_json(history, run_dir / "history.json")
        _plot_loss(history, run_dir / "loss_curve.png")
        if epoch % vis_every == 0 or epoch == epochs:
            _plot_example(model, val_loader or train_loader, device, seed, run_dir / "reconstruction.png", sites[0],
                          f"{model.method} {kwargs['name']}, epoch {epoch}")
        val_txt = f" val {entry['val_loss']:.4f}" if "val_loss" in entry else ""
        print(f"epoch {epoch}/{epochs} loss {stats['loss']:.4f}{val_txt} ({stats['seconds']:.1f} s)", flush=True)
    if not history["epochs"]:
        raise ValueError(f"train.epochs={epochs}: nothing to train")
    if start_epoch > epochs:
        print(f"medseg-pretrain: {run_dir} already has {start_epoch - 1} epoch(s) (train.epochs={epochs}); "
              "nothing to train, exporting the encoder again")
    if not (run_dir / "reconstruction.png").exists():
        _plot_example(model, val_loader or train_loader, device, seed, run_dir / "reconstruction.png", sites[0],
                      f"{model.method} {kwargs['name']}")
    last = history["epochs"][-1]
    encoder_path = export_encoder(model, run_dir / "encoder.pt", config_hash=run_hash, epoch=last["epoch"],
                                  sites=[s.name for s in sites], num_images=num_images, **meta)
    summary = {"run_dir": str(run_dir), "encoder": str(encoder_path), "epochs": last["epoch"],
               "train_loss": last["train_loss"], "val_loss": last.get("val_loss", math.nan),
               "num_images": sum(num_images.values()), "method": model.method, "model": kwargs["name"]}
    history["summary"] = summary
    write_json(history, run_dir / "history.json")
    print(f"medseg-pretrain: encoder ({len(model.encoder_state_dict())} tensors) written to {encoder_path}")
    return summary


def _plot_loss(history: dict[str, Any], path: Path) -> None:
    epochs = history["epochs"]
    curves = {"train": [e["train_loss"] for e in epochs]}
    if any("val_loss" in e for e in epochs):
        curves["validation (fixed masks)"] = [e.get("val_loss", math.nan) for e in epochs]
    plot_curves({"masked reconstruction loss": curves}, path, title=f"medseg-pretrain: {history['method']} "
                                                                  f"{history['model']}")


def _plot_example(model, loader, device, seed: int, path: Path, site: SiteDataset, title: str) -> None:
    view = reconstruction_example(model, loader, device=device, seed=seed)
    plot_reconstruction(view, path, channel_names=site.channel_names, title=title)


@hydra.main(config_path=CONFIG_PATH, config_name="pretrain", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    run_dir = cfg.paths.run_dir or HydraConfig.get().runtime.output_dir
    started = time.perf_counter()
    try:
        run_pretraining(cfg, run_dir)
    except (DatasetError, FileNotFoundError, CheckpointError, ValueError) as exc:
        print(f"medseg-pretrain: refusing to pretrain: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"medseg-pretrain: done in {time.perf_counter() - started:.1f} s")


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
