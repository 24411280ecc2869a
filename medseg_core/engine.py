"""The training engine: one epoch of training, whole-volume evaluation, optimisers from config.

Framework-agnostic: no Flower, no Opacus. It works unchanged when handed an Opacus ``GradSampleModule``,
``DPOptimizer`` and ``DPDataLoader`` (the client's privacy module wraps them), and it exposes the two
hooks federated algorithms need: ``extra_loss`` (FedProx's proximal term) and ``grad_hook`` (SCAFFOLD's
gradient correction), so no algorithm is hard-coded here.

Batches are MONAI dictionaries: ``{"image": [B, C_in, *spatial], "label": [B, 1, *spatial], ...}``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from medseg_core.inference import main_output, predict_probabilities
from medseg_core.metrics import aggregate, case_metrics
from medseg_core.runtime import autocast

LossFn = Callable[..., torch.Tensor]


def plain_tensor(x: torch.Tensor) -> torch.Tensor:
    """Drop MONAI's MetaTensor wrapper (its meta-data bookkeeping slows every op in the hot loop)."""
    as_tensor = getattr(x, "as_tensor", None)
    return as_tensor() if callable(as_tensor) else x


def memory_format(spatial_dims: int) -> torch.memory_format:
    """channels-last layout for 2D (NHWC) or 3D (NDHWC) tensors."""
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def prepare_model(model: torch.nn.Module, device: torch.device, *, channels_last: bool = False,
                  spatial_dims: int = 3) -> torch.nn.Module:
    """Move a model to its device (and channels-last layout if asked)."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=memory_format(spatial_dims))
    return model


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` for a fixed-shape training step (shares parameters with ``model``).

    ``dynamic=False``: a second input shape (the last, smaller batch of an epoch; another model built from
    the same MONAI classes in the same process) compiles a second static graph. With the default automatic
    dynamic shapes, that recompilation of MONAI's 3D U-Net fails in inductor (torch 2.13: ``LoweringException:
    ValueRangeError: Invalid ranges [0:-1]``); static graphs lower, and are the faster kind on CPU.
    """
    return torch.compile(model, dynamic=False)


def build_optimizer(optim_cfg: DictConfig | Mapping, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Instantiate the ``optim`` config group (a ``_partial_`` optimiser) on ``params``.

    Raises:
        ValueError: the config has no ``_target_``.
    """
    if not optim_cfg or "_target_" not in optim_cfg:
        raise ValueError(f"optim config needs a _target_, got {optim_cfg!r}")
    factory = hydra.utils.instantiate(optim_cfg)
    return factory(params)


def optimizer_state_arrays(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The optimiser's per-parameter state (Adam's moments, SGD's momentum buffer, step counts) as flat
    arrays named ``<parameter name>/<field>``, to be kept in a file and restored by
    :func:`load_optimizer_state` into a new optimiser over the same model.

    Named by parameter rather than by the optimiser's positional index, so a restore fails loudly on a
    different model instead of pairing moments with the wrong tensors. Hyper-parameters (learning rate,
    betas) are not saved: they come from the config each time.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    arrays: dict[str, np.ndarray] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for field, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    arrays[f"{names[id(p)]}/{field}"] = value.detach().cpu().numpy().copy()
                elif isinstance(value, (int, float)):
                    arrays[f"{names[id(p)]}/{field}"] = np.asarray(value)
    return arrays


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                         arrays: Mapping[str, np.ndarray], *, source: str = "optimiser state") -> None:
    """Restore what :func:`optimizer_state_arrays` saved into ``optimizer`` (built over ``model``).

    Raises:
        ValueError: the arrays name a parameter the model lacks, or a shape differs (``source`` names
            the file in the message); the optimiser is left untouched.
    """
    params = dict(model.named_parameters())
    order = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    state: dict[int, dict[str, torch.Tensor]] = {}
    problems = []
    for key, value in arrays.items():
        name, _, field = key.rpartition("/")
        p = params.get(name)
        if p is None or id(p) not in order:
            problems.append(f"{name!r} is not a parameter the optimiser updates")
            continue
        t = torch.as_tensor(np.asarray(value))
        if t.ndim and t.shape != p.shape:
            problems.append(f"{key} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")
            continue
        state.setdefault(order[id(p)], {})[field] = t
    if problems:
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        raise ValueError(f"{source} does not match the model: {shown}")
    packed = optimizer.state_dict()
    packed["state"] = state
    optimizer.load_state_dict(packed)  # torch's own device/dtype rules (Adam's step stays a CPU scalar)


def build_scheduler(sched_cfg: DictConfig | Mapping | None, optimizer: torch.optim.Optimizer):
    """Instantiate the ``sched`` config group on ``optimizer``; ``None`` or an empty option means constant LR."""
    if not sched_cfg or "_target_" not in sched_cfg:
        return None
    return hydra.utils.instantiate(sched_cfg)(optimizer)


def train_one_epoch(
    model: torch.nn.Module,
    loader: Iterable[Mapping[str, Any]],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    grad_clip_norm: float | None = None,
    amp: bool = False,
    channels_last: bool = False,
    extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    grad_hook: Callable[[torch.nn.Module], None] | None = None,
    max_steps: int | None = None,
    progress: bool = False,
    desc: str = "train",
) -> dict[str, float]:
    """Train for one pass over ``loader``.

    Args:
        model: network returning logits ``[B, C, *spatial]`` (or deep-supervision outputs the loss handles).
        loader: yields MONAI dict batches.
        loss_fn: ``loss_fn(output, label) -> scalar``.
        optimizer: any torch optimiser (Opacus' DPOptimizer included).
        grad_clip_norm: clip the global gradient norm (leave ``None`` under DP-SGD: Opacus clips per sample).
        amp: bf16 autocast on the model's device.
        channels_last: feed inputs in channels-last layout (the model must have been prepared the same way).
        extra_loss: added to the data loss each step, e.g. FedProx's ``mu/2 * ||w - w_global||^2``.
        grad_hook: called after ``backward`` and before clipping/step, e.g. SCAFFOLD's ``g += c - c_i``.
        max_steps: stop after this many optimiser steps.
        progress: show a tqdm progress bar.

    Returns:
        ``loss`` (mean over steps), ``num_steps``, ``num_samples`` (crops seen), ``seconds``,
        ``samples_per_s``.

    Raises:
        FloatingPointError: the loss became NaN/Inf (training diverged); nothing is stepped with it.
    """
    model.train()
    total_loss, steps, samples = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for batch in bar:
        image = plain_tensor(batch["image"]).to(device, non_blocking=True)
        label = plain_tensor(batch["label"]).to(device, non_blocking=True)
        if image.shape[0] == 0:  # Poisson sampling (DP) can draw an empty batch
            continue
        if channels_last:
            image = image.contiguous(memory_format=memory_format(image.ndim - 2))
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            output = model(image)
        output = output.float() if isinstance(output, torch.Tensor) else [o.float() for o in output]
        loss = loss_fn(output, label)
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {steps}; training diverged")
        loss.backward()
        if grad_hook is not None:
            grad_hook(model)
        if grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimizer.step()
        total_loss += float(loss.detach())
        steps += 1
        samples += int(image.shape[0])
        bar.set_postfix(loss=f"{total_loss / steps:.4f}")
        if max_steps is not None and steps >= max_steps:
            break
    seconds = time.perf_counter() - start
    return {
        "loss": total_loss / steps if steps else math.nan,
        "num_steps": steps,
        "num_samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds if seconds > 0 else math.nan,
    }


def batch_spacing_mm(batch: Mapping[str, Any], index: int = 0) -> tuple[float, ...]:
    """Voxel spacing (mm) of sample ``index`` of a MONAI batch, from its affine."""
    image = batch["image"]
    spatial_dims = image.ndim - 2
    affine = getattr(image, "affine", None)
    if affine is None:
        return (1.0,) * spatial_dims
    affine = torch.as_tensor(affine)
    if affine.ndim == 3:
        affine = affine[index]
    return tuple(float(v) for v in np.linalg.norm(affine[:spatial_dims, :spatial_dims].cpu().numpy(), axis=0))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable[Mapping[str, Any]],
    *,
    device: torch.device,
    roi_size: Sequence[int],
    class_values: Mapping[str, int],
    sw_batch_size: int = 2,
    overlap: float = 0.25,
    mode: str = "gaussian",
    tta: bool = False,
    amp: bool = False,
    nsd_tolerance_mm: float = 2.0,
    hd95: bool = True,
    loss_fn: LossFn | None = None,
    model_spatial_dims: int | None = None,
    progress: bool = False,
    desc: str = "eval",
    postprocess: Callable[[np.ndarray, Sequence[float]], np.ndarray] | None = None,
    keep_predictions: bool = False,
) -> dict[str, Any]:
    """Sliding-window evaluation of whole volumes, metrics per case and per class.

    Metrics are computed on the preprocessed grid (the plan's target spacing; distances in mm use that
    spacing). ``medseg-predict`` writes predictions back on each scan's original grid.

    Args:
        loader: whole-volume batches (batch size 1 is typical) with ``label``.
        roi_size: sliding window size (the training patch size).
        class_values: foreground class name -> label value.
        loss_fn: optional; when given, the mean whole-volume loss is reported as ``loss``.
        model_spatial_dims: 2 for a 2D model evaluated slice by slice on 3D volumes.
        postprocess: applied to each predicted label map ``[X, Y, Z]`` with its spacing before scoring
            (e.g. :class:`medseg_core.postprocess.PostProcessing`).
        keep_predictions: also return ``predictions``: ``(prediction, ground truth, spacing_mm)`` per case
            (label maps on the plan's grid), e.g. to choose post-processing.

    Returns:
        ``{"cases": [{"case_id", "metrics": {class: {...}}}], "aggregate": {...}, "mean_dice": float,
        "num_cases": int, "loss": float (if loss_fn), "seconds": float}`` (+ ``predictions``).
    """
    model.eval()
    cases: list[dict[str, Any]] = []
    losses: list[float] = []
    kept: list[tuple[np.ndarray, np.ndarray, Sequence[float]]] = []
    start = time.perf_counter()
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        image = plain_tensor(batch["image"]).to(device)
        label = plain_tensor(batch["label"]).to(device)
        probs = predict_probabilities(
            model, image, roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode=mode, tta=tta, amp=amp,
            model_spatial_dims=model_spatial_dims,
        )
        if loss_fn is not None:
            losses.append(float(loss_fn(torch.log(probs.clamp_min(1e-8)), label)))
        pred = probs.argmax(dim=1).cpu().numpy()
        gt = label[:, 0].cpu().numpy().astype(np.int64)
        ids = batch.get("case_id", [f"case_{len(cases) + i}" for i in range(pred.shape[0])])
        for i in range(pred.shape[0]):
            spacing = batch_spacing_mm(batch, i)
            pred_i = postprocess(pred[i], spacing) if postprocess is not None else pred[i]
            metrics = case_metrics(
                pred_i, gt[i], spacing_mm=spacing, class_values=dict(class_values),
                nsd_tolerance_mm=nsd_tolerance_mm, hd95=hd95,
            )
            cases.append({"case_id": str(ids[i]), "metrics": metrics})
            if keep_predictions:
                kept.append((pred_i, gt[i], spacing))
    agg = aggregate([c["metrics"] for c in cases])
    result: dict[str, Any] = {
        "cases": cases,
        "aggregate": agg,
        "mean_dice": float(agg.get("mean", {}).get("dice", math.nan)),
        "num_cases": len(cases),
        "seconds": time.perf_counter() - start,
    }
    if loss_fn is not None:
        result["loss"] = float(np.mean(losses)) if losses else math.nan
    if keep_predictions:
        result["predictions"] = kept
    return result


def model_output_shape_ok(model: torch.nn.Module, in_shape: Sequence[int], out_channels: int,
                          device: torch.device) -> None:
    """Check once, before training, that the model maps ``in_shape`` to ``out_channels`` logits.

    Raises:
        ValueError: the output has the wrong number of channels or spatial size.
    """
    model.eval()
    with torch.no_grad():
        out = main_output(model(torch.zeros(*in_shape, device=device)))
    if out.shape[1] != out_channels or tuple(out.shape[2:]) != tuple(in_shape[2:]):
        raise ValueError(
            f"model output {tuple(out.shape)} does not match input {tuple(in_shape)} with {out_channels} classes"
        )
