"""Static checks that a model can be trained with DP-SGD (Opacus) and give correct per-sample gradients.

Opacus is deliberately *not* imported here (``medseg_core`` stays framework-agnostic); the checks
encode what Opacus 1.6's ``GradSampleModule`` needs, and ``tests/models/test_model_dp.py`` verifies
both the rules (against Opacus itself) and every registered model (per-sample gradients against
one-at-a-time autograd).

How Opacus computes per-sample gradients: every module with *direct* trainable parameters gets a
forward hook (saves its input) and a full backward hook. Modules whose exact type has a registered
grad sampler (:data:`HOOKED_TYPES`) use closed-form formulas; any other module with direct
parameters (``PReLU``, ``ConvTranspose``, our weight-standardised convs, a bare position-embedding
``nn.Parameter``) is handled by ``torch.func`` (vmap over the batch), re-running that module's
forward on its *first* input only, and its whole sub-tree with it. Hence the rules below.
"""

from __future__ import annotations

import inspect
from collections import defaultdict

import torch.nn as nn
from monai.networks.blocks.dynunet_block import UnetResBlock
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

# Exact types with a closed-form grad sampler in Opacus 1.6 (GradSampleModule.GRAD_SAMPLERS);
# a test checks this tuple against Opacus so it cannot drift.
HOOKED_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.Embedding,
    nn.RMSNorm,
)


def _has_direct_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _required_positional(module: nn.Module) -> list[str]:
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):  # builtins without a signature
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in sig.parameters.values() if p.kind in kinds and p.default is p.empty]


def _under(names: list[str], prefixes: list[str]) -> bool:
    return any(n.startswith(p + ".") for n in names for p in prefixes)


def _functorch_modules(model: nn.Module, prefix: str = ""):
    """Yield (name, module) for the modules Opacus would hand to torch.func (mirrors its traversal)."""
    direct = _has_direct_trainable(model)
    if direct and type(model) not in HOOKED_TYPES:
        yield prefix or "<root>", model
        return  # Opacus does not recurse below a functorch-handled module
    for name, child in model.named_children():
        yield from _functorch_modules(child, f"{prefix}.{name}" if prefix else name)


def dp_problems(model: nn.Module) -> list[str]:
    """Everything in ``model`` that would make DP-SGD fail or silently compute wrong gradients.

    Checks: BatchNorm; InstanceNorm with running statistics; in-place activations and MONAI's in-place
    residual add (``UnetResBlock``); a module or a
    parameter reachable under two names (its per-sample gradient would be accumulated twice);
    torch.func-handled modules that hold buffers or whose ``forward`` needs more than one input.
    Unused parameters cannot be seen statically: the registry tests run a backward pass for that.

    Args:
        model: the network.

    Returns:
        One human-readable line per problem, naming the sub-module; empty when compatible.
    """
    problems: list[str] = []
    for name, m in model.named_modules():
        where = name or "<root>"
        if isinstance(m, _BatchNorm):
            problems.append(f"{where}: {type(m).__name__} mixes samples through batch statistics")
        elif isinstance(m, _InstanceNorm) and m.track_running_stats:
            problems.append(f"{where}: {type(m).__name__} tracks running statistics")
        if getattr(m, "inplace", False) is True:
            problems.append(f"{where}: in-place {type(m).__name__} breaks the per-sample gradient hooks")
        if type(m) is UnetResBlock:
            problems.append(f"{where}: MONAI UnetResBlock adds its residual in place (use disable_inplace)")

    # A module (or parameter) reachable under two names gets Opacus hooks twice -> 2x per-sample grads.
    module_names: dict[int, list[str]] = defaultdict(list)
    for name, m in model.named_modules(remove_duplicate=False):
        if any(True for _ in m.parameters()):
            module_names[id(m)].append(name)
    reported: list[str] = []
    for dup in sorted(
        (n for n in module_names.values() if len(n) > 1), key=lambda n: min(x.count(".") for x in n)
    ):
        if not _under(dup, reported):
            problems.append(
                f"module registered {len(dup)} times ({', '.join(dup)}): its gradients would count twice"
            )
            reported.extend(dup)
    param_names: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        param_names[id(p)].append(name)
    for dup in param_names.values():
        if len(dup) > 1 and not _under(dup, reported):
            problems.append(f"parameter shared under {len(dup)} names ({', '.join(dup)})")

    for name, m in _functorch_modules(model):
        buffers = [b for b, _ in m.named_buffers()]
        if buffers:
            problems.append(
                f"{name}: {type(m).__name__} needs torch.func per-sample gradients but holds buffers {buffers}"
            )
        required = _required_positional(m)
        if len(required) > 1:
            problems.append(
                f"{name}: {type(m).__name__} needs torch.func per-sample gradients but its forward takes "
                f"{len(required)} inputs {required} (only the first is replayed)"
            )
    return problems


def check_dp_compatible(model: nn.Module, *, name: str = "model") -> None:
    """Raise ``ValueError`` listing :func:`dp_problems` when there are any."""
    problems = dp_problems(model)
    if problems:
        raise ValueError(f"{name} is not DP-compatible:\n  " + "\n  ".join(problems))
