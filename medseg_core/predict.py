"""``medseg-predict``: NIfTI scans in, NIfTI label maps out, on each scan's original grid.

    medseg-predict --checkpoint best.pt --input scan_0000.nii.gz --output preds/
    medseg-predict --checkpoint best.pt --input site/imagesTs --output preds/ --tta --largest-component --overlay

A folder is read as cases: ``CASE_0000.nii.gz, CASE_0001.nii.gz`` (nnU-Net channel naming) are the
channels of ``CASE``; other files are one case each. Every case is preprocessed with the plan stored in
the checkpoint, predicted by sliding window (optionally with mirror TTA), mapped back to the input's
voxel grid with MONAI's ``Invertd`` and written as ``OUTPUT/CASE.nii.gz`` (uint8 labels, the input's
shape and affine). A case that fails (unreadable file, wrong channel count) is reported with its file
and the reason; the other cases are still processed; the exit code is 1 if any case failed.
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Invertd

from medseg_core.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from medseg_core.data.transforms import build_transforms
from medseg_core.inference import keep_largest_component, predict_probabilities
from medseg_core.postprocess import PostProcessing
from medseg_core.runtime import resolve_device

NIFTI_ENDINGS = (".nii.gz", ".nii")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class PredictError(ValueError):
    """A case cannot be predicted; the message names the file and the reason."""


def _stem(path: Path) -> str:
    for ending in NIFTI_ENDINGS:
        if path.name.endswith(ending):
            return path.name[: -len(ending)]
    return path.stem


def gather_cases(path: str | Path) -> dict[str, list[Path]]:
    """Group the NIfTI files of a file or folder into cases: ``{case_id: [channel paths in order]}``.

    Raises:
        PredictError: the path does not exist or holds no NIfTI file.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(NIFTI_ENDINGS))
    else:
        raise PredictError(f"{path}: no such file or folder")
    if not files:
        raise PredictError(f"{path}: no NIfTI (.nii/.nii.gz) file found")
    cases: dict[str, dict[int, Path]] = {}
    for f in files:
        m = _CHANNEL_RE.match(_stem(f))
        case, channel = (m["case"], int(m["channel"])) if m else (_stem(f), 0)
        cases.setdefault(case, {})[channel] = f
    return {c: [chans[i] for i in sorted(chans)] for c, chans in sorted(cases.items())}


class Predictor:
    """A checkpoint loaded once, applied to many cases.

    ``checkpoint`` is a checkpoint file or an already loaded payload (``medseg-train`` scores its test
    cases on their original grids through this class, so its figures are what ``medseg-predict`` gives).
    """

    def __init__(self, checkpoint: str | Path | Mapping[str, Any], *, device: str = "auto", tta: bool = False,
                 largest_component: bool = False, modalities: Sequence[str] | Mapping[int, str] | None = None,
                 sw_batch_size: int = 2, overlap: float = 0.5, postprocess: bool = True) -> None:
        payload = checkpoint if isinstance(checkpoint, Mapping) else load_checkpoint(checkpoint)
        try:  # chosen on the validation cases by medseg-train (small-component removal per class)
            self.postprocess = PostProcessing.from_dict(payload.get("postprocessing")) if postprocess else None
        except ValueError as exc:
            raise CheckpointError(f"{checkpoint}: {exc}") from exc
        self.plan = payload["plan"]
        if not self.plan:
            raise CheckpointError(f"{checkpoint}: checkpoint holds no data plan; cannot preprocess inputs")
        self.labels = payload.get("labels") or {}
        self.model_config = payload["model_config"]
        self.spatial_dims = int(self.model_config.get("spatial_dims", 3))
        self.in_channels = int(self.model_config["in_channels"])
        self.device = resolve_device(device)
        self.model = model_from_checkpoint(payload).to(self.device).eval()
        self.tta, self.largest_component = tta, largest_component
        self.sw_batch_size, self.overlap = sw_batch_size, overlap
        channel_names = payload.get("channel_names") or {}
        if isinstance(modalities, Mapping):  # a site's channel_names: channel index -> modality
            self.modalities: list[str] | None = [str(modalities[i]) for i in sorted(modalities)]
        elif modalities is not None:
            self.modalities = list(modalities)
        elif channel_names:
            self.modalities = [channel_names[i] for i in sorted(channel_names)]
        else:
            self.modalities = None
        self.transform = build_transforms(self.plan, train=False, with_label=False, modalities=self.modalities)
        roi = self.plan["patch_size"] if self.spatial_dims == 3 else self.plan["patch_size_2d"]
        self.roi_size = [int(r) for r in roi]
        self.inverter = Invertd(keys="pred", transform=self.transform, orig_keys="image", nearest_interp=False)

    def _check_inputs(self, paths: list[Path]) -> nib.Nifti1Image:
        ref = None
        for p in paths:
            try:
                img = nib.load(str(p))
                np.asarray(img.dataobj[(0,) * len(img.shape)])  # touch the data: catches truncated files early
            except Exception as exc:
                raise PredictError(f"{p}: cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
            ref = ref or img
        assert ref is not None
        n_channels = len(paths) if len(paths) > 1 else (ref.shape[3] if len(ref.shape) == 4 else 1)
        if n_channels != self.in_channels:
            raise PredictError(
                f"{paths[0]}: the model expects {self.in_channels} channel(s), this case has {n_channels} "
                f"({', '.join(p.name for p in paths)})"
            )
        return ref

    @torch.no_grad()
    def predict_case(self, paths: list[Path]) -> tuple[np.ndarray, nib.Nifti1Image]:
        """Predict one case.

        Returns:
            ``(labels, reference_image)``: uint8 label map on the grid of ``paths[0]`` and that image.

        Raises:
            PredictError: unreadable input or wrong channel count.
        """
        ref = self._check_inputs(paths)
        data = self.transform({"image": [str(p) for p in paths]})
        image = data["image"]
        probs = predict_probabilities(
            self.model, image.unsqueeze(0).to(self.device), self.roi_size, sw_batch_size=self.sw_batch_size,
            overlap=self.overlap, tta=self.tta, model_spatial_dims=self.spatial_dims,
        )[0].cpu()
        # carry the image's meta-data and transform trace so Invertd can undo pad/spacing/orientation
        pred = image.clone()
        pred.set_array(probs)
        inverted = self.inverter({"image": image, "pred": pred})["pred"]
        labels = torch.as_tensor(inverted).argmax(dim=0).numpy().astype(np.uint8)
        if labels.shape != tuple(ref.shape[:3]):
            raise PredictError(f"{paths[0]}: inverted prediction {labels.shape} != input shape {ref.shape[:3]}")
        if self.postprocess is not None and self.postprocess.active:
            labels = self.postprocess(labels, [float(z) for z in ref.header.get_zooms()[:3]]).astype(np.uint8)
        if self.largest_component:
            labels = keep_largest_component(labels, [v for v in self.labels.values() if v != 0])
        return labels, ref


def write_prediction(labels: np.ndarray, ref: nib.Nifti1Image, path: Path) -> Path:
    """Write a uint8 label map with the reference image's affine and qform/sform codes."""
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    out = nib.Nifti1Image(labels.astype(np.uint8), ref.affine, header)
    out.set_qform(ref.affine, code=int(ref.header["qform_code"]) or 1)
    out.set_sform(ref.affine, code=int(ref.header["sform_code"]) or 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(path))
    return path


def write_overlay(image: np.ndarray, labels: np.ndarray, path: Path, title: str = "") -> Path:
    """PNG with three orthogonal middle slices, label overlay in colour."""
    from medseg_core.plots import plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for axis, ax in enumerate(axes):
        idx = image.shape[axis] // 2
        img = np.take(image, idx, axis=axis).T
        lab = np.take(labels, idx, axis=axis).T.astype(float)
        ax.imshow(img, cmap="gray", origin="lower")
        ax.imshow(np.ma.masked_where(lab == 0, lab), cmap="autumn", alpha=0.5, origin="lower",
                  vmin=1, vmax=max(1, labels.max()))
        ax.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    try:
        predictor = Predictor(args.checkpoint, device=args.device, tta=args.tta,
                              largest_component=args.largest_component, modalities=args.modality,
                              overlap=args.overlap, postprocess=not args.no_postprocess)
        cases = gather_cases(args.input)
    except (CheckpointError, PredictError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out_dir = Path(args.output)
    failures: list[str] = []
    scores: dict[str, dict] = {}
    for case_id, paths in cases.items():
        try:
            labels, ref = predictor.predict_case(paths)
            out = write_prediction(labels, ref, out_dir / f"{case_id}.nii.gz")
            if args.reference:
                scores[case_id] = score_against_reference(labels, ref, Path(args.reference), case_id,
                                                          predictor.labels)
                dice = {k: round(v["dice"], 4) for k, v in scores[case_id].items()}
                print(f"{case_id}: Dice vs reference {dice}")
            if args.overlay:
                first = np.asarray(ref.dataobj, dtype=np.float32)
                first = first[..., 0] if first.ndim == 4 else first
                write_overlay(first, labels, out_dir / f"{case_id}.png", title=case_id)
            counts = {name: int((labels == v).sum()) for name, v in predictor.labels.items() if v}
            print(f"{case_id}: wrote {out} voxels per class {counts}")
        except PredictError as exc:
            failures.append(str(exc))
            print(f"error: {exc}", file=sys.stderr)
        except Exception as exc:  # keep going: one bad case must not stop the others
            failures.append(f"{paths[0]}: {type(exc).__name__}: {exc}")
            print(f"error: {paths[0]}: prediction failed ({type(exc).__name__}: {exc})", file=sys.stderr)
            if args.debug:
                traceback.print_exc()
    if scores:
        from medseg_core.checkpoint import write_json
        from medseg_core.metrics import aggregate

        agg = aggregate(list(scores.values()))
        write_json({"cases": scores, "aggregate": agg}, out_dir / "metrics.json")
        print(f"mean foreground Dice vs reference: {agg['mean'].get('dice', float('nan')):.4f} "
              f"({out_dir / 'metrics.json'})")
    print(f"{len(cases) - len(failures)}/{len(cases)} case(s) predicted into {out_dir}")
    return 1 if failures else 0


def score_against_reference(labels: np.ndarray, ref: nib.Nifti1Image, reference_dir: Path, case_id: str,
                            class_labels: dict[str, int]) -> dict:
    """Metrics of a prediction against ``reference_dir/CASE.nii.gz`` on the scan's original grid.

    Raises:
        PredictError: the reference label map is missing, unreadable or on another grid.
    """
    path = reference_dir / f"{case_id}.nii.gz"
    if not path.is_file():
        path = reference_dir / f"{case_id}.nii"
    return score_label_map(labels, ref, path, class_labels, case_id=case_id)


def score_label_map(labels: np.ndarray, ref: nib.Nifti1Image, label_path: str | Path,
                    class_labels: Mapping[str, int], *, case_id: str | None = None, **metric_kwargs: Any) -> dict:
    """Metrics of a label map on ``ref``'s grid against the ground-truth file ``label_path`` (same grid).

    Distances use ``ref``'s voxel sizes. ``metric_kwargs`` go to :func:`medseg_core.metrics.case_metrics`
    (``nsd_tolerance_mm``, ``hd95``).

    Raises:
        PredictError: the label map is missing, unreadable or on another grid than ``ref``.
    """
    from medseg_core.metrics import case_metrics

    path = Path(label_path)
    try:
        gt_img = nib.load(str(path))
        gt = np.asarray(gt_img.dataobj)
    except Exception as exc:
        raise PredictError(f"{path}: cannot read reference label map ({type(exc).__name__}: {exc})") from exc
    if gt.shape != labels.shape or not np.allclose(gt_img.affine, ref.affine, atol=1e-3):
        raise PredictError(f"{path}: reference grid {gt.shape} differs from the scan's {labels.shape}")
    spacing = tuple(float(z) for z in ref.header.get_zooms()[:3])
    fg = {k: v for k, v in class_labels.items() if v != 0}
    return case_metrics(labels, np.rint(gt).astype(np.int64), spacing_mm=spacing, class_values=fg, case_id=case_id,
                        **metric_kwargs)


def score_on_original_grid(checkpoint: str | Path | Mapping[str, Any], cases: Sequence[Any], *,
                           modalities: Sequence[str] | Mapping[int, str] | None = None, device: str = "auto",
                           sw_batch_size: int = 2,
                           nsd_tolerance_mm: float = 2.0, hd95: bool = True) -> dict[str, Any]:
    """Score labelled cases as ``medseg-predict`` delivers them: on each scan's own grid.

    Metrics on the plan's grid compare against label maps resampled (nearest neighbour) to the plan's
    spacing; hospitals read predictions on the scan's grid, which is where nnU-Net reports its metrics
    too. This is :class:`Predictor` with ``medseg-predict``'s defaults (sliding-window overlap 0.5, no
    TTA, the checkpoint's post-processing): probabilities mapped back with ``Invertd`` (linear), compared
    with the case's original label file, distances in the scan's voxel sizes.

    Args:
        checkpoint: a checkpoint file or payload (``plan``, ``model_config``, ``state_dict``, ``labels``).
        cases: objects with ``case_id``, ``image_paths`` and ``label_path`` (a site's
            :class:`medseg_core.data.dataset.Case`); those without a label are skipped.
        modalities: modality of each input channel in the files' order, or the site's ``channel_names``.

    Returns:
        ``{"cases": [{"case_id", "metrics"}], "aggregate", "mean_dice", "num_cases"}``.
    """
    from medseg_core.metrics import aggregate

    predictor = Predictor(checkpoint, device=device, modalities=modalities, sw_batch_size=sw_batch_size)
    scored = []
    for c in cases:
        if c.label_path is None:
            continue
        labels, ref = predictor.predict_case([Path(p) for p in c.image_paths])
        scored.append({"case_id": c.case_id, "metrics": score_label_map(
            labels, ref, c.label_path, predictor.labels, case_id=c.case_id, nsd_tolerance_mm=nsd_tolerance_mm,
            hd95=hd95)})
    agg = aggregate([c["metrics"] for c in scored]) if scored else {}
    return {"cases": scored, "aggregate": agg, "mean_dice": float(agg.get("mean", {}).get("dice", float("nan"))),
            "num_cases": len(scored)}


def original_grid_metrics(checkpoint: str | Path | Mapping[str, Any], cases: Sequence[Any],
                          **kwargs: Any) -> dict[str, float]:
    """:func:`score_on_original_grid`'s aggregate as flat metrics under ``original-grid/`` (what a federated
    site reports with its final test); empty when no case is labelled. ``kwargs`` go to that function."""
    from medseg_core.federation import ORIGINAL_GRID
    from medseg_core.metrics import flat_summary

    original = score_on_original_grid(checkpoint, cases, **kwargs)
    if not original["num_cases"]:
        return {}
    return {f"{ORIGINAL_GRID}/{k}": v for k, v in flat_summary(original["aggregate"]).items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medseg-predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint written by medseg-train or the server")
    p.add_argument("--input", required=True, help="a NIfTI file or a folder of them")
    p.add_argument("--output", required=True, help="output folder for CASE.nii.gz label maps")
    p.add_argument("--tta", action="store_true", help="mirror test-time augmentation (all axis flips)")
    p.add_argument("--largest-component", action="store_true", help="keep the largest component per class")
    p.add_argument("--overlay", action="store_true", help="also write CASE.png with the label overlay")
    p.add_argument("--no-postprocess", action="store_true",
                   help="skip the checkpoint's post-processing (small components removed, chosen on validation)")
    p.add_argument("--reference", default=None,
                   help="folder of ground-truth CASE.nii.gz label maps: report Dice/HD95/NSD on the original grid")
    p.add_argument("--modality", nargs="+", default=None,
                   help="modality of each input channel, in the files' order (e.g. T2 T1); the model's channels "
                        "are matched by name. Default: the order the checkpoint records (the training sites' own when "
                        "they agree, else the model's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    p.add_argument("--debug", action="store_true", help="print tracebacks of failed cases")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
