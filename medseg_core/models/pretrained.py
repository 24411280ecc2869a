"""Encoder checkpoints from self-supervised pretraining, and loading them into a segmentation model.

``model.pretrained=PATH`` (``medseg-train``, the federated server's initial model) calls
:func:`load_pretrained_encoder`, which copies the checkpoint's weights into the freshly built model and
returns a :class:`KeyReport`:

- *loaded*: checkpoint keys copied into the model (same key, same shape);
- *missing*: keys of the model inside the encoder's scope that the checkpoint does not hold;
- *unexpected*: checkpoint keys the model does not have;
- *mismatched*: keys both have, with different shapes;
- *initialised*: model keys outside the scope (decoder, output head), left freshly initialised.

Missing, unexpected or mismatched keys, or a different model name, are an error
(:class:`PretrainedMismatchError`, raised before anything is copied) unless ``allow_mismatch`` is set;
then only the matching keys are loaded and the report says what was skipped.

An encoder checkpoint is a medseg checkpoint (:mod:`medseg_core.checkpoint`) with ``kind: "encoder"``
and an ``encoder`` record: model name, hashes of the model config and of the pretraining run config,
the pretraining method, the keys it holds and its scope (key prefixes and excluded keys).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medseg_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

ENCODER_KIND = "encoder"
#: model-config keys that do not change the encoder (excluded from its hash)
_HASH_IGNORED = ("out_channels", "pretrained")


def model_config_hash(model_config: Mapping[str, Any]) -> str:
    """Short SHA-256 of a registry model config, ignoring ``out_channels`` (the head, not the encoder)."""
    cfg = {k: v for k, v in dict(model_config).items() if k not in _HASH_IGNORED}
    text = json.dumps(cfg, sort_keys=True, default=lambda v: list(v) if isinstance(v, tuple) else str(v))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def output_dependent_keys(model_config: Mapping[str, Any]) -> list[str]:
    """State-dict keys of a registry model whose presence or shape depends on ``out_channels`` (the head).

    Built twice with different ``out_channels``: on the ``meta`` device (no memory, no initialisation), or,
    for a constructor that reads tensor values (MONAI's Swin-UNETR calls ``.item()``), on the CPU with the
    global random state restored afterwards, so the caller's initialisation is unchanged.

    Args:
        model_config: registry kwargs, ``name`` included.
    """
    from medseg_core.models.registry import build_model

    cfg = {k: v for k, v in dict(model_config).items() if k != "pretrained"}
    name = cfg.pop("name")
    shapes = []
    for out_channels in (2, 3):
        cfg["out_channels"] = out_channels
        try:
            with torch.device("meta"):
                state = build_model(name, **cfg).state_dict()
        except (NotImplementedError, RuntimeError):  # the meta device cannot run this constructor
            with torch.random.fork_rng(devices=[]):
                state = build_model(name, **cfg).state_dict()
        shapes.append({k: tuple(v.shape) for k, v in state.items()})
    a, b = shapes
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def save_encoder_checkpoint(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    model_config: Mapping[str, Any],
    scope_prefixes: Sequence[str],
    excluded_keys: Sequence[str] = (),
    method: str,
    config_hash: str | None = None,
    **extra: Any,
) -> Path:
    """Write an encoder checkpoint atomically.

    Args:
        path: output file.
        state_dict: encoder weights under the segmentation model's keys.
        model_config: registry kwargs of the segmentation model (``name`` included).
        scope_prefixes: key prefixes the encoder covers (``""`` = the whole model).
        excluded_keys: keys under those prefixes deliberately not held (e.g. the output head).
        method: pretraining method (``"mim"``, ``"mae_transunet"``, ``"mae_vit"``).
        config_hash: hash of the pretraining run's resolved config.
        **extra: more to store (``plan``, ``labels``, ``channel_names``, ``history`` ...).

    Raises:
        ValueError: a key outside the scope, or an empty state dict.
    """
    keys = sorted(state_dict)
    if not keys:
        raise ValueError("save_encoder_checkpoint: the encoder state dict is empty")
    prefixes = tuple(str(p) for p in scope_prefixes)
    outside = [k for k in keys if not k.startswith(prefixes) or k in set(excluded_keys)]
    if outside:
        raise ValueError(f"keys outside the encoder scope {list(prefixes)}: {outside[:5]}")
    meta = {
        "model_name": str(model_config["name"]),
        "model_config_hash": model_config_hash(model_config),
        "config_hash": config_hash,
        "method": method,
        "keys": keys,
        "num_parameters": int(sum(v.numel() for v in state_dict.values())),
        "scope": {"prefixes": list(prefixes), "excluded": sorted(excluded_keys)},
    }
    return save_checkpoint(path, state_dict=state_dict, model_config=model_config, kind=ENCODER_KIND,
                           encoder=meta, **extra)


def read_encoder_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load an encoder checkpoint (CPU tensors).

    Raises:
        CheckpointError: missing, unreadable, or not an encoder checkpoint (e.g. a full model's ``best.pt``).
    """
    payload = load_checkpoint(path)
    meta = payload.get("encoder")
    if payload.get("kind") != ENCODER_KIND or not isinstance(meta, Mapping):
        raise CheckpointError(
            f"{path}: not an encoder checkpoint (no kind={ENCODER_KIND!r}); medseg-pretrain writes encoder.pt"
        )
    return payload


@dataclass
class KeyReport:
    """What loading a pretrained encoder did (see the module docstring for the categories).

    Attributes:
        path: the checkpoint.
        checkpoint_model: model name stored in the checkpoint.
        model_name: name of the model loaded into (``None`` if unknown).
        method: pretraining method of the checkpoint.
        loaded, missing, unexpected, initialised: state-dict keys.
        mismatched: key -> (checkpoint shape, model shape).
        config_differences: model-config keys whose values differ from the pretraining model's.
        applied: whether weights were copied.
    """

    path: str
    checkpoint_model: str
    model_name: str | None
    method: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    initialised: list[str] = field(default_factory=list)
    config_differences: list[str] = field(default_factory=list)
    applied: bool = False

    @property
    def name_mismatch(self) -> bool:
        return self.model_name is not None and self.model_name != self.checkpoint_model

    @property
    def clean(self) -> bool:
        """No missing, unexpected or shape-mismatched key and the same model name."""
        return not (self.missing or self.unexpected or self.mismatched or self.name_mismatch)

    def problems(self) -> list[str]:
        """One line per kind of mismatch (empty when :attr:`clean`)."""

        def some(keys: Sequence[str]) -> str:
            return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")

        out = []
        if self.name_mismatch:
            out.append(f"the checkpoint is for model {self.checkpoint_model!r}, not {self.model_name!r}")
        if self.missing:
            out.append(f"{len(self.missing)} encoder key(s) missing from the checkpoint: {some(self.missing)}")
        if self.unexpected:
            out.append(f"{len(self.unexpected)} checkpoint key(s) the model does not have: {some(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} {a} vs {b}" for k, (a, b) in list(self.mismatched.items())[:5]]
            out.append(f"{len(self.mismatched)} key(s) with other shapes (checkpoint vs model): {'; '.join(shown)}")
        return out

    def summary(self) -> str:
        """A human-readable multi-line report."""
        head = (f"pretrained encoder {self.path} ({self.method}, model {self.checkpoint_model}): "
                f"loaded {len(self.loaded)} key(s), missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
                f"shape mismatches {len(self.mismatched)}; {len(self.initialised)} key(s) outside the encoder "
                f"freshly initialised")
        lines = [head, *(f"  mismatch: {p}" for p in self.problems())]
        if self.config_differences:
            lines.append(f"  note: model config differs from the pretraining model in {self.config_differences}")
        if not self.applied:
            lines.append("  nothing was loaded")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "checkpoint_model": self.checkpoint_model, "model_name": self.model_name,
            "method": self.method, "clean": self.clean, "applied": self.applied, "loaded": self.loaded,
            "missing": self.missing, "unexpected": self.unexpected,
            "mismatched": {k: [list(a), list(b)] for k, (a, b) in self.mismatched.items()},
            "initialised": self.initialised, "config_differences": self.config_differences,
        }


class PretrainedMismatchError(ValueError):
    """The encoder checkpoint does not fit the model; ``report`` says how."""

    def __init__(self, report: KeyReport) -> None:
        self.report = report
        super().__init__(
            f"{report.path}: pretrained encoder does not fit the model: " + "; ".join(report.problems())
            + " (set allow_mismatch to load only the matching keys)"
        )


def key_report(model: nn.Module, payload: Mapping[str, Any], *, path: str | Path = "",
               model_config: Mapping[str, Any] | None = None) -> KeyReport:
    """Compare an encoder checkpoint with a model without changing anything."""
    meta = payload["encoder"]
    state = payload["state_dict"]
    scope = meta.get("scope", {})
    prefixes = tuple(scope.get("prefixes", [""]))
    excluded = set(scope.get("excluded", []))
    model_state = model.state_dict()
    in_scope = [k for k in model_state if k.startswith(prefixes) and k not in excluded]
    report = KeyReport(
        path=str(path), checkpoint_model=str(meta.get("model_name")),
        model_name=str(model_config["name"]) if model_config and "name" in model_config else None,
        method=str(meta.get("method")),
    )
    for key, value in state.items():
        if key not in model_state:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(model_state[key].shape):
            report.mismatched[key] = (tuple(value.shape), tuple(model_state[key].shape))
        else:
            report.loaded.append(key)
    report.missing = [k for k in in_scope if k not in state]
    scoped = set(in_scope)
    report.initialised = [k for k in model_state if k not in scoped]
    if model_config is not None:
        stored = {k: v for k, v in dict(payload.get("model_config") or {}).items() if k not in _HASH_IGNORED}
        given = {k: v for k, v in dict(model_config).items() if k not in _HASH_IGNORED}
        report.config_differences = sorted(
            k for k in set(stored) | set(given) if _plain(stored.get(k)) != _plain(given.get(k))
        )
    return report


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_pretrained_encoder(model: nn.Module, path: str | Path, *, allow_mismatch: bool = False,
                            model_config: Mapping[str, Any] | None = None) -> KeyReport:
    """Load an encoder checkpoint into ``model`` (in place) and report what happened.

    Args:
        model: the freshly built segmentation model.
        path: encoder checkpoint written by ``medseg-pretrain`` (or :func:`save_encoder_checkpoint`).
        allow_mismatch: load the matching keys even when some are missing, unexpected, of another shape,
            or the model name differs (the report lists them).
        model_config: the model's registry kwargs (to compare the model name and config).

    Returns:
        The :class:`KeyReport` (``applied`` is True).

    Raises:
        CheckpointError: the file is missing, unreadable or not an encoder checkpoint.
        PretrainedMismatchError: a mismatch and ``allow_mismatch`` is False (the model is unchanged).
    """
    payload = read_encoder_checkpoint(path)
    report = key_report(model, payload, path=path, model_config=model_config)
    if not report.clean and not allow_mismatch:
        raise PretrainedMismatchError(report)
    state = payload["state_dict"]
    result = model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    if result.unexpected_keys:  # cannot happen: loaded keys are model keys
        raise RuntimeError(f"unexpected keys while loading {path}: {result.unexpected_keys}")
    report.applied = True
    return report


def load_pretrained_from_config(model: nn.Module, model_cfg: Mapping[str, Any] | None, *,
                                model_config: Mapping[str, Any] | None = None,
                                log: Callable[[str], None] | None = print) -> KeyReport | None:
    """Apply the ``pretrained`` entry of a model config, if any (the hook for training entry points).

    ``model.pretrained`` is either a path, or a mapping ``{path: ..., allow_mismatch: true}``; ``null`` or
    an empty string means none.

    Returns:
        The report, or ``None`` when no encoder is configured.

    Raises:
        ValueError: a malformed ``pretrained`` entry; see :func:`load_pretrained_encoder` for the rest.
    """
    entry = (model_cfg or {}).get("pretrained")
    if entry is None or entry == "":
        return None
    allow = False
    if isinstance(entry, Mapping):
        unknown = sorted(set(entry) - {"path", "allow_mismatch"})
        if unknown or not entry.get("path"):
            raise ValueError(f"model.pretrained={dict(entry)!r}: expected a path or {{path, allow_mismatch}}")
        allow = entry.get("allow_mismatch", False)
        if not isinstance(allow, bool):
            raise ValueError(f"model.pretrained.allow_mismatch={allow!r} must be true or false")
        entry = entry["path"]
    if not isinstance(entry, (str, Path)):
        raise ValueError(f"model.pretrained={entry!r} must be a path")
    report = load_pretrained_encoder(model, Path(str(entry)).expanduser(), allow_mismatch=allow,
                                     model_config=model_config)
    if log is not None:
        log(report.summary())
    return report
