"""bench/train_step.py: the parts its figures rest on, at toy size (the bench itself takes minutes).

- where a step's time goes (convolutions vs everything else) is measured, not assumed: a step with no
  convolution has none, a convolution-bound step is mostly convolution, and the two parts add up to the
  timed step;
- our engine's fp32 step follows the plain MONAI loop's trajectory (same loss after the same steps), which
  is what the bench's "loss after the same steps" column compares;
- the 2x-budget line is computed from the table it sits under.
"""

from __future__ import annotations

import pytest
import torch
from bench_helpers import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("train_step")


def _step(model: torch.nn.Module, x: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> float:
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def test_convolution_share_is_measured(bench):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    assert bench.convolution_share(_step(mlp, torch.randn(32, 64))) == 0.0
    conv = torch.nn.Sequential(torch.nn.Conv3d(8, 16, 3, padding=1), torch.nn.Conv3d(16, 8, 3, padding=1))
    share = bench.convolution_share(_step(conv, torch.randn(2, 8, 24, 24, 24)))
    assert 0.5 < share < 1.0


def test_a_case_splits_every_step_and_ours_fp32_follows_the_plain_loop(bench):
    res = bench.bench_case("unet3d", bench.CASES["unet3d"], (1, 1, 32, 32, 32), rounds=1, steps=1,
                           variants=["ours fp32"])
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"plain MONAI loop", "ours fp32"} and not res["failed"]
    for r in rows.values():
        assert r["conv_s"] > 0 and r["other_s"] > 0
        assert r["conv_s"] + r["other_s"] == pytest.approx(r["s_per_step"])
    # MONAI's DiceCELoss and our per-sample Dice+CE give the same trajectory in fp32
    assert rows["ours fp32"]["final_loss"] == pytest.approx(rows["plain MONAI loop"]["final_loss"], rel=1e-5)
    md = bench.markdown([res], "python bench/train_step.py --quick")
    assert "in convolutions (s)" in md and "2× the plain loop is ≤" in md


def test_two_x_budget_reads_the_table(bench):
    res = {"gflop_per_step": 10.0, "conv_peak_gflops": 50.0, "rows": [
        {"variant": "plain MONAI loop", "s_per_step": 1.0, "speedup_vs_plain": 1.0, "conv_s": 0.6, "other_s": 0.4},
        {"variant": "ours a", "s_per_step": 0.8, "speedup_vs_plain": 1.25, "conv_s": 0.45, "other_s": 0.35},
        {"variant": "ours b", "s_per_step": 0.7, "speedup_vs_plain": 1 / 0.7, "conv_s": 0.4, "other_s": 0.3},
    ]}
    line = bench.two_x_budget(res)
    assert "≤ 0.500 s" in line and "(ours b, 1.43×)" in line
    assert "0.400 s in convolutions alone (80% of that budget; they run at 25 GFLOP/s, 0.50 of the" in line
    assert "leaves 0.100 s" in line and "takes 0.300 s now" in line
