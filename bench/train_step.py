"""Benchmark: our engine's training step vs a plain hand-written MONAI eager loop, same model and batch.

    python bench/train_step.py                       # 2D U-Net 8x1x256^2 and 3D U-Net 2x1x96^3
    python bench/train_step.py --quick               # smaller shapes, for a smoke run
    python bench/train_step.py --write-docs          # also update docs/benchmarks.md

Variants are timed *interleaved* in one process (round-robin, several rounds, median per variant), so
machine noise hits every variant alike. For each: seconds per step, ratio vs the plain loop, achieved
GFLOP/s (FLOPs counted with ``torch.utils.flop_counter`` for forward + backward) against the machine's
measured dense conv peak, where the step goes (convolution operators vs everything else, by
``torch.profiler``, with what 2x the plain loop would leave for the rest), and the loss after the same few
steps from the same initial weights (accuracy check: bf16 must not change the training trajectory
materially).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch
from docs_block import write_block
from monai.losses import DiceCELoss
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from medseg_core.engine import compile_model, memory_format, train_one_epoch
from medseg_core.losses import build_loss
from medseg_core.models import build_model

SECTION = "## Training step (bench/train_step.py)"

CASES = {
    "unet2d": {"model": {"name": "unet", "spatial_dims": 2, "channels": [16, 32, 64, 128], "strides": [2, 2, 2],
                         "num_res_units": 2, "norm": "instance"}, "batch": (8, 1, 256, 256)},
    "unet3d": {"model": {"name": "unet", "spatial_dims": 3, "channels": [16, 32, 64, 128], "strides": [2, 2, 2],
                         "num_res_units": 2, "norm": "instance"}, "batch": (2, 1, 96, 96, 96)},
    # the acceptance run's step (configs/experiment/pooled_synth.yaml): 2 cases x 4 patches of 48x48x16, 2 channels
    "unet3d_pooled": {"model": {"name": "unet", "spatial_dims": 3, "channels": [16, 32, 64, 128],
                                "strides": [2, 2, 2], "num_res_units": 2, "norm": "instance"},
                      "batch": (8, 2, 48, 48, 16)},
}
QUICK = {"unet2d": (4, 1, 128, 128), "unet3d": (1, 1, 48, 48, 48), "unet3d_pooled": (2, 2, 48, 48, 16)}
# variant name -> engine options
VARIANTS = {
    "ours fp32": {"channels_last": False, "amp": False, "compile": False},
    "ours channels-last": {"channels_last": True, "amp": False, "compile": False},
    "ours bf16": {"channels_last": False, "amp": True, "compile": False},
    "ours channels-last+bf16": {"channels_last": True, "amp": True, "compile": False},
    "ours compile": {"channels_last": False, "amp": False, "compile": True},
    "ours compile+channels-last": {"channels_last": True, "amp": False, "compile": True},
    "ours compile+bf16": {"channels_last": False, "amp": True, "compile": True},
}


def conv_peak_gflops(spatial_dims: int, seconds: float = 3.0) -> float:
    """Measured dense conv throughput (forward, fp32) on a large well-shaped convolution."""
    if spatial_dims == 3:
        conv = torch.nn.Conv3d(64, 64, 3, padding=1)
        x = torch.randn(1, 64, 32, 32, 32)
    else:
        conv = torch.nn.Conv2d(64, 64, 3, padding=1)
        x = torch.randn(8, 64, 96, 96)
    flops = 2 * x[0, 0].numel() * x.shape[0] * 64 * 64 * 3**spatial_dims
    with torch.no_grad():
        conv(x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            conv(x)
            n += 1
    return flops * n / (time.perf_counter() - start) / 1e9


def make_batch(shape: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    label_shape = (shape[0], 1, *shape[2:])
    label = (torch.rand(label_shape, generator=g) > 0.7).long() + (torch.rand(label_shape, generator=g) > 0.9).long()
    image = label.float() + 0.5 * torch.randn(shape, generator=g)  # every channel shows the label
    return {"image": image, "label": label}


def step_flops(model: torch.nn.Module, batch: dict, loss_fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        loss = loss_fn(model(batch["image"]), batch["label"])
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def convolution_share(step, steps: int = 2) -> float:
    """Share of a training step's time spent inside convolution operators (forward and backward).

    Measured with ``torch.profiler`` as the self time of ATen's convolution ops (oneDNN's kernels on this
    CPU, plus their layout reorders) over the self time of every op, so compiled graphs (the fused norm,
    activation and addition code) count as "everything else", as do the loss and the optimiser. A share, not
    seconds: the profiler slows every op a little, and the bench's own timing is the reference.
    """
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::") and "conv" in e.key)
    return conv / total if total else 0.0


class Plain:
    """The plain MONAI eager loop a researcher would write: fp32, default layout, MONAI DiceCELoss."""

    def __init__(self, model: torch.nn.Module, batch: dict):
        self.model, self.batch = model, batch
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def step(self) -> float:
        self.model.train()
        self.opt.zero_grad()
        loss = self.loss_fn(self.model(self.batch["image"]), self.batch["label"])
        loss.backward()
        self.opt.step()
        return float(loss.detach())


class Ours:
    """One ``train_one_epoch`` call over one batch with the given engine options."""

    def __init__(self, model: torch.nn.Module, batch: dict, spatial_dims: int, channels_last: bool, amp: bool,
                 compile: bool):
        self.model = model.to(memory_format=memory_format(spatial_dims)) if channels_last else model
        self.forward_model = compile_model(self.model) if compile else self.model
        self.batch, self.channels_last, self.amp = batch, channels_last, amp
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        # same objective as the plain loop (DiceCE with background), our per-sample implementation
        self.loss_fn = build_loss("dice_ce", include_background=True)

    def step(self) -> float:
        stats = train_one_epoch(self.forward_model, [self.batch], self.loss_fn, self.opt, device=torch.device("cpu"),
                                amp=self.amp, channels_last=self.channels_last)
        return stats["loss"]


def bench_case(name: str, spec: dict, shape: tuple[int, ...], rounds: int, steps: int, variants: list[str]) -> dict:
    # each case compiles its own graphs: MONAI's UNet.forward is one code object for every case and variant,
    # and past dynamo's recompile limit (8) a further variant would silently run eager
    torch._dynamo.reset()
    torch.manual_seed(0)
    dims = spec["model"]["spatial_dims"]
    kwargs = dict(spec["model"])
    base = build_model(kwargs.pop("name"), in_channels=shape[1], out_channels=3, **kwargs)
    batch = make_batch(shape)
    runners = {"plain MONAI loop": Plain(copy.deepcopy(base), batch)}
    for v in variants:
        runners[v] = Ours(copy.deepcopy(base), batch, dims, **VARIANTS[v])
    flops = step_flops(copy.deepcopy(base), batch, DiceCELoss(to_onehot_y=True, softmax=True))
    times: dict[str, list[float]] = {k: [] for k in runners}
    losses: dict[str, list[float]] = {k: [] for k in runners}
    failed: dict[str, str] = {}
    for k, r in list(runners.items()):  # warm-up (compilation, allocator); a variant that fails is reported
        try:
            r.step()
            r.step()
        except Exception as exc:  # e.g. an inductor lowering error for one layout
            failed[k] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            del runners[k]
            print(f"{name}: {k} failed: {failed[k]}", file=sys.stderr)
    for _ in range(rounds):
        for k, r in runners.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                losses[k].append(r.step())
            times[k].append((time.perf_counter() - t0) / steps)
    # where each variant's step goes (after the timing, so the profiler does not disturb it)
    conv_share = {k: convolution_share(r.step) for k, r in runners.items()}
    peak = conv_peak_gflops(dims)
    plain = statistics.median(times["plain MONAI loop"])
    rows = []
    for k in runners:
        t = statistics.median(times[k])
        rows.append({"variant": k, "s_per_step": t, "speedup_vs_plain": plain / t, "gflops": flops / t / 1e9,
                     "fraction_of_conv_peak": flops / t / 1e9 / peak, "final_loss": losses[k][-1],
                     "conv_s": conv_share[k] * t, "other_s": (1 - conv_share[k]) * t})
    return {"case": name, "batch": list(shape), "params": sum(p.numel() for p in base.parameters()),
            "gflop_per_step": flops / 1e9, "conv_peak_gflops": peak, "rows": rows, "failed": failed}


def markdown(results: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`  ", f"Machine: {platform.machine()}, {torch.get_num_threads()} "
             f"torch threads, torch {torch.__version__}, CPU.", ""]
    for res in results:
        lines += [f"**{res['case']}** batch {'×'.join(map(str, res['batch']))}, {res['params']:,} parameters, "
                  f"{res['gflop_per_step']:.1f} GFLOP per step, measured conv peak {res['conv_peak_gflops']:.0f} "
                  "GFLOP/s", "",
                  "| variant | s/step | speed-up vs plain | GFLOP/s | of conv peak | in convolutions (s) | "
                  "everything else (s) | loss after the same steps |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            lines.append(f"| {r['variant']} | {r['s_per_step']:.3f} | {r['speedup_vs_plain']:.2f}× | "
                         f"{r['gflops']:.1f} | {r['fraction_of_conv_peak']:.2f} | {r['conv_s']:.3f} | "
                         f"{r['other_s']:.3f} | {r['final_loss']:.4f} |")
        for k, why in res.get("failed", {}).items():
            lines.append(f"| {k} | failed: {why} | | | | | | |")
        lines += ["", two_x_budget(res), ""]
    return "\n".join(lines)


def two_x_budget(res: dict) -> str:
    """What 2x the plain loop would need, against where the fastest variant's step goes."""
    budget = next(r for r in res["rows"] if r["variant"] == "plain MONAI loop")["s_per_step"] / 2
    ours = [r for r in res["rows"] if r["variant"] != "plain MONAI loop"]
    if not ours:
        return f"2× the plain loop is ≤ {budget:.3f} s a step."
    best = min(ours, key=lambda r: r["s_per_step"])
    # the counted FLOPs are the convolutions' (FlopCounterMode counts convolutions and matmuls only)
    conv_rate = res["gflop_per_step"] / best["conv_s"]
    return (f"2× the plain loop is ≤ {budget:.3f} s a step. The fastest variant ({best['variant']}, "
            f"{best['speedup_vs_plain']:.2f}×) spends {best['conv_s']:.3f} s in convolutions alone "
            f"({best['conv_s'] / budget:.0%} of that budget; they run at {conv_rate:.0f} GFLOP/s, "
            f"{conv_rate / res['conv_peak_gflops']:.2f} of the measured conv peak), which leaves "
            f"{max(budget - best['conv_s'], 0):.3f} s for everything else; everything else takes "
            f"{best['other_s']:.3f} s now.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for name in args.cases:
        shape = QUICK[name] if args.quick else CASES[name]["batch"]
        res = bench_case(name, CASES[name], tuple(shape), args.rounds, args.steps, args.variants)
        results.append(res)
        print(json.dumps(res, indent=1), flush=True)
    command = "python bench/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = markdown(results, command.strip())
    print(md)
    if args.write_docs:
        write_block("train_step", SECTION, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
