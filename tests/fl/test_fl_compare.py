"""`medseg-compare`: federated runs next to pooled and local-only baselines trained on the same settings."""

from __future__ import annotations

import json

import pytest
from fl_helpers import run_config, run_inprocess

from medseg_core.federation import DICE, ORIGINAL_GRID
from server.compare import LOCAL, POOLED, compare, main, markdown_table, summarise


def test_summary_is_mean_and_sd_over_seeds_per_site():
    rows = [
        {"method": "fedavg", "seed": 0, "dice": {"a": 0.5, "b": 0.7}},
        {"method": "fedavg", "seed": 1, "dice": {"a": 0.7, "b": 0.9}},
    ]
    s = summarise(rows)["fedavg"]
    assert s["a"]["mean"] == pytest.approx(0.6) and s["a"]["sd"] == pytest.approx(0.1414, abs=1e-3)
    assert s["mean"]["mean"] == pytest.approx(0.7) and s["mean"]["n"] == 2
    assert "0.600 ± 0.141" in markdown_table(summarise(rows))


def test_compare_trains_pooled_and_local_baselines_next_to_the_federated_run(tmp_path):
    fed = tmp_path / "fedavg"
    run_inprocess(run_config(tmp_path / "cache", fed, "fl.num_rounds=1 fl.local_epochs=1"))
    result = compare([fed], tmp_path / "cmp", log=lambda s: None)
    methods = [r["method"] for r in result["rows"]]
    assert methods == ["fedavg", POOLED, LOCAL]
    for row in result["rows"]:
        assert set(row["dice"]) == {"site_00", "site_01"}
        assert all(0.0 <= v <= 1.0 for v in row["dice"].values())
    for name in ("comparison.json", "comparison.md", "comparison.png"):
        assert (tmp_path / "cmp" / name).is_file()
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["sites"] == ["site_00", "site_01"]
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| fedavg |" in table and f"| {POOLED} |" in table and f"| {LOCAL} |" in table
    # each baseline trained as many epochs as the federated run had rounds x local epochs
    history = json.loads((tmp_path / "cmp" / f"{POOLED}-seed0" / "history.json").read_text())
    assert len(history["epochs"]) == 1
    # again without local-only baselines: the finished pooled baseline is reused, not retrained
    stamp = (tmp_path / "cmp" / f"{POOLED}-seed0" / "best.pt").stat().st_mtime_ns
    again = compare([fed], tmp_path / "cmp", local=False, log=lambda s: None)
    assert [r["method"] for r in again["rows"]] == ["fedavg", POOLED]
    assert again["rows"][1]["dice"] == result["rows"][1]["dice"]
    assert (tmp_path / "cmp" / f"{POOLED}-seed0" / "best.pt").stat().st_mtime_ns == stamp
    assert main(["--federated", str(tmp_path / "missing")]) == 1

    # --grid scan: the figures each run scored on the scans' own grids, not the plan-grid ones
    fed_sites = json.loads((fed / "history.json").read_text())["test"]["sites"]
    pooled_history = tmp_path / "cmp" / f"{POOLED}-seed0" / "history.json"
    pooled_summary = json.loads(pooled_history.read_text())["summary"]
    scan = compare([fed], tmp_path / "cmp", local=False, grid="scan", log=lambda s: None)
    assert scan["grid"] == "scan"
    assert scan["rows"][0]["dice"] == {s: m[f"{ORIGINAL_GRID}/{DICE}"] for s, m in fed_sites.items()}
    assert scan["rows"][1]["dice"] == pooled_summary["test_per_site_original_grid"]
    assert scan["rows"][0]["dice"] != result["rows"][0]["dice"]
    assert "on each scan's own grid" in (tmp_path / "cmp" / "comparison.md").read_text()
    # a baseline finished before scan-grid scoring existed is scored now from its best.pt, not retrained
    history = json.loads(pooled_history.read_text())
    for key in ("test_per_site_original_grid", "test_mean_dice_original_grid"):
        del history["summary"][key]
    pooled_history.write_text(json.dumps(history))
    backfilled = compare([fed], tmp_path / "cmp", local=False, grid="scan", log=lambda s: None)
    for site, value in pooled_summary["test_per_site_original_grid"].items():
        assert backfilled["rows"][1]["dice"][site] == pytest.approx(value, abs=1e-6)
    assert json.loads(pooled_history.read_text())["summary"]["test_per_site_original_grid"]
    assert (tmp_path / "cmp" / f"{POOLED}-seed0" / "best.pt").stat().st_mtime_ns == stamp
    # a federated run without scan-grid scores is refused with the reason, not compared on the wrong grid
    fed_history = json.loads((fed / "history.json").read_text())
    for metrics in fed_history["test"]["sites"].values():
        metrics.pop(f"{ORIGINAL_GRID}/{DICE}")
    (fed / "history.json").write_text(json.dumps(fed_history))
    with pytest.raises(ValueError, match="no test Dice on the scans' own grids"):
        compare([fed], tmp_path / "cmp", local=False, grid="scan", log=lambda s: None)
    assert main(["--federated", str(fed), "--out", str(tmp_path / "cmp"), "--no-baselines", "--grid", "scan"]) == 1


def test_baselines_match_the_federated_budget_and_model_selection(tmp_path):
    """Same epochs as rounds x local epochs, and validation once per round's worth of epochs (the federated
    run picks its best model among rounds, a baseline among as many checkpoints)."""
    from medseg_core.config import load_config
    from server.compare import baseline_config

    fed = load_config(run_config(tmp_path / "cache", tmp_path / "fed", "fl.num_rounds=4 fl.local_epochs=3"))
    cfg = baseline_config(fed, seed=1, epochs=12, run_dir=tmp_path / "b", sites=["site_00"])
    assert cfg.train.epochs == 12 and cfg.train.val_every == 3 and cfg.seed == 1
    assert list(cfg.data.sites) == ["site_00"] and cfg.model == fed.model
    assert cfg.eval.postprocess is False  # scored like the federated run: raw predictions
