"""Data-pipeline benchmark: the training pipeline uncached (MONAI ``Dataset``) vs cached (``CacheDataset``).

One synthetic CT site (``site_profile(0)``: 0.8 x 0.8 x 2.5 mm, stored LPS) with CT-sized volumes is
written once, fingerprinted and planned. For each target spacing (the site's own plan, where
``Spacingd`` has nothing to resample, and a federation-like spacing that needs resampling) the same
random training transforms run behind a plain ``Dataset`` and a ``CacheDataset``:

- per volume: mean time of ``dataset[i]`` over the cases (load + preprocess + sample/augment, vs copy
  from cache + sample/augment);
- per epoch: one pass of a ``DataLoader`` (batch 2, no workers), plain and cached interleaved
  ``--repeats`` times after one warm-up epoch, each pair with the same shuffling and augmentation
  draws (the random affine, p=0.2, dominates the cached time, so unpaired epochs vary a lot);
  medians are reported.

Prints JSON and a markdown table, and rewrites the ``## Data pipeline`` section of docs/benchmarks.md::

    python bench/data_pipeline.py                      # 8 cases of 256x256x160 (the documented run)
    python bench/data_pipeline.py --cases 3 --shape 96 96 64 --repeats 2 --no-docs   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import monai
import torch
from docs_block import write_block
from monai.data import CacheDataset, DataLoader, Dataset

from medseg_core.data.dataset import load_site
from medseg_core.data.fingerprint import compute_site_fingerprint, make_plan
from medseg_core.data.loaders import case_dicts
from medseg_core.data.synthetic import make_site
from medseg_core.data.transforms import build_transforms

SECTION = "## Data pipeline"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=8, help="training cases in the site (default 8)")
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 160], help="stored volume shape")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per dataset kind (interleaved)")
    p.add_argument("--resample-spacing", type=float, nargs=3, default=[1.0, 1.0, 2.0],
                   help="second target spacing (mm, RAS), one that needs resampling; 0 0 0 skips it")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--cache-workers", type=int, default=1, help="threads filling the CacheDataset")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where to write (or reuse) the synthetic site; default: a temporary folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs", type=Path, default=DOCS, help="markdown file whose section is rewritten")
    p.add_argument("--no-docs", action="store_true", help="do not touch the markdown file")
    args = p.parse_args(argv)
    if args.cases < 1 or args.repeats < 1 or args.batch_size < 1 or args.threads < 1:
        p.error("--cases, --repeats, --batch-size and --threads must be >= 1")
    return args


def ensure_site(folder: Path, cases: int, shape: list[int], seed: int) -> Path:
    """Write the benchmark site once (reused when it already holds the same cases)."""
    site_dir = folder / f"bench_ct_{cases}x{'x'.join(map(str, shape))}_s{seed}"
    if (site_dir / "dataset.json").is_file():
        return site_dir
    print(f"writing {cases} synthetic CT cases of {shape} to {site_dir} ...", file=sys.stderr)
    staging = folder / ".staging"  # written here first: an interrupted run leaves no half site behind
    if staging.exists():
        shutil.rmtree(staging)
    make_site(staging / site_dir.name, site_index=0, cases=cases, seed=seed, shape=shape, n_test=0)
    (staging / site_dir.name).rename(site_dir)
    staging.rmdir()
    return site_dir


def touch(batch: dict) -> float:
    """Consume a batch as a training step would (forces any lazy work)."""
    return float(batch["image"].sum()) + float(batch["label"].sum())


def time_epoch(ds: Dataset, batch_size: int, seed: int) -> float:
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    for batch in loader:
        touch(batch)
    return time.perf_counter() - start


def time_items(ds: Dataset) -> list[float]:
    out = []
    for i in range(len(ds)):
        start = time.perf_counter()
        item = ds[i]
        touch(item[0] if isinstance(item, list) else item)
        out.append(time.perf_counter() - start)
    return out


def cache_megabytes(ds: CacheDataset) -> float:
    total = 0
    for item in ds._cache:  # MONAI keeps the cached (deterministic-prefix) results here
        for v in item.values():
            if isinstance(v, torch.Tensor):
                total += v.element_size() * v.nelement()
            elif hasattr(v, "nbytes"):
                total += int(v.nbytes)
    return total / 2**20


def run_config(name: str, plan: dict, data: list[dict], modalities: dict, args: argparse.Namespace) -> dict:
    tf_plain = build_transforms(plan, train=True, modalities=modalities)
    tf_cached = build_transforms(plan, train=True, modalities=modalities)
    tf_plain.set_random_state(seed=args.seed)
    tf_cached.set_random_state(seed=args.seed)
    plain = Dataset(data, tf_plain)
    start = time.perf_counter()
    cached = CacheDataset(data, tf_cached, cache_rate=1.0, num_workers=args.cache_workers, progress=False)
    fill_s = time.perf_counter() - start
    print(f"[{name}] cache filled in {fill_s:.1f} s", file=sys.stderr)

    item_plain, item_cached = time_items(plain), time_items(cached)
    time_epoch(cached, args.batch_size, args.seed)  # warm-up (allocator, first-touch pages)
    epochs_plain, epochs_cached = [], []
    for r in range(args.repeats):
        # paired: both see the same shuffling and the same augmentation draws in repeat r
        tf_plain.set_random_state(seed=args.seed + r)
        epochs_plain.append(time_epoch(plain, args.batch_size, args.seed + r))
        tf_cached.set_random_state(seed=args.seed + r)
        epochs_cached.append(time_epoch(cached, args.batch_size, args.seed + r))
        print(f"[{name}] repeat {r + 1}/{args.repeats}: plain {epochs_plain[-1]:.2f} s, "
              f"cached {epochs_cached[-1]:.2f} s", file=sys.stderr)
    med_plain, med_cached = statistics.median(epochs_plain), statistics.median(epochs_cached)
    return {
        "name": name,
        "target_spacing_mm": plan["target_spacing_mm"],
        "patch_size": plan["patch_size"],
        "cache_fill_s": round(fill_s, 3),
        "cache_mb": round(cache_megabytes(cached), 1),
        # means, not medians: the random affine (p=0.2, ~0.3 s per patch) is rare but costly
        "volume_uncached_s": round(statistics.mean(item_plain), 4),
        "volume_cached_s": round(statistics.mean(item_cached), 4),
        "volume_ratio": round(statistics.mean(item_plain) / statistics.mean(item_cached), 2),
        "epoch_plain_s": [round(t, 3) for t in epochs_plain],
        "epoch_cached_s": [round(t, 3) for t in epochs_cached],
        "epoch_plain_median_s": round(med_plain, 3),
        "epoch_cached_median_s": round(med_cached, 3),
        "epoch_ratio": round(med_plain / med_cached, 2),
        "epoch_ratio_per_repeat": [round(p / c, 2) for p, c in zip(epochs_plain, epochs_cached, strict=True)],
    }


def markdown(result: dict) -> str:
    rows = [
        "| target spacing (mm) | patch | per volume (mean): uncached / cached (s) | ratio | "
        "epoch: `Dataset` / `CacheDataset` (s, median) | **epoch ratio** | cache fill (s) | cache (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["configs"]:
        spacing = " x ".join(f"{s:g}" for s in r["target_spacing_mm"])
        rows.append(
            f"| {spacing} ({r['name']}) | {'x'.join(map(str, r['patch_size']))} | "
            f"{r['volume_uncached_s']:.3f} / {r['volume_cached_s']:.3f} | {r['volume_ratio']:.1f}x | "
            f"{r['epoch_plain_median_s']:.2f} / {r['epoch_cached_median_s']:.2f} | **{r['epoch_ratio']:.1f}x** | "
            f"{r['cache_fill_s']:.1f} | {r['cache_mb']:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = None
    if args.data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="medseg-bench-")
        root = Path(tmp.name)
    else:
        root = args.data_dir
        root.mkdir(parents=True, exist_ok=True)
    try:
        site = load_site(ensure_site(root, args.cases, args.shape, args.seed))
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        plan = make_plan(compute_site_fingerprint(site))
        fingerprint_s = time.perf_counter() - start
        data = case_dicts(site.train_cases)
        configs = [("site plan, no resampling", plan)]
        if any(s > 0 for s in args.resample_spacing):
            configs.append(("resampled", {**plan, "target_spacing_mm": [float(s) for s in args.resample_spacing]}))
        results = [run_config(name, p, data, site.channel_names, args) for name, p in configs]
        load_after = os.getloadavg()[0]
        spacing_mm = [round(s, 3) for s in site.train_cases[0].spacing_mm]
    finally:
        if tmp is not None:
            tmp.cleanup()

    argv_used = sys.argv[1:] if argv is None else argv
    result = {
        "benchmark": "data_pipeline",
        "command": " ".join(["python bench/data_pipeline.py", *map(shlex.quote, argv_used)]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                    "load_average_1min": [round(load_before, 2), round(load_after, 2)]},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__},
        "data": {"cases": args.cases, "shape": args.shape, "spacing_mm": spacing_mm,
                 "stored": "LPS, float32 .nii.gz", "batch_size": args.batch_size,
                 "num_samples": 2, "fingerprint_s_per_case": round(fingerprint_s / args.cases, 3)},
        "configs": results,
    }
    print(json.dumps(result, indent=2))
    table = markdown(result)
    print("\n" + table)
    if not args.no_docs:
        m = result["machine"]
        section = "\n".join([
            f"Command: `{result['command']}`",
            "",
            f"One synthetic CT site, {args.cases} training cases of {' x '.join(map(str, args.shape))} voxels "
            f"(0.8 x 0.8 x 2.5 mm, stored LPS, float32 `.nii.gz`). Same random training transforms "
            f"(`build_transforms(plan, train=True)`: 2 patches per case, flips, affine, intensity, noise) behind a "
            f"plain MONAI `Dataset` and a `CacheDataset` (load, RAS, normalisation, resampling, padding and crop "
            f"centres cached). Epoch = one `DataLoader` pass, batch {args.batch_size}, no workers; "
            f"{args.repeats} epochs of each, interleaved after a warm-up, each pair with the same shuffling "
            f"and augmentation draws; medians (ratio per pair: "
            f"{'; '.join(', '.join(f'{x:g}' for x in r['epoch_ratio_per_repeat']) for r in results)}). "
            f"{m['cpus']} CPUs, {m['torch_threads']} torch thread(s), load average "
            f"{m['load_average_1min'][0]} -> {m['load_average_1min'][1]} (a shared machine: other jobs were "
            f"running). torch {torch.__version__}, MONAI {monai.__version__}. Fingerprint: "
            f"{result['data']['fingerprint_s_per_case']:.2f} s per case.",
            "",
            table,
            "",
        ])
        write_block("data_pipeline", SECTION, section, args.docs)
        print(f"\nupdated {args.docs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
