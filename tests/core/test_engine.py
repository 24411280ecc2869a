"""The engine trains, evaluates, honours its hooks, and runs unchanged under Opacus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg_core.engine import (
    build_optimizer,
    build_scheduler,
    evaluate,
    load_optimizer_state,
    optimizer_state_arrays,
    train_one_epoch,
)
from medseg_core.losses import build_loss
from medseg_core.models import build_model


def _toy_batches(n: int = 4, size: int = 16, seed: int = 0) -> list[dict]:
    """Bright squares on noise: label 1 where the square is."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        label = torch.zeros(2, 1, size, size, dtype=torch.long)
        for b in range(2):
            y, x = torch.randint(2, size - 8, (2,), generator=g).tolist()
            label[b, 0, y : y + 6, x : x + 6] = 1
        image = label.float() * 2 + 0.3 * torch.randn(2, 1, size, size, generator=g)
        batches.append({"image": image, "label": label, "case_id": ["a", "b"]})
    return batches


def _model():
    torch.manual_seed(0)
    return build_model("unet", spatial_dims=2, in_channels=1, out_channels=2, channels=[8, 16], strides=[2],
                       num_res_units=1)


def test_training_reduces_the_loss_and_evaluation_scores_it():
    model, data = _model(), _toy_batches()
    loss_fn = build_loss("dice_ce")
    opt = build_optimizer({"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.01}, model.parameters())
    first = train_one_epoch(model, data, loss_fn, opt, device=torch.device("cpu"), grad_clip_norm=1.0)
    for _ in range(25):
        last = train_one_epoch(model, data, loss_fn, opt, device=torch.device("cpu"))
    assert first["num_steps"] == 4 and first["num_samples"] == 8
    assert last["loss"] < 0.5 * first["loss"]
    res = evaluate(model, [{"image": b["image"][:1], "label": b["label"][:1], "case_id": ["x"]} for b in data],
                   device=torch.device("cpu"), roi_size=(16, 16), class_values={"square": 1})
    assert res["num_cases"] == 4 and res["mean_dice"] > 0.8
    assert set(res["cases"][0]["metrics"]["square"]) >= {"dice", "iou", "hd95_mm", "nsd"}


def test_hooks_are_called_and_change_the_update():
    data = _toy_batches(2)
    calls = {"extra": 0, "grad": 0}

    def extra(model):
        calls["extra"] += 1
        return sum((p**2).sum() for p in model.parameters()) * 0.0

    def zero_grads(model):  # a grad hook that cancels every gradient: no parameter may move
        calls["grad"] += 1
        for p in model.parameters():
            p.grad.zero_()

    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_one_epoch(model, data, build_loss("dice_ce"), opt, device=torch.device("cpu"), extra_loss=extra,
                    grad_hook=zero_grads)
    assert calls == {"extra": 2, "grad": 2}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_diverging_loss_stops_with_a_clear_error():
    model, data = _model(), _toy_batches(1)
    data[0]["image"][0, 0, 0, 0] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match="diverged"):
        train_one_epoch(model, data, build_loss("dice_ce"), opt, device=torch.device("cpu"))


def test_scheduler_from_config_and_constant_when_absent():
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    assert build_scheduler(None, opt) is None
    sched = build_scheduler({"_target_": "torch.optim.lr_scheduler.PolynomialLR", "_partial_": True,
                             "total_iters": 10, "power": 0.9}, opt)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx((1 - 1 / 10) ** 0.9)
    with pytest.raises(ValueError, match="_target_"):
        build_optimizer({"lr": 1}, [])


def test_engine_runs_unchanged_under_opacus():
    from opacus import PrivacyEngine

    model = build_model("unet", spatial_dims=2, in_channels=1, out_channels=2, channels=[8, 16], strides=[2],
                        num_res_units=1, dp_compatible=True)
    data = _toy_batches(4)
    dataset = torch.utils.data.TensorDataset(torch.cat([b["image"] for b in data]), torch.cat([b["label"] for b in data]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                             max_grad_norm=1.0, poisson_sampling=True)
    dict_loader = ({"image": x, "label": y} for x, y in loader)
    stats = train_one_epoch(model, dict_loader, build_loss("dice_ce"), opt, device=torch.device("cpu"))
    assert stats["num_steps"] >= 1
    assert engine.get_epsilon(delta=1e-3) > 0


@pytest.mark.parametrize("name", ["dynunet", "unetpp"])
def test_deep_supervision_models_train_with_the_wrapped_loss_and_a_plain_loss_says_why_not(name):
    torch.manual_seed(0)
    kwargs = {"deep_supervision": True}
    if name == "dynunet":
        kwargs.update(kernel_size=[3, 3, 3], strides=[1, 2, 2], filters=[4, 8, 16], deep_supr_num=1)
    else:
        kwargs.update(features=[4, 4, 8, 8, 16, 4])
    model = build_model(name, spatial_dims=2, in_channels=1, out_channels=2, **kwargs)
    data = _toy_batches(2, size=32)  # U-Net++ halves the input four times
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    stats = train_one_epoch(model, data, build_loss("dice_ce", deep_supervision=True), opt,
                            device=torch.device("cpu"))
    assert stats["num_steps"] == 2 and torch.isfinite(torch.tensor(stats["loss"]))
    with pytest.raises(ValueError, match="deep supervision.*loss.deep_supervision"):
        train_one_epoch(model, data, build_loss("dice_ce"), opt, device=torch.device("cpu"))


@pytest.mark.parametrize(
    "optim",
    [
        {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.01},
        {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05, "momentum": 0.9, "nesterov": True},
    ],
)
def test_optimiser_state_saved_as_arrays_continues_training_exactly(optim):
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.GroupNorm(2, 4),
                                   torch.nn.Conv2d(4, 2, 1))

    batches = _toy_batches(n=5)
    loss_fn = build_loss("dice_ce")
    whole = net()
    opt = build_optimizer(optim, whole.parameters())
    train_one_epoch(whole, batches, loss_fn, opt, device=torch.device("cpu"))

    split = net()
    opt = build_optimizer(optim, split.parameters())
    train_one_epoch(split, batches[:3], loss_fn, opt, device=torch.device("cpu"))
    arrays = optimizer_state_arrays(opt, split)
    assert arrays and all(isinstance(v, np.ndarray) for v in arrays.values())
    resumed = build_optimizer(optim, split.parameters())  # a new optimiser, as at the next round
    load_optimizer_state(resumed, split, arrays)
    train_one_epoch(split, batches[3:], loss_fn, resumed, device=torch.device("cpu"))
    for a, b in zip(whole.state_dict().values(), split.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    other = torch.nn.Conv2d(1, 3, 3)  # another model: refused, nothing restored
    fresh = build_optimizer(optim, other.parameters())
    with pytest.raises(ValueError, match=r"state\.pt does not match the model: .*0\.weight"):
        load_optimizer_state(fresh, other, arrays, source="state.pt")
    assert not fresh.state
