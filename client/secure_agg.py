"""A site's side of secure aggregation (SecAgg+): Flower's ``secaggplus_mod`` around our train handler.

Under ``privacy.secagg`` every training round is Flower's four-stage protocol (server side:
:mod:`server.secure_agg`). The stages are ``train`` messages; ``secaggplus_mod`` answers the key-exchange
and unmask stages itself and, in the collect-masked-vectors stage, calls the rest of the ClientApp and
masks what it returns. That stage arrives in Flower's legacy layout (``fitins.parameters``: a nameless
list of weights; ``fitins.config``) and ``secaggplus_mod`` expects a legacy ``FitRes`` back, so
:func:`secure_agg_mod` translates both ways around the unchanged inner chain (client-side clipping of
client-level DP, then :func:`client.app.train`):

* in: the weights get their names back (:data:`medseg_core.federation.KEY_ARRAY_KEYS`) and become the
  usual ``arrays`` / ``config`` records;
* out: the site sends its *update* (trained minus received weights, not the weights) with weight
  ``site-weight`` if present (client-level DP: 1) else ``num-examples`` (training cases), its metrics in
  ``fitres.metrics`` (not masked: ``num-examples``, ``dp-*``) and its site record. ``secaggplus_mod``
  multiplies the update by the weight, quantises and masks it, and clears the plain update before the
  reply leaves.

A site configured for SecAgg+ refuses a plain training message: it never sends an unmasked update.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client.records import to_record
from medseg_core.config import load_config
from medseg_core.federation import (
    ARRAYS,
    CONFIG,
    KEY_ARRAY_KEYS,
    NPY_LOAD_LOCK,
    NUM_EXAMPLES,
    SITE,
    SITE_WEIGHT,
    arrays_to_numpy,
)

#: records of Flower's legacy layout (``flwr.compat.common.recorddict_compat``) in the masked stage
FITINS_PARAMETERS, FITINS_CONFIG = "fitins.parameters", "fitins.config"

Handler = Callable[[Message, Context], Message]


def secure_agg_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """Run training messages through Flower's ``secaggplus_mod`` when the run config has ``privacy.secagg``.

    A ClientApp's mods are fixed when it is created, but the run's configuration is only known per
    message (as for ``client.app.client_dp_mod``). Put this mod first: client-side clipping must happen
    inside it, before masking.

    Raises:
        ValueError: SecAgg+ is configured but the message is a plain training message, or the inner
            reply cannot be masked (see :func:`masked_stage`).
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    secagg = (load_config(context.run_config).get("privacy") or {}).get("secagg")
    if secagg is None:
        return call_next(msg, context)
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        raise ValueError(
            "privacy.secagg is set in this run's configuration but the server sent a plain training message "
            f"(no '{RECORD_KEY_CONFIGS}' record): refusing to send an unmasked model update"
        )
    clipping_range = float(secagg.clipping_range)

    def inner(stage_msg: Message, ctx: Context) -> Message:
        return masked_stage(stage_msg, ctx, call_next, clipping_range)

    return secaggplus_mod(msg, context, inner)


def masked_stage(msg: Message, context: Context, call_next: Handler, clipping_range: float) -> Message:
    """The collect-masked-vectors stage: train through ``call_next`` and reply a legacy ``FitRes`` update.

    Args:
        msg: the stage's message (``fitins.parameters``, ``fitins.config``, Flower's SecAgg+ record); its
            content is replaced by the usual ``arrays`` / ``config`` records for ``call_next``.
        context: the node's context.
        call_next: the rest of the ClientApp (clipping mod, train handler).
        clipping_range: ``privacy.secagg.clipping_range``.

    Returns:
        ``fitres.*`` records holding the update ``y - x`` (float64, key order of the received list) and the
        weight, plus the site record.

    Raises:
        ValueError: a malformed message, a reply without the received keys, or an update with NaN/Inf or a
            value outside ``[-clipping_range, clipping_range]`` (Flower's quantiser would clip it silently).
        RuntimeError: the inner chain replied with an error (e.g. a clipping mod's precondition).
    """
    content = msg.content
    if FITINS_PARAMETERS not in content.array_records or FITINS_CONFIG not in content.config_records:
        raise ValueError(
            f"SecAgg+ training message without '{FITINS_PARAMETERS}' / '{FITINS_CONFIG}' records: "
            f"got {sorted(content.keys())}"
        )
    config = dict(content.config_records[FITINS_CONFIG])
    keys = _array_keys(config.pop(KEY_ARRAY_KEYS, None))
    with NPY_LOAD_LOCK:  # np.load of each array (see medseg_core.federation.NPY_LOAD_LOCK)
        received = parameters_to_ndarrays(
            compat.arrayrecord_to_parameters(content.array_records[FITINS_PARAMETERS], keep_input=True)
        )
    if len(received) != len(keys):
        raise ValueError(
            f"SecAgg+ training message: {len(received)} arrays but {len(keys)} keys in '{KEY_ARRAY_KEYS}'"
        )
    global_arrays = dict(zip(keys, received, strict=True))
    msg.content = RecordDict(
        {
            ARRAYS: to_record(global_arrays),
            CONFIG: ConfigRecord(config),
        }
    )
    reply = call_next(msg, context)
    if reply.has_error():
        raise RuntimeError(reply.error.reason)
    out = reply.content
    if ARRAYS not in out.array_records or len(out.metric_records) != 1 or SITE not in out.config_records:
        raise ValueError(
            f"the train handler's reply lacks '{ARRAYS}', its metrics or '{SITE}': {sorted(out.keys())}"
        )
    trained = arrays_to_numpy(out.array_records[ARRAYS].items())
    if set(trained) != set(keys):
        raise ValueError(
            "SecAgg+ sums positionally: the trained weights must have exactly the received keys; "
            f"missing {sorted(set(keys) - set(trained))[:3]}, unexpected {sorted(set(trained) - set(keys))[:3]}"
        )
    update = [np.asarray(trained[k], np.float64) - np.asarray(global_arrays[k], np.float64) for k in keys]
    _check_update(keys, update, clipping_range)
    metrics = dict(next(iter(out.metric_records.values())))
    weight = metrics.get(SITE_WEIGHT, metrics.get(NUM_EXAMPLES))
    if (
        not isinstance(weight, (int, float))
        or isinstance(weight, bool)
        or weight < 1
        or weight != int(weight)
    ):
        raise ValueError(f"SecAgg+ needs an integer weight >= 1 ('{NUM_EXAMPLES}' cases), got {weight!r}")
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(update),
        num_examples=int(weight),
        metrics=metrics,
    )
    masked = compat.fitres_to_recorddict(fitres, keep_input=True)
    masked[SITE] = out.config_records[SITE]
    return Message(masked, reply_to=msg)


def _array_keys(raw: object) -> list[str]:
    """The weights' keys sent with the legacy list.

    Raises:
        ValueError: missing, not JSON, or not a list of distinct strings.
    """
    try:
        keys = json.loads(str(raw)) if raw is not None else None
    except json.JSONDecodeError as exc:
        raise ValueError(f"SecAgg+ training message: '{KEY_ARRAY_KEYS}' is not JSON ({exc})") from exc
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise ValueError(
            f"SecAgg+ training message: '{KEY_ARRAY_KEYS}' must be a JSON list of distinct keys, got {raw!r}"
        )
    return keys


def _check_update(keys: list[str], update: list[np.ndarray], clipping_range: float) -> None:
    """Refuse an update SecAgg+ would corrupt: NaN/Inf, or values its quantiser would clip."""
    for key, delta in zip(keys, update, strict=True):
        if not np.all(np.isfinite(delta)):
            raise ValueError(f"this site's model update {key!r} holds NaN/Inf values: not sent")
        peak = float(np.max(np.abs(delta))) if delta.size else 0.0
        if peak > clipping_range:
            raise ValueError(
                f"this site's model update {key!r} reaches {peak:.4g}, outside privacy.secagg.clipping_range="
                f"{clipping_range:g}: SecAgg+ would clip it silently; raise the range (or lower the learning rate)"
            )
