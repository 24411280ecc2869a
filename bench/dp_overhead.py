"""Benchmark: a DP-SGD training step vs the same non-private step, per per-sample-gradient method.

    python bench/dp_overhead.py                  # 2D U-Net 8x1x128^2, 3D U-Net 2x1x48^3, TransUNet 4x1x128^2
    python bench/dp_overhead.py --quick          # smaller shapes, for a smoke run
    python bench/dp_overhead.py --write-docs     # also update the table in docs/benchmarks.md

Every variant trains its own copy of the same DP-compatible model (``dp_compatible=True``) on the same
batch with the same step (zero_grad, forward, per-sample Dice+CE, backward, optimiser step), timed
*interleaved* in one process (round-robin, median per variant) so that machine noise hits all alike;
on the CPU the process' CPU time per step is compared (robust to other jobs on a shared machine):

* ``non-DP``: plain SGD;
* ``DP hooks`` / ``DP functorch``: stock Opacus 1.6 ``GradSampleModule`` + ``DPOptimizer``;
* ``DP ghost``: Opacus' ghost clipping (``grad_sample_mode="ghost"``, its two-pass criterion);
* ``DP fast (ours)``: :class:`client.privacy.FastGradSampleModule` (grouped-convolution grad samplers
  for Conv/ConvTranspose, closed-form PReLU and weight-standardised conv) + ``DPOptimizer``.

DP steps clip each sample to C = 1 and add noise with sigma = 1 (fixed batches, no Poisson sampling: the
compute is what is measured). Peak memory: the rise of the resident set during one step (Linux
``VmHWM`` reset through ``/proc/self/clear_refs``) in a separate probe process whose allocator returns
freed memory to the OS (:func:`measure_memory`), or CUDA's peak allocation above what is allocated.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from docs_block import write_block
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer

from client.privacy import FastGradSampleModule, PrivateOptimizer
from medseg_core.losses import build_loss
from medseg_core.models import build_model

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "unet2d": {"model": {"name": "unet", "spatial_dims": 2, "channels": [16, 32, 64, 128], "strides": [2, 2, 2],
                         "num_res_units": 2, "norm": "instance"}, "batch": (8, 1, 128, 128)},
    "unet3d": {"model": {"name": "unet", "spatial_dims": 3, "channels": [8, 16, 32, 64], "strides": [2, 2, 2],
                         "num_res_units": 1, "norm": "instance"}, "batch": (2, 1, 48, 48, 48)},
    "transunet2d": {"model": {"name": "transunet_r50_vit_b16", "spatial_dims": 2, "img_size": [128, 128],
                              "hidden_size": 64, "num_layers": 2, "num_heads": 2, "mlp_dim": 128, "dropout_rate": 0.0,
                              "resnet_units": [1, 1, 1], "width_factor": 0.25, "decoder_channels": [64, 32, 16, 8],
                              "head_channels": 64}, "batch": (4, 1, 128, 128)},
}
QUICK = {"unet2d": (4, 1, 64, 64), "unet3d": (2, 1, 32, 32, 32), "transunet2d": (2, 1, 64, 64)}
VARIANTS = ("non-DP", "DP hooks", "DP functorch", "DP ghost", "DP fast (ours)")
SIGMA, CLIP, LR = 1.0, 1.0, 0.01


def make_batch(shape: tuple[int, ...], device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    label = (torch.rand(shape, generator=g) > 0.7).long() + (torch.rand(shape, generator=g) > 0.9).long()
    image = label.float() + 0.5 * torch.randn(shape, generator=g)
    return image.to(device), label.to(device)


class Runner:
    """One variant: its own model copy, optimiser and loss."""

    def __init__(self, variant: str, base: torch.nn.Module, batch_size: int) -> None:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        self.loss_fn = build_loss("dice_ce", include_background=True)
        self.variant = variant
        if variant == "non-DP":
            self.model, self.opt = model, opt
        elif variant == "DP ghost":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model, self.opt, self.loss_fn, _ = PrivacyEngine(accountant="rdp").make_private(
                    module=model, optimizer=opt, criterion=self.loss_fn, noise_multiplier=SIGMA, max_grad_norm=CLIP,
                    grad_sample_mode="ghost", poisson_sampling=False,
                    data_loader=torch.utils.data.DataLoader(list(range(batch_size)), batch_size=batch_size))
        else:
            if variant == "DP fast (ours)":
                self.model = FastGradSampleModule(model, loss_reduction="mean")
            else:
                self.model = GradSampleModule(model, loss_reduction="mean", force_functorch=variant == "DP functorch")
            cls = PrivateOptimizer if variant == "DP fast (ours)" else DPOptimizer
            self.opt = cls(opt, noise_multiplier=SIGMA, max_grad_norm=CLIP, expected_batch_size=batch_size)

    def step(self, image: torch.Tensor, label: torch.Tensor) -> float:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(image), label)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_step_mb(runner: Runner, image: torch.Tensor, label: torch.Tensor, device: torch.device) -> float | None:
    """Memory a step needs above what is resident before it (MB); ``None`` where it cannot be measured."""
    if device.type == "cuda":
        runner.opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner.step(image, label)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    runner.opt.zero_grad(set_to_none=True)  # baseline: weights and optimiser state, no gradients
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _status_kb("VmRSS")
    runner.step(image, label)
    peak = _status_kb("VmHWM")
    return None if before is None or peak is None else max(0, peak - before) / 1024


def bench_case(name: str, spec: dict, shape: tuple[int, ...], rounds: int, variants: list[str],
               device: torch.device) -> dict:
    torch.manual_seed(0)
    kwargs = dict(spec["model"])
    base = build_model(kwargs.pop("name"), in_channels=1, out_channels=3, dp_compatible=True, **kwargs).to(device)
    image, label = make_batch(shape, device)
    runners, failed = {}, {}
    for v in variants:
        try:
            runners[v] = Runner(v, base, shape[0])
            runners[v].step(image, label)  # warm-up; a variant Opacus cannot run is reported, not fatal
        except Exception as exc:
            failed[v] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:140]}"
            runners.pop(v, None)
            print(f"{name}: {v} failed: {failed[v]}", file=sys.stderr)
    # on the CPU the process' CPU time is measured: other jobs on a shared machine delay a step (wall time)
    # but do not change the work it does; on CUDA, wall time after synchronising
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times: dict[str, list[float]] = {v: [] for v in runners}
    walls: dict[str, list[float]] = {v: [] for v in runners}
    for _ in range(rounds):
        for v, r in runners.items():
            _sync(device)
            t0, w0 = clock(), time.perf_counter()
            r.step(image, label)
            _sync(device)
            times[v].append(clock() - t0)
            walls[v].append(time.perf_counter() - w0)
    return {"case": name, "batch": list(shape), "params": sum(p.numel() for p in base.parameters()),
            "runners": runners, "times": times, "walls": walls, "failed": failed, "image": image, "label": label}


def memory_probe(name: str, shape: tuple[int, ...], variants: list[str], device: torch.device) -> dict:
    """Peak step memory per variant, measured in this process (run by :func:`measure_memory`)."""
    case = bench_case(name, CASES[name], shape, 0, variants, device)
    return {v: peak_step_mb(r, case["image"], case["label"], device) for v, r in case["runners"].items()}


def measure_memory(name: str, shape: tuple[int, ...], variants: list[str], device: torch.device,
                   threads: int | None) -> dict[str, float | None]:
    """Peak step memory per variant, in a fresh process.

    On the CPU, glibc keeps freed heap memory resident and reuses it, which hides a step's peak; the
    probe process makes every allocation above 64 KiB its own mapping, returned to the OS when freed
    (``MALLOC_MMAP_THRESHOLD_``), so the resident set follows live tensor memory. That slows allocation,
    hence a separate process from the timing.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", name, "--shape", *map(str, shape),
           "--device", str(device), "--variants", *variants] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(f"{name}: memory probe failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return {v: None for v in variants}
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(case: dict, memory: dict[str, float | None]) -> dict:
    """Medians and ratios vs non-DP."""
    runners, times, walls = case.pop("runners"), case.pop("times"), case.pop("walls")
    case.pop("image"), case.pop("label")
    base_t = statistics.median(times["non-DP"]) if "non-DP" in times else float("nan")
    base_m = memory.get("non-DP")
    rows = []
    for v in runners:
        t, m = statistics.median(times[v]), memory.get(v)
        # ratio of the steps taken in the same round (both saw the same machine load), median over rounds
        ratio = statistics.median(a / b for a, b in zip(times[v], times["non-DP"], strict=True)) \
            if "non-DP" in times else t / base_t
        rows.append({"variant": v, "s_per_step": t, "time_ratio": ratio, "peak_mb": m, "seconds": times[v],
                     "wall_s_per_step": statistics.median(walls[v]),
                     "memory_ratio": (m / base_m) if (m is not None and base_m) else None})
    return {**case, "rows": rows}


def markdown(results: list[dict], command: str, device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.machine()}), {torch.get_num_threads()} torch thread(s)"
    lines = [f"Command: `{command}`  ", f"Machine: {where}; torch {torch.__version__}; "
             f"{'wall' if device.type == 'cuda' else 'CPU'} s/step: median over the interleaved rounds; time ratio: median over rounds of the ratio within a round; memory: rise during one step.", ""]
    for res in results:
        lines += [f"**{res['case']}** batch {'×'.join(map(str, res['batch']))}, {res['params']:,} parameters", "",
                  "| variant | s/step | time vs non-DP | peak step memory (MB) | memory vs non-DP | wall s/step |",
                  "|---|---|---|---|---|---|"]
        for r in res["rows"]:
            mem = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
            mratio = "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}×"
            lines.append(f"| {r['variant']} | {r['s_per_step']:.3f} | **{r['time_ratio']:.2f}×** | {mem} | {mratio} | "
                         f"{r['wall_s_per_step']:.3f} |")
        for v, why in res["failed"].items():
            lines.append(f"| {v} | failed: {why} | | | | |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (one step each)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--memory-probe", choices=list(CASES), help=argparse.SUPPRESS)
    p.add_argument("--shape", nargs="+", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    device = torch.device(args.device)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, tuple(args.shape), args.variants, device)))
        return 0
    results = []
    for name in args.cases:
        shape = tuple(QUICK[name] if args.quick else CASES[name]["batch"])
        case = bench_case(name, CASES[name], shape, args.rounds, args.variants, device)
        memory = {} if args.no_memory else measure_memory(name, shape, list(case["runners"]), device, args.threads)
        results.append(summarize(case, memory))
        print(json.dumps(results[-1]), flush=True)
    command = ("python bench/dp_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    md = markdown(results, command, device)
    print(md)
    if args.write_docs:
        write_block("dp_overhead", "### Cost of a private step (bench/dp_overhead.py)", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
