"""The model registry: one constructor vocabulary for every segmentation network.

Every registered builder takes ``spatial_dims, in_channels, out_channels``, a ``norm`` choice
(``"instance" | "group" | "batch"`` or ``None`` for the family's reference default, see
:mod:`medseg_core.models.layers`), ``dp_compatible`` and model-specific keyword arguments.

Output convention: a model maps ``[B, in_channels, *spatial]`` to logits
``[B, out_channels, *spatial]``. Models built with ``deep_supervision=True`` (``dynunet``,
``unetpp``) return, *in training mode only*, a list of logits: the full-resolution main output
first, then the auxiliary outputs from the decoder level nearest the output downwards (possibly at
lower resolution), which is what ``monai.losses.DeepSupervisionLoss`` expects. In eval mode they
return the main logits tensor.

Example::

    model = build_model("unet", spatial_dims=3, in_channels=1, out_channels=3,
                        channels=(8, 16, 32, 64), strides=(2, 2, 2))
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from medseg_core.models.dp import check_dp_compatible
from medseg_core.models.layers import check_norm

COMMON_ARGS = ("spatial_dims", "in_channels", "out_channels", "norm", "dp_compatible")


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one model.

    Attributes:
        name: registry name.
        builder: function building the model from the common vocabulary plus its own kwargs.
        spatial_dims: supported spatial dimensionalities, e.g. ``(2, 3)``.
        tiny: ``spatial_dims -> kwargs`` of a configuration small enough for CPU tests (2D 32x32 /
            3D 32^3 inputs, a few thousand parameters).
        dp_unsupported: why the model cannot be made DP-compatible, or ``None``.
        requires: importable modules the model needs beyond the project's dependencies.
        fixed_input_size: inputs must be exactly ``img_size`` (position embeddings that do not
            interpolate), so ``img_size`` has to equal the training patch.
    """

    name: str
    builder: Callable[..., nn.Module]
    spatial_dims: tuple[int, ...]
    tiny: Callable[[int], dict[str, Any]]
    dp_unsupported: str | None = None
    requires: tuple[str, ...] = field(default=())
    fixed_input_size: bool = False


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    spatial_dims: tuple[int, ...],
    tiny: Callable[[int], dict[str, Any]],
    dp_unsupported: str | None = None,
    requires: tuple[str, ...] = (),
    fixed_input_size: bool = False,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model builder under ``name``.

    Raises:
        ValueError: the name is taken, or the builder does not accept the common arguments.
    """

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        missing = [a for a in COMMON_ARGS if a not in inspect.signature(builder).parameters]
        if missing:
            raise ValueError(f"builder for {name!r} lacks the common arguments {missing}")
        _REGISTRY[name] = ModelSpec(name, builder, tuple(spatial_dims), tiny, dp_unsupported, tuple(requires),
                                    fixed_input_size)
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` for ``name``.

    Raises:
        ValueError: unknown name (the message lists the available ones).
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_spatial_dims(name: str) -> tuple[int, ...]:
    """Spatial dimensionalities ``name`` supports, e.g. ``(2, 3)``."""
    return get_model_spec(name).spatial_dims


def tiny_config(name: str, spatial_dims: int) -> dict[str, Any]:
    """Small kwargs (including ``spatial_dims``, excluding channels) for CPU tests and smoke configs.

    The result trains on 2D 32x32 or 3D 32^3 inputs: ``build_model(name, in_channels=1,
    out_channels=3, **tiny_config(name, 3))``.

    Raises:
        ValueError: unknown name or unsupported ``spatial_dims``.
    """
    spec = get_model_spec(name)
    _check_spatial_dims(spec, spatial_dims)
    return {"spatial_dims": spatial_dims, **spec.tiny(spatial_dims)}


def _plain(value: Any) -> Any:
    """OmegaConf containers / lists -> plain tuples and dicts (MONAI checks ``isinstance(x, tuple)``)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return tuple(_plain(v) for v in value)
    return value


def _check_spatial_dims(spec: ModelSpec, spatial_dims: Any) -> None:
    if isinstance(spatial_dims, bool) or spatial_dims not in spec.spatial_dims:
        raise ValueError(
            f"model {spec.name!r}: spatial_dims={spatial_dims!r} is not supported (supports {spec.spatial_dims})"
        )


def _check_channels(name: str, key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model {name!r}: {key}={value!r} must be a positive integer")


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: registry name (see :func:`list_models`).
        **kwargs: ``spatial_dims``, ``in_channels``, ``out_channels`` (required), ``norm``,
            ``dp_compatible`` and the model's own arguments. Lists (also OmegaConf ``ListConfig``)
            are converted to tuples. ``pretrained`` (a path or ``{path, allow_mismatch}``, the
            ``model.pretrained`` config key) loads a ``medseg-pretrain`` encoder after building.

    Returns:
        The model, with freshly initialised weights (or the pretrained encoder's, where given).

    Raises:
        ValueError: unknown name; missing, unknown or invalid arguments; ``dp_compatible=True`` for a
            model that cannot be made DP-compatible (the message says why).
        ImportError: an optional package the model needs is not installed.
    """
    spec = get_model_spec(name)
    kwargs = {k: _plain(v) for k, v in kwargs.items()}
    pretrained = kwargs.pop("pretrained", None)
    if pretrained not in (None, ""):
        from medseg_core.models.pretrained import load_pretrained_from_config

        model = build_model(name, **kwargs)
        load_pretrained_from_config(model, {"pretrained": pretrained}, model_config={"name": name, **kwargs})
        return model
    signature = inspect.signature(spec.builder)
    try:
        bound = signature.bind(**kwargs)
    except TypeError as err:
        raise ValueError(
            f"model {name!r}: {err}; accepted arguments: {', '.join(signature.parameters)}"
        ) from None
    bound.apply_defaults()
    args = dict(bound.arguments)

    _check_spatial_dims(spec, args["spatial_dims"])
    _check_channels(name, "in_channels", args["in_channels"])
    _check_channels(name, "out_channels", args["out_channels"])
    check_norm(args["norm"], model=name)
    if not isinstance(args["dp_compatible"], bool):
        raise ValueError(f"model {name!r}: dp_compatible={args['dp_compatible']!r} must be true or false")
    if args["dp_compatible"] and spec.dp_unsupported:
        raise ValueError(f"model {name!r} cannot be made DP-compatible: {spec.dp_unsupported}")
    for module in spec.requires:
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"model {name!r} needs the {module!r} package: pip install {module}")

    model = spec.builder(**args)
    if args["dp_compatible"]:
        check_dp_compatible(model, name=f"model {name!r}")
    return model
