"""The Flower ClientApp: unpack a message, call :mod:`client.local` / :mod:`client.site`, pack the reply.

Every handler first composes the run config from ``context.run_config`` (as the ServerApp does) and
refuses a message whose ``config-hash`` differs from its own: the server and this site would otherwise
train different models or preprocess differently without noticing. An exception raised here reaches
the server as an error reply naming the site and the reason; the server leaves the site out of that
round and logs it in ``history.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from omegaconf import DictConfig

from client.local import TrainInstructions, evaluate_round, train_round
from client.pretrain_site import (
    RECONSTRUCTION_PNG,
    enrollment,
    evaluate_pretraining_round,
    pretrain_data,
    pretrain_round,
)
from client.records import to_numpy, to_record
from client.secure_agg import secure_agg_mod
from client.site import SiteRef, SiteState, load_validated_site, resolve_site, site_data
from medseg_core.config import load_config
from medseg_core.data.fingerprint import check_plan, compute_site_fingerprint
from medseg_core.federation import (
    ARRAYS,
    CONFIG,
    FINGERPRINT_ACTION,
    KEY_CONFIG_HASH,
    KEY_FINGERPRINT,
    KEY_LOCAL_EPOCHS,
    KEY_LR,
    KEY_NOTE,
    KEY_PLAN,
    KEY_PROXIMAL_MU,
    KEY_RUN_NAME,
    KEY_SERVER_ROUND,
    KEY_SITE_NAME,
    KEY_SPLIT,
    METRICS,
    NUM_EXAMPLES,
    PRETRAIN_ACTION,
    SCAFFOLD_CONTROL,
    SCAFFOLD_DELTA_CONTROL,
    SITE,
    SITE_WEIGHT,
    SPLIT_VAL,
    dumps,
    loads,
    protocol_hash,
)


def client_dp_mod(msg: Message, context: Context, call_next) -> Message:
    """Client-side clipping of client-level DP (``privacy.client_dp.side: client``), chosen from the config.

    A ClientApp's mods are fixed when it is created, but the run's configuration is only known per
    message, so this mod composes it and delegates training messages to Flower's ``fixedclipping_mod``
    or ``adaptiveclipping_mod`` (the site's model update ``local - global`` is clipped before it leaves).
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    client_dp = (load_config(context.run_config).get("privacy") or {}).get("client_dp")
    if client_dp is None or client_dp.get("side") != "client":
        return call_next(msg, context)
    mod = adaptiveclipping_mod if client_dp.get("clipping") == "adaptive" else fixedclipping_mod
    return mod(msg, context, call_next)


# SecAgg+ outermost (its key-exchange stages are train messages too): client-side clipping happens inside it,
# before masking
app = ClientApp(mods=[secure_agg_mod, client_dp_mod])


class ConfigMismatchError(ValueError):
    """The server's resolved configuration differs from this site's."""


def _config(msg: Message) -> ConfigRecord:
    if CONFIG not in msg.content.config_records:
        raise ValueError(f"message has no '{CONFIG}' ConfigRecord")
    return msg.content.config_records[CONFIG]


def _setup(msg: Message, context: Context) -> tuple[DictConfig, ConfigRecord, SiteRef]:
    """Compose the run config, check it against the server's, and find this node's site.

    Raises:
        ConfigMismatchError: the message's ``config-hash`` differs from this site's.
    """
    cfg = load_config(context.run_config)
    config = _config(msg)
    mine, theirs = protocol_hash(cfg), str(config.get(KEY_CONFIG_HASH, ""))
    if theirs != mine:
        raise ConfigMismatchError(
            f"configuration mismatch: the server's resolved config hash is {theirs or '(none)'}, this site's is "
            f"{mine} (run-config {dict(context.run_config)}); the site and the server run different configs or "
            f"code versions; refusing to take part"
        )
    return cfg, config, resolve_site(cfg, context.node_config)


def _plan(config: ConfigRecord) -> dict[str, Any]:
    plan = loads(str(config.get(KEY_PLAN, "")), "the plan in the round's config")
    check_plan(plan, where="received from the server")
    return plan


def _reply(
    msg: Message, site: SiteRef, metrics: Mapping[str, float] | None = None, **records: Any
) -> Message:
    content = RecordDict({SITE: ConfigRecord({KEY_SITE_NAME: site.name, KEY_NOTE: site.note}), **records})
    if metrics is not None:
        content[METRICS] = MetricRecord(
            {k: (int(v) if k == NUM_EXAMPLES else float(v)) for k, v in metrics.items()}
        )
    return Message(content, reply_to=msg)


@app.query(FINGERPRINT_ACTION)
def fingerprint(msg: Message, context: Context) -> Message:
    """Round 0: validate the site's data and send its fingerprint (aggregates only, no voxel)."""
    cfg, _config_record, ref = _setup(msg, context)
    site = load_validated_site(ref, cfg)
    fp = compute_site_fingerprint(site)
    fp["sites"] = [ref.name]
    return _reply(
        msg,
        ref,
        {NUM_EXAMPLES: len(site.train_cases)},
        **{KEY_FINGERPRINT: ConfigRecord({KEY_FINGERPRINT: dumps(fp)})},
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on the site's cases from the received global weights; reply weights and metrics."""
    cfg, config, ref = _setup(msg, context)
    plan = _plan(config)
    data = site_data(ref, cfg, plan)
    control = msg.content.array_records.get(SCAFFOLD_CONTROL)
    instructions = TrainInstructions(
        server_round=int(config[KEY_SERVER_ROUND]),
        lr=float(config[KEY_LR]),
        local_epochs=int(config.get(KEY_LOCAL_EPOCHS, cfg.fl.local_epochs)),
        proximal_mu=float(config.get(KEY_PROXIMAL_MU, 0.0)),
        control=to_numpy(control) if control is not None else None,
    )
    state = SiteState(ref.state_root, str(config[KEY_RUN_NAME]))
    outcome = train_round(
        cfg,
        data,
        plan,
        to_numpy(msg.content.array_records[ARRAYS]),
        instructions,
        state,
        simulated=ref.simulated,
    )
    if (cfg.get("privacy") or {}).get("client_dp") is not None:
        outcome.metrics[SITE_WEIGHT] = 1  # client-level DP: the server averages the sites uniformly
    records: dict[str, Any] = {ARRAYS: to_record(outcome.arrays)}
    if outcome.delta_control is not None:
        records[SCAFFOLD_DELTA_CONTROL] = to_record(outcome.delta_control)
    return _reply(msg, ref, outcome.metrics, **records)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global weights on the site's validation (or test) cases."""
    cfg, config, ref = _setup(msg, context)
    plan = _plan(config)
    data = site_data(ref, cfg, plan)
    state = SiteState(ref.state_root, str(config[KEY_RUN_NAME]))
    metrics = evaluate_round(
        cfg,
        data,
        plan,
        to_numpy(msg.content.array_records[ARRAYS]),
        split=str(config.get(KEY_SPLIT, SPLIT_VAL)),
        server_round=int(config[KEY_SERVER_ROUND]),
        state=state,
    )
    return _reply(msg, ref, metrics)


# --------------------------------------------------------------------------------------------------
# federated self-supervised pretraining (experiment=fl_pretrain; client/pretrain_site.py, server/pretrain_loop.py)


@app.query(PRETRAIN_ACTION)
def pretrain_enroll(msg: Message, context: Context) -> Message:
    """Round 0 of pretraining: validate, count the images; fingerprint only when no plan came (and labels exist)."""
    cfg, config, ref = _setup(msg, context)
    num_images, fp = enrollment(ref, cfg, fingerprint=not config.get(KEY_PLAN))
    records = {KEY_FINGERPRINT: ConfigRecord({KEY_FINGERPRINT: dumps(fp)})} if fp is not None else {}
    return _reply(msg, ref, {NUM_EXAMPLES: num_images}, **records)


@app.train(PRETRAIN_ACTION)
def pretrain_train(msg: Message, context: Context) -> Message:
    """Masked-reconstruction training on the site's own images from the global model; reply every weight."""
    cfg, config, ref = _setup(msg, context)
    plan = _plan(config)
    instructions = TrainInstructions(
        server_round=int(config[KEY_SERVER_ROUND]),
        lr=float(config[KEY_LR]),
        local_epochs=int(config.get(KEY_LOCAL_EPOCHS, cfg.fl.local_epochs)),
    )
    state = SiteState(ref.state_root, str(config[KEY_RUN_NAME]))
    arrays, metrics = pretrain_round(
        cfg, pretrain_data(ref, cfg, plan), plan, to_numpy(msg.content.array_records[ARRAYS]), instructions, state
    )
    return _reply(msg, ref, metrics, **{ARRAYS: to_record(arrays)})


@app.evaluate(PRETRAIN_ACTION)
def pretrain_evaluate(msg: Message, context: Context) -> Message:
    """The global model's reconstruction loss on the site's held-out images (a picture at the last round)."""
    cfg, config, ref = _setup(msg, context)
    plan = _plan(config)
    last = int(config[KEY_SERVER_ROUND]) >= int(cfg.fl.num_rounds)
    state = SiteState(ref.state_root, str(config[KEY_RUN_NAME]))
    metrics = evaluate_pretraining_round(
        cfg,
        pretrain_data(ref, cfg, plan),
        plan,
        to_numpy(msg.content.array_records[ARRAYS]),
        picture=state.dir / RECONSTRUCTION_PNG if last else None,
    )
    return _reply(msg, ref, metrics)
