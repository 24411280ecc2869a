"""What people look at: a line per round on the console, curves per site, and ``report.md``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medseg_core.checkpoint import write_text
from medseg_core.federation import DICE, HD95, NUM_EXAMPLES, TRAIN_LOSS
from medseg_core.plots import plot_curves


def _fmt(value: Any, digits: int = 3) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return f"{v:.{digits}f}" if math.isfinite(v) else "n/a"


def round_line(entry: Mapping[str, Any], num_rounds: int) -> str:
    """One console line: per-site validation Dice, the case-weighted mean, loss, faults and time."""
    sites = entry.get("evaluate", {})
    dice = "  ".join(f"{s} {_fmt(m.get(DICE))}" for s, m in sorted(sites.items())) or "no evaluation"
    agg = entry.get("evaluate_aggregate", {})
    faults = entry.get("faults", [])
    fault_txt = f"  [{len(faults)} site(s) left out: see history.json]" if faults else ""
    return (
        f"round {entry['round']}/{num_rounds}  lr {float(entry.get('lr', math.nan)):.2e}  "
        f"train loss {_fmt(entry.get('train_aggregate', {}).get(TRAIN_LOSS))}  |  val Dice {dice}  |  "
        f"mean {_fmt(agg.get(DICE))} (by cases), HD95 {_fmt(agg.get(HD95), 1)} mm  |  "
        f"{_fmt(entry.get('seconds', {}).get('round'), 1)} s{fault_txt}"
    )


def plot_history(history: Mapping[str, Any], dice_png: Path, loss_png: Path) -> None:
    """``dice.png``: validation Dice per site and case-weighted mean vs round; ``loss.png``: training loss."""
    rounds = history.get("rounds", [])
    if not rounds:
        return
    sites = sorted({s for e in rounds for s in (*e.get("evaluate", {}), *e.get("train", {}))})
    dice = {s: [e.get("evaluate", {}).get(s, {}).get(DICE, math.nan) for e in rounds] for s in sites}
    dice["mean (by cases)"] = [e.get("evaluate_aggregate", {}).get(DICE, math.nan) for e in rounds]
    loss = {s: [e.get("train", {}).get(s, {}).get(TRAIN_LOSS, math.nan) for e in rounds] for s in sites}
    loss["mean (by cases)"] = [e.get("train_aggregate", {}).get(TRAIN_LOSS, math.nan) for e in rounds]
    title = f"{history.get('strategy', '')} - {history.get('run_name', '')}"
    plot_curves({"validation Dice (foreground mean)": dice}, dice_png, title=title, xlabel="round")
    plot_curves({"training loss": loss}, loss_png, title=title, xlabel="round")


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(path: Path, history: Mapping[str, Any]) -> Path:
    """A short ``report.md``: setup, best round, final test per site, faults, timings."""
    rounds = history.get("rounds", [])
    best = history.get("best", {})
    test = history.get("test", {})
    lines = [
        f"# Federated run {history.get('run_name', '')}",
        "",
        f"- status: **{history.get('status', 'unknown')}**"
        + (f" — {history['stop_reason']}" if history.get("stop_reason") else ""),
        f"- strategy: `{history.get('strategy')}`, {len(rounds)} of {history.get('num_rounds')} round(s) completed, "
        f"config hash `{history.get('config_hash')}`",
        f"- sites: {', '.join(history.get('sites', [])) or '-'}",
        f"- best round (case-weighted validation Dice): {best.get('round', '-')} "
        f"(Dice {_fmt(best.get('dice'))})",
        *(f"- note: {n}" for n in history.get("notes", [])),
        "",
    ]
    if test.get("sites"):
        rows = [
            [s, str(int(m.get(NUM_EXAMPLES, 0))), _fmt(m.get(DICE)), _fmt(m.get(HD95), 1)]
            for s, m in sorted(test["sites"].items())
        ]
        agg = test.get("aggregate", {})
        rows.append(
            [
                "**all (by cases)**",
                str(int(agg.get(NUM_EXAMPLES, 0))),
                _fmt(agg.get(DICE)),
                _fmt(agg.get(HD95), 1),
            ]
        )
        lines += [
            "## Best model on each site's test split",
            "",
            _table(rows, ["site", "cases", "Dice", "HD95 (mm)"]),
            "",
        ]
    if rounds:
        sites = sorted({s for e in rounds for s in e.get("evaluate", {})})
        rows = [
            [
                str(e["round"]),
                *(_fmt(e.get("evaluate", {}).get(s, {}).get(DICE)) for s in sites),
                _fmt(e.get("evaluate_aggregate", {}).get(DICE)),
                _fmt(e.get("train_aggregate", {}).get(TRAIN_LOSS)),
                _fmt(e.get("seconds", {}).get("round"), 1),
            ]
            for e in rounds
        ]
        lines += [
            "## Validation Dice per round",
            "",
            _table(rows, ["round", *sites, "mean", "train loss", "seconds"]),
            "",
            "![Dice per site](dice.png)  ![loss](loss.png)",
            "",
        ]
    faults = [f for e in rounds for f in e.get("faults", [])] + history.get("faults", [])
    if faults:
        rows = [
            [str(f["round"]), f["phase"], str(f.get("site") or f["node_id"]), f["kind"], f["detail"][:160]]
            for f in faults
        ]
        lines += [
            "## Sites left out",
            "",
            _table(rows, ["round", "phase", "site / node", "kind", "detail"]),
            "",
        ]
    timings = history.get("timings", {})
    if timings:
        lines += ["## Timings", "", *(f"- {k}: {_fmt(v, 1)} s" for k, v in timings.items()), ""]
    lines += [
        "Files: `resolved_config.yaml`, `plan.json`, `fingerprints.json`, `history.json`, "
        "`checkpoints/round_NNN.pt`, `best.pt`, `test_metrics.json`.",
        "",
    ]
    return write_text("\n".join(lines), path)
