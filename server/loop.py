"""A federated run, round by round, over any Flower ``Grid`` (simulation, deployment or in-process).

Flower's ``Strategy.start`` runs rounds but cannot checkpoint, resume, screen replies or stop with a
reason, so this loop drives the strategy's own ``configure_*`` / ``aggregate_*`` methods and adds:

1. round 0: every connected site validates its data and sends its fingerprint (aggregates only); the
   server merges them into ``plan.json`` and sends the plan with every later message;
2. each round: train on the sampled sites (under ``privacy.secagg`` through Flower's SecAgg+: the strategy
   aggregates only the sum, :mod:`server.secure_agg`), screen the replies (:mod:`server.replies`), aggregate,
   evaluate on the sites' validation cases, keep the best model (case-weighted Dice), checkpoint
   everything (global model, strategy state, RNG, history), plot and print a line;
3. at the end: the best global model on every site's test split, ``report.md``.

The run stops with :class:`FederationStopped` (after writing what it has) when fewer sites than
``fl.min_train_nodes`` / ``fl.min_evaluate_nodes`` give a usable reply.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig, OmegaConf

from medseg_core.checkpoint import load_checkpoint, write_json, write_text
from medseg_core.data.fingerprint import (
    channel_order_notes,
    check_fingerprint,
    fingerprint_problems,
    make_plan,
    merge_fingerprints,
    save_json,
)
from medseg_core.engine import build_optimizer, build_scheduler
from medseg_core.federation import (
    ARRAYS,
    CONFIG,
    DICE,
    FINGERPRINT_ACTION,
    KEY_CONFIG_HASH,
    KEY_FINGERPRINT,
    KEY_LOCAL_EPOCHS,
    KEY_LR,
    KEY_NOTE,
    KEY_PLAN,
    KEY_RUN_NAME,
    KEY_SERVER_ROUND,
    KEY_SPLIT,
    NUM_EXAMPLES,
    SITE,
    SITE_MODEL,
    SPLIT_TEST,
    SPLIT_VAL,
    aggregate_by_cases,
    check_arrays,
    dumps,
    loads,
    protocol_hash,
    resume_identity,
)
from medseg_core.models.pretrained import load_pretrained_from_config
from medseg_core.privacy_report import DECLINED, plot_epsilon
from medseg_core.runtime import rng_state, seed_everything, set_rng_state
from medseg_core.workflow import build_configured_model, model_config, plan_options
from server.messaging import send_messages
from server.replies import INVALID, Fault, screen_replies, site_name
from server.report import ORIGINAL_DICE, plot_history, privacy_settings, round_line, write_report
from server.run_files import (
    RunFiles,
    load_round_checkpoint,
    resolve_run_dir,
    run_name_for,
    save_round_checkpoint,
)
from server.secure_agg import SecureAggregation
from server.strategies import (
    FedBN,
    build_strategy,
    client_dp_figures,
    load_strategy_state,
    strategy_state,
    to_numpy,
    to_record,
)

Say = Callable[[str], None]


class FederationStopped(RuntimeError):
    """The run cannot go on (too few usable sites, or nothing to resume); the run directory keeps
    everything up to the last completed round."""


def _first_line(text: str, limit: int = 300) -> str:
    """The first line of a (possibly multi-line traceback) reason, shortened for a one-line message."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def say_print(text: str) -> None:
    """Default console output (Flower streams the ServerApp's stdout with ``flwr run --stream``)."""
    print(text, flush=True)


def round_learning_rates(cfg: DictConfig, num_rounds: int) -> list[float]:
    """The learning rate of each round: ``optim.lr`` stepped once per round by the ``sched`` config.

    Computed on the server with a throw-away optimiser, so every site uses the same value and a resumed
    run uses what the uninterrupted one would.
    """
    dummy = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = build_optimizer(cfg.optim, dummy)
    scheduler = build_scheduler(cfg.get("sched"), optimizer)
    rates = []
    for _ in range(num_rounds):
        rates.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return rates


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float, say: Say = say_print) -> list[int]:
    """Wait until at least ``minimum`` SuperNodes are connected.

    Raises:
        FederationStopped: fewer connected after ``timeout_s`` seconds.
    """
    start = last_note = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        now = time.monotonic()
        if now - start > timeout_s:
            raise FederationStopped(
                f"only {len(nodes)} site(s) connected after {timeout_s:.0f} s; "
                f"fl.min_available_nodes={minimum}"
            )
        if now - last_note > 10:
            say(f"waiting for sites: {len(nodes)} connected, {minimum} needed")
            last_note = now
        time.sleep(0.5)


def reply_metrics(msg: Message) -> dict[str, float]:
    """The numbers of a reply's (only) MetricRecord."""
    return {
        k: v
        for k, v in next(iter(msg.content.metric_records.values())).items()
        if isinstance(v, (int, float))
    }


_send, _metrics = send_messages, reply_metrics  # the short names used in this module


class FederatedRun:
    """One federated run (new or resumed) of the composed config over a Grid.

    Args:
        grid: Flower's Grid (``ServerApp`` main), or :class:`server.inprocess.InProcessGrid`.
        cfg: the composed run config (``load_config(context.run_config)``).
        say: where the per-round lines go (stdout by default).
    """

    def __init__(self, grid: Grid, cfg: DictConfig, *, say: Say = say_print) -> None:
        self.grid, self.cfg, self.say = grid, cfg, say
        self.fl = cfg.fl
        self.num_rounds = int(self.fl.num_rounds)
        if self.num_rounds < 1:
            raise ValueError(f"fl.num_rounds must be >= 1, got {self.num_rounds}")
        # privacy.secagg: the train phase of every round runs Flower's SecAgg+ (server.secure_agg); refuses here,
        # before anything runs, strategies that need individual updates (robust aggregators, SCAFFOLD) and
        # server-side clipping
        self.secure_agg = SecureAggregation.from_config(cfg)
        self.timeout = float(self.fl.round_timeout_s)
        self.resume = bool(self.fl.get("resume", False))
        self.files = RunFiles(resolve_run_dir(cfg, resume=self.resume))
        self.config_hash = protocol_hash(cfg)
        self.identity = resume_identity(cfg)
        self.node_sites: dict[int, str] = {}
        self.history: dict[str, Any] = {}
        self.best: dict[str, Any] = {"round": None, "dice": -math.inf}
        self.global_arrays: dict[str, np.ndarray] = {}
        self.plan: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}
        self.strategy: Strategy | None = None
        self.model: torch.nn.Module | None = None
        self.start_round = 1

    # ---------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run (or resume) to the end; returns the history (also in ``history.json``).

        Raises:
            FederationStopped: too few usable sites; ``history.json`` and ``report.md`` say why.
        """
        t0 = time.perf_counter()
        seed_everything(int(self.cfg.seed))
        try:
            if self.resume:
                self._resume()
            else:
                self._start()
            lrs = round_learning_rates(self.cfg, self.num_rounds)
            self.history["timings"]["setup_s"] = time.perf_counter() - t0
            for r in range(self.start_round, self.num_rounds + 1):
                self._round(r, lrs[r - 1])
            self._finish()
        except FederationStopped as exc:
            if self.history:  # never touch the files of a run this process did not start or load
                self.history["status"] = "stopped"
                self.history["stop_reason"] = str(exc)
                self._write_history()
            self.say(f"federation stopped: {exc}\nrun directory: {self.files.root}")
            raise
        self.history["status"] = "completed"
        self.history["timings"]["total_s"] = (
            self.history["timings"].get("total_s", 0.0) + time.perf_counter() - t0
        )
        self._write_history()
        self.say(self._summary())
        return self.history

    def _finish(self) -> None:
        """After the last round: the final test (``fl.final_test``)."""
        if bool(self.fl.get("final_test", True)):
            self._final_test()

    def _summary(self) -> str:
        """The last console line of a completed run."""
        test = self.history.get("test", {}).get("aggregate", {})
        return (
            f"done: best round {self.best['round']} (val Dice {self.best['dice']:.4f}); "
            f"test Dice {test.get(DICE, math.nan):.4f} over {int(test.get(NUM_EXAMPLES, 0))} case(s); "
            f"run directory {self.files.root}"
        )

    # ---------------------------------------------------------------------------------------------
    def _base_config(self, round_idx: int, lr: float | None = None, split: str | None = None) -> ConfigRecord:
        record: dict[str, Any] = {
            KEY_CONFIG_HASH: self.config_hash,
            KEY_RUN_NAME: self.history["run_name"],
            KEY_PLAN: dumps(self.plan),
            KEY_LOCAL_EPOCHS: int(self.fl.local_epochs),
            KEY_SERVER_ROUND: int(round_idx),
        }
        if lr is not None:
            record[KEY_LR] = float(lr)
        if split is not None:
            record[KEY_SPLIT] = split
        return ConfigRecord(record)

    def _new_history(self, run_name: str) -> dict[str, Any]:
        return {
            "run_name": run_name,
            "run_dir": str(self.files.root),
            "config_hash": self.config_hash,
            "strategy": str(self.cfg.strategy.get("name", "")),
            "num_rounds": self.num_rounds,
            "status": "running",
            "sites": [],
            "enrollment": {},
            "notes": [],
            "faults": [],
            "rounds": [],
            "best": {},
            "test": {},
            "timings": {},
            "resumed_at_round": [],
            "privacy": privacy_settings(self.cfg),
        }

    def _start(self) -> None:
        self.files.root.mkdir(parents=True, exist_ok=True)
        if self.files.latest_round_checkpoint() is not None:
            raise FederationStopped(
                f"{self.files.root} already holds a run; resume it with fl.resume=true or "
                f"choose another paths.run_dir"
            )
        write_text(OmegaConf.to_yaml(self.cfg, resolve=True), self.files.resolved_config)
        self.history = self._new_history(run_name_for(self.files.root))
        self.say(
            f"federated run {self.history['run_name']}: strategy {self.history['strategy']}, "
            f"{self.num_rounds} round(s), run directory {self.files.root}"
        )
        t = time.perf_counter()
        self._enroll()
        self.history["timings"]["enrollment_s"] = time.perf_counter() - t
        self._build_model()
        self.global_arrays = {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}
        self.strategy = build_strategy(self.cfg, self.model, len(self.history["sites"]))

    def _resume(self) -> None:
        ckpt = self.files.latest_round_checkpoint()
        if ckpt is None:
            raise FederationStopped(f"fl.resume=true but {self.files.checkpoints} holds no round checkpoint")
        payload = load_round_checkpoint(ckpt)
        if payload["resume_identity"] != self.identity:
            raise FederationStopped(
                f"cannot resume {self.files.root}: its configuration (identity {payload['resume_identity']}) differs "
                f"from this one ({self.identity}); compare {self.files.resolved_config} with the current settings"
            )
        self.history = payload["history"]
        self.history.update(status="running", num_rounds=self.num_rounds, config_hash=self.config_hash)
        self.history.setdefault("resumed_at_round", []).append(int(payload["round_idx"]) + 1)
        self.history.pop("stop_reason", None)
        self.history.pop("stopped_round", None)
        self.plan = payload["plan"]
        self.meta = {k: payload[k] for k in ("model_config", "plan", "labels", "channel_names")}
        self.best = dict(payload["best"])
        self._build_model()
        self.global_arrays = payload["arrays"]
        self.strategy = build_strategy(self.cfg, self.model, len(self.history["sites"]))
        load_strategy_state(self.strategy, payload["strategy_state"])
        self.start_round = int(payload["round_idx"]) + 1
        write_text(OmegaConf.to_yaml(self.cfg, resolve=True), self.files.resolved_config)
        set_rng_state(payload["rng"])
        self.say(
            f"resuming run {self.history['run_name']} from {ckpt.name}: round {self.start_round} of "
            f"{self.num_rounds}, run directory {self.files.root}"
        )

    def _build_model(self) -> None:
        kwargs = model_config(
            self.cfg.model,
            in_channels=int(self.plan["num_channels"]),
            out_channels=int(self.plan["num_classes"]),
            plan=self.plan,
        )
        torch.manual_seed(int(self.cfg.seed))  # the sites build with the same seed (FedBN's initial norms)
        self.model = build_configured_model(kwargs)
        if not self.meta:  # a new run starts from model.pretrained, if set (a resumed one from its checkpoint)
            report = load_pretrained_from_config(self.model, self.cfg.model, model_config=kwargs, log=self.say)
            if report is not None:
                self.history["pretrained"] = report.as_dict()
            self.meta = {
                "model_config": kwargs,
                "plan": self.plan,
                "labels": dict(self.plan["labels"]),
                "channel_names": self.history.get("channel_names", {}),
            }
        self.meta.update(config_hash=self.config_hash, resume_identity=self.identity)

    # ---------------------------------------------------------------------------------------------
    def _enroll(self) -> None:
        """Round 0: sites validate their data and send fingerprints; the server plans."""
        nodes = wait_for_nodes(
            self.grid, int(self.fl.min_available_nodes), float(self.fl.connect_timeout_s), self.say
        )
        config = ConfigRecord(
            {KEY_CONFIG_HASH: self.config_hash, KEY_RUN_NAME: self.history["run_name"], KEY_SERVER_ROUND: 0}
        )
        msgs = [
            Message(
                RecordDict({CONFIG: config}),
                dst_node_id=n,
                message_type=f"{MessageType.QUERY}.{FINGERPRINT_ACTION}",
            )
            for n in nodes
        ]
        sent, replies = _send(self.grid, msgs, self.timeout)
        valid, faults = screen_replies("fingerprint", 0, sent, replies, needs_arrays=False, min_examples=1)
        fps: dict[str, dict[str, Any]] = {}
        for msg in valid:
            name = site_name(msg)
            try:
                fp = loads(
                    str(msg.content.config_records[KEY_FINGERPRINT][KEY_FINGERPRINT]),
                    f"fingerprint of {name}",
                )
                check_fingerprint(fp, where=name)
            except (KeyError, ValueError) as exc:
                faults.append(Fault("fingerprint", 0, msg.metadata.src_node_id, name, INVALID, str(exc)))
                continue
            fps[name] = fp
            note = str(msg.content.config_records[SITE].get(KEY_NOTE, "") or "")
            if note and note not in self.history["notes"]:
                self.history["notes"].append(note)
                self.say(f"note: {note}")
            self.node_sites[msg.metadata.src_node_id] = name
            self.history["enrollment"][name] = {
                "node_id": msg.metadata.src_node_id,
                "num_train_cases": int(_metrics(msg)[NUM_EXAMPLES]),
            }
        fps, incompatible = compatible_fingerprints(fps)
        for name in incompatible:
            node = self.history["enrollment"].pop(name)["node_id"]
            faults.append(
                Fault(
                    "fingerprint",
                    0,
                    node,
                    name,
                    INVALID,
                    f"labels/channels/dimensions differ from the other sites ({sorted(fps)})",
                )
            )
        self._log_faults(faults, self.history["faults"])
        needed = int(self.fl.min_train_nodes)
        if len(fps) < needed:
            raise FederationStopped(
                f"round 0: {len(fps)} of {len(sent)} site(s) passed validation and sent a "
                f"fingerprint; fl.min_train_nodes={needed}"
            )
        self.plan, merged = plan_from_fingerprints(fps, self.cfg)
        self.history["sites"] = sorted(fps)
        self.history["channel_names"] = {int(ch): sorted(mods)[0] for ch, mods in merged["channels"].items()}
        for note in self.plan.get("notes", []):
            self.say(f"round 0: {note}")
            if note not in self.history["notes"]:
                self.history["notes"].append(note)
        save_json(fps, self.files.fingerprints)
        save_json(self.plan, self.files.plan)
        self.say(
            f"round 0: {len(fps)} site(s) enrolled {sorted(fps)}; plan: patch {self.plan['patch_size']}, "
            f"spacing {self.plan['target_spacing_mm']} mm ({self.files.plan})"
        )

    def _log_faults(self, faults: list[Fault], into: list[dict[str, Any]]) -> None:
        for fault in faults:
            into.append(fault.as_dict())
            self.say(f"warning: {fault}")

    def _need(
        self, valid: list[Message], sent: list[Message], phase: str, entry: dict[str, Any], declined: int = 0
    ) -> None:
        """Stop the run when fewer than ``fl.min_<phase>_nodes`` replies are usable.

        The unfinished round (with every left-out site and why) is kept as ``history.json: stopped_round``,
        and the first reasons go into the message, so a stop is explained even when nobody saw the log.
        """
        key = f"min_{phase}_nodes"
        minimum = int(self.fl[key])
        if len(valid) < minimum:
            self.history["stopped_round"] = entry
            why = (
                f"; {declined} site(s) declined because their privacy budget is spent (privacy.epsilon)"
                if declined
                else ""
            )
            faults = [f for f in entry.get("faults", []) if f.get("phase") == phase]
            reasons = "; ".join(_first_line(str(Fault(**f))) for f in faults[:3])
            more = f" (+{len(faults) - 3} more)" if len(faults) > 3 else ""
            raise FederationStopped(
                f"round {entry['round']}: only {len(valid)} of {len(sent)} site(s) gave a usable "
                f"{phase} reply{why}; fl.{key}={minimum}: stopping"
                + (f". Left out: {reasons}{more}" if reasons else "")
                + " (all in history.json: stopped_round)"
            )

    def _log_declines(self, faults: list[Fault]) -> int:
        """Record the sites that declined a round for their privacy budget (``history.json: privacy``)."""
        declined = [f for f in faults if f.kind == DECLINED]
        log = self.history.setdefault("privacy", {}).setdefault("declined", [])
        for fault in declined:
            log.append({"round": fault.round, "site": fault.site, "node_id": fault.node_id, "detail": fault.detail})
        return len(declined)

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
        if self.secure_agg is not None:  # each reply carries the unmasked weighted mean, never a site's update
            cases = {s: int(e["num_train_cases"]) for s, e in self.history["enrollment"].items()}
            secure = self.secure_agg.train_round(self.grid, r, msgs, cases, self.node_sites)
            sent, replies = secure.sent, secure.replies
            entry["secure_aggregation"] = secure.summary
            self.history.setdefault("privacy", {}).setdefault("secagg_rounds", []).append({"round": r, **secure.summary})
        else:
            sent, replies = _send(self.grid, msgs, self.timeout)
        valid, faults = screen_replies(
            "train", r, sent, replies, needs_arrays=True, min_examples=1, known_sites=self.node_sites
        )
        self._log_faults(faults, entry["faults"])
        declined = self._log_declines(faults)
        self._remember(valid)
        entry["train"] = {site_name(m): _metrics(m) for m in valid}  # dp-* figures kept per site
        self._need(valid, sent, "train", entry, declined)
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
            {k: self.global_arrays[k].shape for k in aggregated if k in self.global_arrays},
            what="aggregated model",
        )
        if problems:
            raise FederationStopped(f"round {r}: {'; '.join(problems)}")
        self.global_arrays = {
            **self.global_arrays,
            **{k: v.astype(self.global_arrays[k].dtype, copy=False) for k, v in aggregated.items()},
        }
        entry["train_aggregate"] = dict(agg_metrics or {})
        client_dp = client_dp_figures(self.strategy)
        if client_dp is not None:  # client-level DP: clipping norm, noise and Flower's epsilon per round
            entry["client_dp"] = client_dp
            self.history.setdefault("privacy", {}).setdefault("client_level_rounds", []).append(
                {"round": r, **client_dp}
            )
        entry.setdefault("seconds", {})["train"] = time.perf_counter() - t

        t = time.perf_counter()
        msgs = self.strategy.configure_evaluate(
            r, to_record(self.global_arrays), self._base_config(r, split=SPLIT_VAL), self.grid
        )
        sent, replies = _send(self.grid, msgs, self.timeout)
        valid, faults = screen_replies(
            "evaluate", r, sent, replies, needs_arrays=False, known_sites=self.node_sites
        )
        self._log_faults(faults, entry["faults"])
        self._remember(valid)
        entry["evaluate"] = {site_name(m): _metrics(m) for m in valid}
        self._need(valid, sent, "evaluate", entry)
        entry["evaluate_aggregate"] = aggregate_by_cases(entry["evaluate"])
        entry["seconds"]["evaluate"] = time.perf_counter() - t

        dice = float(entry["evaluate_aggregate"].get(DICE, math.nan))
        improved = math.isfinite(dice) and dice > self.best["dice"]
        if improved or (self.best["round"] is None and r == self.num_rounds):
            self.best = {"round": r, "dice": dice if math.isfinite(dice) else -math.inf}
            save_round_checkpoint(
                self.files.best,
                global_arrays=self.global_arrays,
                meta=self.meta,
                round_idx=r,
                metrics=entry["evaluate_aggregate"],
                run_name=self.history["run_name"],
            )
        self._close_round(r, entry, t_round, round_line)

    def _close_round(self, r: int, entry: dict[str, Any], t_round: float,
                     line: Callable[[dict[str, Any], int], str]) -> None:
        """Record round ``r`` in the history, checkpoint everything (resume point), write and print."""
        entry["seconds"]["round"] = time.perf_counter() - t_round
        self.history["rounds"].append(entry)
        self.history["best"] = dict(self.best)
        self.history["timings"]["rounds_s"] = (
            self.history["timings"].get("rounds_s", 0.0) + entry["seconds"]["round"]
        )
        save_round_checkpoint(
            self.files.round_checkpoint(r),
            global_arrays=self.global_arrays,
            meta=self.meta,
            round_idx=r,
            strategy_state=strategy_state(self.strategy),
            rng=rng_state(),
            history=self.history,
            best=self.best,
            run_name=self.history["run_name"],
        )
        self._write_history()
        self.say(line(entry, self.num_rounds))

    def _remember(self, valid: list[Message]) -> None:
        for msg in valid:
            self.node_sites[msg.metadata.src_node_id] = str(site_name(msg))

    def _final_test(self) -> None:
        """The best global model on every connected site's test split (``imagesTs``)."""
        if self.best["round"] is None:
            return
        t = time.perf_counter()
        best = load_round_checkpoint_arrays(self.files.best)
        record = to_record(best)
        if isinstance(self.strategy, FedBN):  # each site evaluates with its own normalisation layers
            record = self.strategy.shared(record)
        nodes = wait_for_nodes(
            self.grid, int(self.fl.min_evaluate_nodes), float(self.fl.connect_timeout_s), self.say
        )
        content = RecordDict(
            {ARRAYS: record, CONFIG: self._base_config(int(self.best["round"]), split=SPLIT_TEST)}
        )
        msgs = [Message(content, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]
        sent, replies = _send(self.grid, msgs, self.timeout)
        valid, faults = screen_replies(
            "test", self.num_rounds, sent, replies, needs_arrays=False, known_sites=self.node_sites
        )
        self._log_faults(faults, self.history["faults"])
        per_site = {site_name(m): _metrics(m) for m in valid}
        per_site = {s: m for s, m in per_site.items() if m.get(NUM_EXAMPLES, 0) > 0}
        self.history["test"] = {
            "round": self.best["round"],
            "sites": per_site,
            "aggregate": aggregate_by_cases(per_site) if per_site else {},
        }
        write_json(self.history["test"], self.files.test_metrics)
        self.history["timings"]["final_test_s"] = time.perf_counter() - t
        rows = ", ".join(f"{s} {m.get(DICE, math.nan):.3f}" for s, m in sorted(per_site.items()))
        self.say(f"test (best round {self.best['round']}): Dice {rows or 'no site has a test split'}")
        original = {s: m[ORIGINAL_DICE] for s, m in sorted(per_site.items()) if ORIGINAL_DICE in m}
        if original:
            self.say("test on each scan's own grid: Dice " + ", ".join(f"{s} {d:.3f}" for s, d in original.items()))
        if valid:
            own = " with its own normalisation layers" if isinstance(self.strategy, FedBN) else ""
            self.say(f"each site that answered keeps this model{own} for medseg-predict: "
                     f"<state-dir>/{self.history['run_name']}/{SITE_MODEL}")

    def _write_history(self) -> None:
        write_json(self.history, self.files.history)
        plot_history(self.history, self.files.dice_plot, self.files.loss_plot)
        plot_epsilon(self.history, self.files.epsilon_plot)
        write_report(self.files.report, self.history)


def plan_from_fingerprints(fps: Mapping[str, dict[str, Any]], cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge the sites' fingerprints and plan (``data.planning`` limits); problems go to ``plan["warnings"]``.

    Sites whose channels the model takes in another order (matched by name) are listed in
    ``plan["notes"]``.

    Returns:
        ``(plan, merged_fingerprint)``.
    """
    merged = merge_fingerprints(list(fps.values()))
    plan = make_plan(merged, **plan_options(cfg))
    warnings = [str(p) for fp in fps.values() for p in fingerprint_problems(fp)]
    if warnings:
        plan["warnings"] = warnings
    notes = channel_order_notes(fps)
    if notes:
        plan["notes"] = notes
    return plan, merged


def load_round_checkpoint_arrays(path: Path) -> dict[str, np.ndarray]:
    """Only the global weights of a checkpoint, as NumPy arrays."""
    return {k: v.numpy() for k, v in load_checkpoint(path)["state_dict"].items()}


def compatible_fingerprints(fps: Mapping[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Keep the largest group of fingerprints that can be merged (same labels, channels, dimensions)."""
    groups: dict[str, list[str]] = {}
    for name in sorted(fps):
        fp = fps[name]
        key = dumps(
            {
                "labels": fp.get("labels"),
                "channels": sorted(fp.get("channels", {})),
                "channel_order": fp.get("channel_order"),
                "spatial_dims": fp.get("spatial_dims"),
                "histogram": fp.get("histogram"),
            }
        )
        groups.setdefault(key, []).append(name)
    if not groups:
        return {}, []
    keep = sorted(groups.values(), key=lambda names: (-len(names), names[0]))[0]  # largest; ties: first name
    return {n: fps[n] for n in keep}, sorted(n for n in fps if n not in keep)
