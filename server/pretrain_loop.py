"""Federated self-supervised pretraining: the sites' own unlabelled scans, one masked-reconstruction model.

    flwr run . --stream --run-config "experiment='fl_pretrain'" \\
        --federation-config "num-supernodes=3 client-resources-num-cpus=1"

The same ServerApp and ClientApp as fine-tuning (:mod:`server.app` picks this loop when the composed
config has a ``pretrain`` group); the round structure, run directory, checkpoints, resume
(``fl.resume=true``) and fault screening are :class:`server.loop.FederatedRun`'s. What differs:

1. round 0 (``query.pretrain``): every connected site validates its data and reports how many images it
   pretrains on. The plan is ``plan=PATH`` when given (sent with the query, no fingerprint needed);
   otherwise it is merged from the fingerprints of the sites that have labelled training cases, as
   ``medseg-pretrain`` plans. A site holding only unlabelled scans enrols without a fingerprint.
2. each round: the sampled sites train the reconstruction model (MIM for CNN U-Nets, MAE for TransUNet /
   ViT; ``configs/pretrain/``) on their own images for ``fl.local_epochs`` (``train.pretrain``) and reply
   every weight with ``num-examples`` = their number of training images; the configured Flower strategy
   aggregates (FedAvg: mean weighted by images); the sites then report the global model's reconstruction
   loss on their held-out images (``evaluate.pretrain``). Per round: ``history.json`` (per-site losses),
   ``checkpoints/round_NNN.pt``, ``loss.png``, ``report.md`` and a console line per round.
3. at the end: ``encoder.pt`` in the run directory (:func:`pretrain.export.export_encoder`, the metadata
   of ``medseg-pretrain`` plus the rounds), for ``medseg-train model.pretrained=...`` or a federated
   fine-tuning run. Images never leave the sites, so the server draws no reconstruction: each site draws
   its own at the last round into its state folder (:mod:`client.pretrain_site`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from omegaconf import DictConfig

from medseg_core.checkpoint import write_json, write_text
from medseg_core.data.fingerprint import (
    check_fingerprint,
    load_plan,
    save_json,
)
from medseg_core.federation import (
    CONFIG,
    EVAL_LOSS,
    KEY_CONFIG_HASH,
    KEY_FINGERPRINT,
    KEY_NOTE,
    KEY_PLAN,
    KEY_RUN_NAME,
    KEY_SERVER_ROUND,
    NUM_EXAMPLES,
    PRETRAIN_ACTION,
    SITE,
    TRAIN_LOSS,
    aggregate_by_cases,
    check_arrays,
    dumps,
    loads,
)
from medseg_core.plots import plot_curves
from pretrain.builder import build_for_plan
from pretrain.export import export_encoder, pretrain_settings
from server.loop import (
    FederatedRun,
    FederationStopped,
    Say,
    compatible_fingerprints,
    plan_from_fingerprints,
    reply_metrics,
    say_print,
    wait_for_nodes,
)
from server.messaging import send_messages
from server.replies import INVALID, Fault, screen_replies, site_name
from server.strategies import to_numpy, to_record

#: the exported encoder, in the run directory (what ``model.pretrained=`` takes)
ENCODER_FILE = "encoder.pt"
#: ``kind`` of a pretraining round checkpoint (its weights are the reconstruction model's, not a segmenter's)
ROUND_KIND = "pretrain-round"
#: strategies that need the sites' cooperation (a proximal term, control variates, weights kept locally),
#: which the pretraining handlers do not implement
SITE_SIDE_STRATEGIES = ("fedprox", "scaffold", "fedbn")


def as_pretraining(messages: Iterable[Message], category: str) -> list[Message]:
    """A strategy's messages, addressed to the sites' pretraining handlers (``<category>.pretrain``).

    Flower's strategies sample the sites and build ``train`` / ``evaluate`` messages; the same content
    goes to the ClientApp's ``@app.train("pretrain")`` / ``@app.evaluate("pretrain")`` instead.
    """
    return [
        Message(m.content, dst_node_id=m.metadata.dst_node_id, message_type=f"{category}.{PRETRAIN_ACTION}")
        for m in messages
    ]


def _loss(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return f"{v:.4f}" if math.isfinite(v) else "n/a"


def pretrain_round_line(entry: Mapping[str, Any], num_rounds: int) -> str:
    """One console line: per-site training and validation reconstruction loss, means by images, time."""

    def per_site(phase: str, key: str) -> str:
        rows = sorted(entry.get(phase, {}).items())
        return "  ".join(f"{s} {_loss(m.get(key))}" for s, m in rows) or "none"

    faults = entry.get("faults", [])
    fault_txt = f"  [{len(faults)} site(s) left out: see history.json]" if faults else ""
    return (
        f"round {entry['round']}/{num_rounds}  lr {float(entry.get('lr', math.nan)):.2e}  |  "
        f"train loss {per_site('train', TRAIN_LOSS)} (mean {_loss(entry.get('train_aggregate', {}).get(TRAIN_LOSS))})"
        f"  |  val loss {per_site('evaluate', EVAL_LOSS)} "
        f"(mean {_loss(entry.get('evaluate_aggregate', {}).get(EVAL_LOSS))}, by images)  |  "
        f"{float(entry.get('seconds', {}).get('round', math.nan)):.1f} s{fault_txt}"
    )


class FederatedPretrainRun(FederatedRun):
    """One federated pretraining run (new or resumed) of the composed config over a Grid.

    Args:
        grid: Flower's Grid (``ServerApp`` main), or :class:`server.inprocess.InProcessGrid`.
        cfg: the composed run config with a ``pretrain`` group and ``images`` settings
            (``experiment=fl_pretrain``).
        say: where the per-round lines go (stdout by default).

    Raises:
        ValueError: no ``pretrain`` / ``images`` config, a strategy that needs site-side terms
            (:data:`SITE_SIDE_STRATEGIES`), any privacy option, or ``images.extra_dirs``.
    """

    def __init__(self, grid: Grid, cfg: DictConfig, *, say: Say = say_print) -> None:
        if cfg.get("pretrain") is None or cfg.get("images") is None:
            raise ValueError(
                "federated pretraining needs a 'pretrain' config group and 'images' settings: use "
                "experiment=fl_pretrain (or fl_pretrain_smoke)"
            )
        name = str(cfg.strategy.get("name", ""))
        if name in SITE_SIDE_STRATEGIES or cfg.strategy.get("keep_local"):
            raise ValueError(
                f"strategy={name} needs site-side terms the pretraining handlers do not implement; use a "
                "server-side strategy (fedavg, fedavgm, fedadam, fedyogi, fedadagrad, fedmedian, fedtrimmedavg, krum)"
            )
        priv = cfg.get("privacy") or {}
        if (
            str(priv.get("mode", "none")) != "none"
            or priv.get("client_dp") is not None
            or priv.get("secagg") is not None
        ):
            raise ValueError(
                "federated pretraining runs without privacy options (privacy=none): DP and SecAgg+ are wired "
                "into the fine-tuning rounds only"
            )
        if cfg.images.get("extra_dirs"):
            raise ValueError(
                f"images.extra_dirs={list(cfg.images.extra_dirs)}: folders at a site cannot be named in the shared "
                "config; a site puts extra scans into its imagesTr/ without labels"
            )
        super().__init__(grid, cfg, say=say)
        self.best = {"round": None, "val_loss": math.inf}

    # ---------------------------------------------------------------------------------------------
    def _new_history(self, run_name: str) -> dict[str, Any]:
        history = super()._new_history(run_name)
        history.update(kind="pretrain", method=str(self.cfg.pretrain.method), model=str(self.cfg.model.name))
        for key in ("test", "privacy"):
            history.pop(key, None)
        return history

    def _build_model(self) -> None:
        self.model = build_for_plan(self.cfg, self.plan)
        self.history["method"] = self.model.method  # pretrain.method may be "auto"
        if not self.meta:
            self.meta = {
                "model_config": self.model.target_config,
                "plan": self.plan,
                "labels": dict(self.plan["labels"]),
                "channel_names": self.history.get("channel_names", {}),
            }
        self.meta.update(
            kind=ROUND_KIND,
            pretrain=pretrain_settings(self.model),
            config_hash=self.config_hash,
            resume_identity=self.identity,
        )

    # ---------------------------------------------------------------------------------------------
    def _enroll(self) -> None:
        """Round 0: sites validate their data and count their images; the server plans (or loads ``plan``)."""
        given = self.cfg.get("plan")
        plan = load_plan(str(given)) if given else None  # a bad file stops here, before any site is asked
        nodes = wait_for_nodes(
            self.grid, int(self.fl.min_available_nodes), float(self.fl.connect_timeout_s), self.say
        )
        record: dict[str, Any] = {
            KEY_CONFIG_HASH: self.config_hash,
            KEY_RUN_NAME: self.history["run_name"],
            KEY_SERVER_ROUND: 0,
        }
        if plan is not None:
            record[KEY_PLAN] = dumps(plan)
        msgs = [
            Message(
                RecordDict({CONFIG: ConfigRecord(record)}),
                dst_node_id=n,
                message_type=f"{MessageType.QUERY}.{PRETRAIN_ACTION}",
            )
            for n in nodes
        ]
        sent, replies = send_messages(self.grid, msgs, self.timeout)
        valid, faults = screen_replies("enrollment", 0, sent, replies, needs_arrays=False, min_examples=1)
        fps: dict[str, dict[str, Any]] = {}
        enrolled: dict[str, dict[str, Any]] = {}
        for msg in valid:
            name = str(site_name(msg))
            node = msg.metadata.src_node_id
            if plan is None and KEY_FINGERPRINT in msg.content.config_records:
                try:
                    fp = loads(
                        str(msg.content.config_records[KEY_FINGERPRINT][KEY_FINGERPRINT]),
                        f"fingerprint of {name}",
                    )
                    check_fingerprint(fp, where=name)
                except (KeyError, ValueError) as exc:
                    faults.append(Fault("enrollment", 0, node, name, INVALID, str(exc)))
                    continue
                fps[name] = fp
            note = str(msg.content.config_records[SITE].get(KEY_NOTE, "") or "")
            if note and note not in self.history["notes"]:
                self.history["notes"].append(note)
                self.say(f"note: {note}")
            enrolled[name] = {
                "node_id": node,
                "num_images": int(reply_metrics(msg)[NUM_EXAMPLES]),
                "fingerprint": name in fps,
            }
        fps, incompatible = compatible_fingerprints(fps)
        for name in incompatible:
            faults.append(
                Fault(
                    "enrollment",
                    0,
                    enrolled.pop(name)["node_id"],
                    name,
                    INVALID,
                    f"labels/channels/dimensions differ from the other sites ({sorted(fps)})",
                )
            )
        self._log_faults(faults, self.history["faults"])
        needed = int(self.fl.min_train_nodes)
        if len(enrolled) < needed:
            raise FederationStopped(
                f"round 0: {len(enrolled)} of {len(sent)} site(s) passed validation and have images to pretrain "
                f"on; fl.min_train_nodes={needed}"
            )
        if plan is None:
            if not fps:
                raise FederationStopped(
                    f"round 0: none of the sites {sorted(enrolled)} has a labelled training case to plan the "
                    "preprocessing from (sites without labels send no fingerprint); set plan=PATH, e.g. the "
                    "plan.json of a fine-tuning run"
                )
            plan, merged = plan_from_fingerprints(fps, self.cfg)  # as fine-tuning plans
            channels = merged["channels"]
            save_json(fps, self.files.fingerprints)
            source = f"fingerprints of {sorted(fps)}"
        else:
            channels = plan["normalization"]
            source = f"plan={given}"
        self.plan = plan
        self.node_sites.update({int(e["node_id"]): name for name, e in enrolled.items()})
        self.history["enrollment"] = enrolled
        self.history["sites"] = sorted(enrolled)
        self.history["channel_names"] = {int(ch): sorted(mods)[0] for ch, mods in channels.items()}
        save_json(self.plan, self.files.plan)
        images = ", ".join(f"{s} {e['num_images']}" for s, e in sorted(enrolled.items()))
        self.say(
            f"round 0: {len(enrolled)} site(s) enrolled for pretraining (images: {images}); plan from {source}: "
            f"patch {self.plan['patch_size']}, spacing {self.plan['target_spacing_mm']} mm ({self.files.plan})"
        )

    # ---------------------------------------------------------------------------------------------
    def _round(self, r: int, lr: float) -> None:
        t_round = time.perf_counter()
        entry: dict[str, Any] = {"round": r, "lr": lr, "train": {}, "evaluate": {}, "faults": []}
        assert self.strategy is not None
        wait_for_nodes(
            self.grid, int(self.fl.min_available_nodes), float(self.fl.connect_timeout_s), self.say
        )

        t = time.perf_counter()
        msgs = self.strategy.configure_train(
            r, to_record(self.global_arrays), self._base_config(r, lr), self.grid
        )
        sent, replies = send_messages(self.grid, as_pretraining(msgs, MessageType.TRAIN), self.timeout)
        valid, faults = screen_replies(
            "train", r, sent, replies, needs_arrays=True, min_examples=1, known_sites=self.node_sites
        )
        self._log_faults(faults, entry["faults"])
        self._remember(valid)
        entry["train"] = {site_name(m): reply_metrics(m) for m in valid}
        self._need(valid, sent, "train", entry)
        try:
            agg_arrays, agg_metrics = self.strategy.aggregate_train(r, valid)
        except (
            Exception
        ) as exc:  # Flower raises several types (AggregationError, InconsistentMessageReplies...)
            raise FederationStopped(f"round {r}: aggregation failed ({type(exc).__name__}: {exc})") from exc
        if agg_arrays is None:
            raise FederationStopped(f"round {r}: the strategy aggregated nothing")
        aggregated = to_numpy(agg_arrays)
        problems = check_arrays(
            aggregated,
            {k: v.shape for k, v in self.global_arrays.items()},
            what="aggregated pretraining model",
        )
        if problems:
            raise FederationStopped(f"round {r}: {'; '.join(problems)}")
        self.global_arrays = {
            k: v.astype(self.global_arrays[k].dtype, copy=False) for k, v in aggregated.items()
        }
        entry["train_aggregate"] = dict(agg_metrics or {})
        entry["seconds"] = {"train": time.perf_counter() - t}

        t = time.perf_counter()
        msgs = self.strategy.configure_evaluate(
            r, to_record(self.global_arrays), self._base_config(r), self.grid
        )
        sent, replies = send_messages(self.grid, as_pretraining(msgs, MessageType.EVALUATE), self.timeout)
        valid, faults = screen_replies(
            "evaluate", r, sent, replies, needs_arrays=False, known_sites=self.node_sites
        )
        self._log_faults(faults, entry["faults"])
        self._remember(valid)
        entry["evaluate"] = {site_name(m): reply_metrics(m) for m in valid}
        self._need(valid, sent, "evaluate", entry)
        entry["evaluate_aggregate"] = aggregate_by_cases(entry["evaluate"])  # held-out images weigh each site
        entry["seconds"]["evaluate"] = time.perf_counter() - t

        val = float(entry["evaluate_aggregate"].get(EVAL_LOSS, math.nan))
        if math.isfinite(val) and val < self.best["val_loss"]:
            self.best = {"round": r, "val_loss": val}
        self._close_round(r, entry, t_round, pretrain_round_line)

    # ---------------------------------------------------------------------------------------------
    def _finish(self) -> None:
        """Export the final global model's encoder (as ``medseg-pretrain`` exports its last epoch's)."""
        assert self.model is not None
        state = self.model.state_dict()
        self.model.load_state_dict(
            {k: torch.from_numpy(np.array(v)).to(state[k].dtype) for k, v in self.global_arrays.items()}
        )
        num_images: dict[str, int] = {}
        for entry in self.history["rounds"]:  # each site's latest number of training images
            num_images.update({s: int(m[NUM_EXAMPLES]) for s, m in entry["train"].items()})
        local_epochs = int(self.fl.local_epochs)
        path = export_encoder(
            self.model,
            self.files.root / ENCODER_FILE,
            config_hash=self.config_hash,
            epoch=self.num_rounds * local_epochs,  # passes over each site's images
            rounds=self.num_rounds,
            local_epochs=local_epochs,
            federated=True,
            run_name=self.history["run_name"],
            sites=list(self.history["sites"]),
            num_images=num_images,
            plan=self.plan,
            labels=self.meta["labels"],
            channel_names=self.meta["channel_names"],
        )
        n = len(self.model.encoder_state_dict())
        self.history["encoder"] = {"path": str(path), "round": self.num_rounds, "num_tensors": n}
        self.say(f"encoder ({n} tensors, {self.model.method}) written to {path}")

    def _summary(self) -> str:
        last = self.history["rounds"][-1] if self.history["rounds"] else {}
        return (
            f"done: {len(self.history['rounds'])} round(s) of {self.history['method']} pretraining; final val loss "
            f"{_loss(last.get('evaluate_aggregate', {}).get(EVAL_LOSS))} (by images), train loss "
            f"{_loss(last.get('train_aggregate', {}).get(TRAIN_LOSS))}; encoder {self.history.get('encoder', {}).get('path')}; "
            f"run directory {self.files.root}"
        )

    def _write_history(self) -> None:
        write_json(self.history, self.files.history)
        rounds = self.history.get("rounds", [])
        if rounds:
            sites = sorted({s for e in rounds for s in (*e["train"], *e["evaluate"])})
            curves = {}
            for title, phase, key in (
                ("training", "train", TRAIN_LOSS),
                ("validation (fixed masks)", "evaluate", EVAL_LOSS),
            ):
                per_site = {s: [e[phase].get(s, {}).get(key, math.nan) for e in rounds] for s in sites}
                per_site["mean (by images)"] = [
                    e.get(f"{phase}_aggregate", {}).get(key, math.nan) for e in rounds
                ]
                curves[f"{title} reconstruction loss"] = per_site
            plot_curves(
                curves,
                self.files.loss_plot,
                title=f"federated {self.history['method']} pretraining - {self.history['run_name']}",
                xlabel="round",
            )
        write_text(self._report(), self.files.report)

    def _report(self) -> str:
        h = self.history
        rounds = h.get("rounds", [])
        lines = [
            f"# Federated pretraining run {h.get('run_name', '')}",
            "",
            f"- status: **{h.get('status')}**" + (f" — {h['stop_reason']}" if h.get("stop_reason") else ""),
            f"- {h.get('method')} for `{h.get('model')}`, strategy `{h.get('strategy')}`, {len(rounds)} of "
            f"{h.get('num_rounds')} round(s), config hash `{h.get('config_hash')}`",
            "- sites (pretraining images): "
            + (
                ", ".join(f"{s} ({e['num_images']})" for s, e in sorted(h.get("enrollment", {}).items()))
                or "-"
            ),
            f"- encoder: `{h.get('encoder', {}).get('path', 'not yet exported')}`",
            *(f"- note: {n}" for n in h.get("notes", [])),
            "",
        ]
        if rounds:
            sites = sorted({s for e in rounds for s in e["train"]})
            lines += [
                "## Reconstruction loss per round (training / validation)",
                "",
                "| round | " + " | ".join(sites) + " | validation mean | seconds |",
                "|---" * (len(sites) + 3) + "|",
            ]
            for e in rounds:
                cells = [
                    f"{_loss(e['train'].get(s, {}).get(TRAIN_LOSS))} / {_loss(e['evaluate'].get(s, {}).get(EVAL_LOSS))}"
                    for s in sites
                ]
                lines.append(
                    f"| {e['round']} | "
                    + " | ".join(cells)
                    + f" | {_loss(e.get('evaluate_aggregate', {}).get(EVAL_LOSS))} | {e['seconds']['round']:.1f} |"
                )
            lines += ["", "![loss](loss.png)", ""]
        faults = [f for e in rounds for f in e.get("faults", [])] + h.get("faults", [])
        if faults:
            lines += ["## Sites left out", ""]
            lines += [
                f"- round {f['round']} {f['phase']}: {f.get('site') or f['node_id']} ({f['kind']}): "
                f"{f['detail'][:160]}"
                for f in faults
            ]
            lines.append("")
        return "\n".join(lines)
