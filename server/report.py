"""What people look at: a line per round on the console, curves per site, and ``report.md``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from medseg_core.checkpoint import write_text
from medseg_core.federation import DICE, HD95, NUM_EXAMPLES, ORIGINAL_GRID, TRAIN_LOSS
from medseg_core.plots import plot_curves
from medseg_core.privacy_report import (
    DP_DELTA,
    DP_EPSILON,
    DP_EPSILON_BUDGET,
    DP_EPSILON_PRV,
    DP_EPSILON_RDP,
    DP_EPSILON_RDP_CLASSIC,
    DP_MAX_GRAD_NORM,
    DP_NOISE_MULTIPLIER,
    DP_SAMPLE_RATE,
    DP_STEPS_TOTAL,
    latest_privacy,
)

#: the final test's Dice and HD95 on each scan's own grid (the site's model applied as medseg-predict does)
ORIGINAL_DICE, ORIGINAL_HD95 = f"{ORIGINAL_GRID}/{DICE}", f"{ORIGINAL_GRID}/{HD95}"
#: ``privacy.*`` settings of sample-level DP recorded in ``history.json`` (what the site was asked to do)
SAMPLE_LEVEL_KEYS = ("noise_multiplier", "epsilon", "delta", "max_grad_norm", "accountant", "ledger_scope")


def privacy_settings(cfg: DictConfig) -> dict[str, Any]:
    """The run's privacy configuration for ``history.json``: mode, sample-level, client-level, SecAgg+.

    Filled in during the run: ``declined`` (sites that refused a round for their budget) and, with
    client-level DP, ``client_level_rounds`` (clipping norm, noise and epsilon per round).
    """
    priv = cfg.get("privacy") or {}
    out: dict[str, Any] = {"mode": str(priv.get("mode", "none")), "declined": []}
    if out["mode"] == "dp":
        out["sample_level"] = {k: priv.get(k) for k in SAMPLE_LEVEL_KEYS}
    for key, name in (("client_dp", "client_level"), ("secagg", "secagg")):
        node = priv.get(key)
        if node is not None:
            out[name] = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return out


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
    eps = "  ".join(
        f"{s} {_fmt(m[DP_EPSILON], 2)}" for s, m in sorted(entry.get("train", {}).items()) if DP_EPSILON in m
    )
    eps_txt = f"  |  epsilon {eps}" if eps else ""
    return (
        f"round {entry['round']}/{num_rounds}  lr {float(entry.get('lr', math.nan)):.2e}  "
        f"train loss {_fmt(entry.get('train_aggregate', {}).get(TRAIN_LOSS))}  |  val Dice {dice}  |  "
        f"mean {_fmt(agg.get(DICE))} (by cases), HD95 {_fmt(agg.get(HD95), 1)} mm{eps_txt}  |  "
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
        agg = test.get("aggregate", {})
        original = any(ORIGINAL_DICE in m for m in test["sites"].values())

        def row(name: str, m: Mapping[str, Any]) -> list[str]:
            cells = [name, str(int(m.get(NUM_EXAMPLES, 0))), _fmt(m.get(DICE)), _fmt(m.get(HD95), 1)]
            return cells + ([_fmt(m.get(ORIGINAL_DICE)), _fmt(m.get(ORIGINAL_HD95), 1)] if original else [])

        rows = [row(s, m) for s, m in sorted(test["sites"].items())] + [row("**all (by cases)**", agg)]
        header = ["site", "cases", "Dice", "HD95 (mm)"] + (["Dice, scan grid", "HD95 (mm), scan grid"] if original else [])
        lines += [
            "## Best model on each site's test split",
            "",
            _table(rows, header),
            "",
            *(["Dice and HD95 are scored on the plan's grid (labels resampled to the plan's spacing, as in "
               "validation) and on each scan's own grid (the site's model applied as `medseg-predict` applies it).",
               ""]
              if original else []),
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
    lines += _privacy_section(history)
    timings = history.get("timings", {})
    if timings:
        lines += ["## Timings", "", *(f"- {k}: {_fmt(v, 1)} s" for k, v in timings.items()), ""]
    lines += [
        "Files: `resolved_config.yaml`, `plan.json`, `fingerprints.json`, `history.json`, "
        "`checkpoints/round_NNN.pt`, `best.pt`, `test_metrics.json`.",
        "",
    ]
    return write_text("\n".join(lines), path)


def _privacy_section(history: Mapping[str, Any]) -> list[str]:
    """``## Privacy``: what was protected, how much each site spent, who declined, what is not covered."""
    priv = history.get("privacy") or {}
    if priv.get("mode", "none") == "none" and not priv.get("client_level") and not priv.get("secagg"):
        return []
    lines = ["## Privacy", ""]
    sample = priv.get("sample_level")
    if sample:
        lines += [
            "Sample-level (patient-level) DP-SGD at every site: Opacus with Poisson sampling, one crop per "
            "patient per step, each patient's gradient clipped to C and Gaussian noise added. Each site keeps a "
            f"cumulative ledger in its own state folder (scope `{sample.get('ledger_scope')}`); epsilon below "
            "is cumulative over that ledger. Budget "
            f"{'none (report only)' if sample.get('epsilon') is None else sample.get('epsilon')}, enforced "
            f"with accountant `{sample.get('accountant')}`.",
            "",
        ]
        latest = latest_privacy(history)
        if latest:
            rows = [
                [
                    s,
                    str(m.get("round", "-")),
                    _fmt(m.get(DP_NOISE_MULTIPLIER), 3),
                    _fmt(m.get(DP_SAMPLE_RATE), 3),
                    _fmt(m.get(DP_MAX_GRAD_NORM), 2),
                    f"{float(m.get(DP_DELTA, math.nan)):.2g}",
                    str(int(m.get(DP_STEPS_TOTAL, 0))),
                    _fmt(m.get(DP_EPSILON), 2),
                    _fmt(m.get(DP_EPSILON_RDP), 2),
                    _fmt(m.get(DP_EPSILON_RDP_CLASSIC), 2),
                    _fmt(m.get(DP_EPSILON_PRV), 2),
                    _fmt(m.get(DP_EPSILON_BUDGET), 2),
                ]
                for s, m in sorted(latest.items())
            ]
            header = ["site", "last round", "sigma", "q", "C", "delta", "steps (ledger)", "epsilon (enforced)",
                      "RDP (Opacus conv.)", "RDP (classic conv.)", "PRV", "budget"]
            lines += [_table(rows, header), "", "![epsilon per site](epsilon.png)", ""]
        lines += [
            "Not covered by epsilon: validation and test metrics (computed on held-out patients and released "
            "without noise) and the run's timings. The training loss is not released under DP.",
            "",
        ]
    declined = priv.get("declined") or []
    if declined:
        lines += ["Sites that declined a round because their privacy budget is spent:", ""]
        lines += [f"- round {d['round']}: {d.get('site') or d.get('node_id')}: {d['detail'][:300]}" for d in declined]
        lines += [""]
    client = priv.get("client_level")
    if client:
        lines += [
            f"Client-level (hospital-level) DP: {client.get('clipping')} clipping on the {client.get('side')} side, "
            f"noise multiplier {client.get('noise_multiplier')}; figures per round in `history.json` "
            "(`privacy.client_level_rounds`).",
            "",
        ]
        rounds = priv.get("client_level_rounds") or []
        if rounds:
            last = rounds[-1]
            eps = last.get("epsilon")
            lines += [
                f"- after round {last['round']}: clipping norm {_fmt(last.get('clipping_norm'), 3)}, noise std "
                f"{_fmt(last.get('noise_stddev'), 4)}, client-level epsilon "
                f"{_fmt(eps, 2) if eps is not None else 'not computed (' + str(last.get('epsilon_note')) + ')'}",
                "",
            ]
    if priv.get("secagg"):
        lines += ["Secure aggregation (SecAgg+): the server only received the masked sum of the sites' updates.", ""]
        lines += [  # per round: privacy.secagg_rounds in history.json
            f"- round {s['round']}: {s['in_sum']} of {s['sampled']} site(s) in the secure sum"
            + (f"; dropped: {', '.join(str(d.get('site') or d.get('node_id')) for d in s['dropped'])}" if s["dropped"] else "")
            + (f"; no sum: {s['halted']}" if s.get("halted") else "")
            for s in priv.get("secagg_rounds") or []
        ] + ([""] if priv.get("secagg_rounds") else [])
    return lines
