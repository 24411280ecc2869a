"""bench/federation_overhead.py: its process-tree sampler, its summary table and its run settings.

The bench itself (real Flower simulations) takes minutes; these check the parts its figures rest on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from bench_helpers import load_bench
from omegaconf import OmegaConf

bench = load_bench("federation_overhead")

# a child that starts a grandchild (64 MB touched, ~0.3 s of CPU) in its own session and exits: the
# grandchild is re-parented, as the SuperLink that `flwr run` leaves behind is
_PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True)
    print(grandchild.pid, flush=True)
    time.sleep(1.0)
    """
)
_GRANDCHILD = textwrap.dedent(
    """
    import pathlib, sys, time
    block = bytearray(64 * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    t = time.process_time()
    while time.process_time() - t < 0.3:
        pass
    pathlib.Path(sys.argv[1]).write_text("ready")
    time.sleep(60)
    """
)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_process_tree_keeps_an_orphaned_descendant_counts_it_and_stops_it(tmp_path):
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _PARENT, _GRANDCHILD, str(ready)], stdout=subprocess.PIPE,
                            text=True)
    tree = bench.ProcessTree(proc.pid, interval_s=0.05)
    tree.start()
    grandchild = int(proc.stdout.readline())
    try:
        proc.wait(timeout=30)  # the child has exited; the grandchild lives on under another parent
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert grandchild in tree.tracked
        assert tree.peak_rss_kb / 1024 >= 60 and tree.peak_pss_kb / 1024 >= 60
        assert tree.cpu_samples[-1][1] >= 0.25  # its busy loop, and the interpreters' start-up
        assert tree.cpu_s_at(tree.cpu_samples[-1][0]) == pytest.approx(tree.cpu_samples[-1][1])
        assert tree.terminate_all(timeout_s=5) < 5
        tree.stop()
        assert grandchild not in bench._proc_table() and not tree.tracked
    finally:
        try:
            os.kill(grandchild, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _record(arm, sites, tag, round_s, cpu_s, fixed_s, pss_mb):
    return {"arm": arm, "sites": sites, "tag": tag, "round_s": round_s, "round_cpu_s": cpu_s, "wall_s": 0.0,
            "fixed_s": fixed_s, "start_s": fixed_s / 2, "setup_s": fixed_s / 4, "stop_s": fixed_s / 4,
            "teardown_s": 1.0, "peak_rss_mb": pss_mb * 1.3, "peak_pss_mb": pss_mb,
            "peak_breakdown": {"SuperLink": {"mb": 100.0, "processes": 1},
                               "Ray workers (ClientApp actors)": {"mb": 900.0, "processes": 2}}}


def test_summary_pairs_runs_within_a_repeat_and_the_block_has_a_row_per_federation():
    records = []
    for tag, load in (("r0", 1.0), ("r1", 2.0), ("r2", 1.5)):  # a loaded repeat slows every arm alike
        for sites in (3, 10):
            records += [
                _record("flower", sites, tag, [1.1 * load * sites, 1.1 * load * sites], 1.2 * sites, 20.0, 2000.0),
                _record("inprocess", sites, tag, [load * sites, load * sites], sites, 5.0, 800.0),
                _record("plain", sites, tag, [0.5 * load * sites] * 2, sites, 4.0, 700.0),
            ]
    rows = bench.summarize(records)
    assert [r["sites"] for r in rows] == [3, 10]
    for row in rows:
        assert row["repeats"] == 3
        assert row["ratio_inprocess"] == pytest.approx(1.1) and row["ratio_plain"] == pytest.approx(2.2)
        assert row["cpu_ratio_inprocess"] == pytest.approx(1.2)
        assert row["flower"]["fixed_s"] == 20.0 and row["flower"]["peak_pss_mb"] == 2000.0
    info = {"args": {"cases": 6, "shape": 48, "rounds": 2}, "val_fraction": 0.25, "params": 2045689, "machine": "x86_64", "cpus": 2,
            "torch": "2", "flwr": "1.41", "date": "2026-01-01", "minutes": 3.0}
    md = bench.markdown(rows, info, "python bench/federation_overhead.py", [1.0, 3.0])
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[1].startswith("| 3 | 4.95 / 4.50 / 2.25 | **1.10×** | 2.20× | 3.6 / 3.0 (1.20×) | 20.0 = 10.0 + 5.0 + 5.0 / 5.0 |")
    assert table[2].startswith("| 10 |") and "| 2000 (2600) / 800 (1040) / 700 (910) |" in table[2]
    assert "6 cases of 48³ (4 training + 2 validation each)" in md
    assert "2,045,689 parameters" in md and "Ray workers (ClientApp actors) 900 (2 processes)" in md


def test_every_run_composes_the_same_valid_config_with_a_2m_parameter_model(tmp_path):
    from medseg_core.config import load_config
    from medseg_core.models import build_model
    from medseg_core.workflow import model_config

    args = bench.parse_args(["--quick"])
    configs = [load_config(bench.run_config(10, args, tmp_path / "cache", tmp_path / arm)) for arm in ("a", "b")]
    a, b = (OmegaConf.to_container(c) for c in configs)
    assert a["paths"].pop("run_dir") != b["paths"].pop("run_dir")
    assert a == b
    a = configs[0]
    assert a.fl.num_rounds == 2 and a.fl.local_epochs == 1 and not a.fl.final_test
    assert a.fl.min_train_nodes == a.fl.min_evaluate_nodes == a.data.synthetic.n_sites == 10
    kwargs = model_config(a.model, in_channels=1, out_channels=3)
    params = sum(p.numel() for p in build_model(kwargs.pop("name"), **kwargs).parameters())
    assert 1.9e6 <= params <= 2.1e6


@pytest.mark.parametrize("argv", [["--sites", "1"], ["--rounds", "0"], ["--cases", "3"]])
def test_bad_settings_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert argv[0] in capsys.readouterr().err
