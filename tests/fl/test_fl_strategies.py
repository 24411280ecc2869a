"""Strategies built from config, tested Prepare / Execute / Assert with hand-built reply Messages."""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedProx

import configs
from medseg_core.config import load_config
from medseg_core.federation import (
    ARRAYS,
    CONFIG,
    KEY_PROXIMAL_MU,
    KEY_SITE_NAME,
    METRICS,
    NUM_EXAMPLES,
    SCAFFOLD_CONTROL,
    SCAFFOLD_DELTA_CONTROL,
    SITE,
    TRAIN_LOSS,
    norm_state_keys,
    parameter_keys,
)
from server.inprocess import InProcessGrid
from server.strategies import (
    FedBN,
    Scaffold,
    build_strategy,
    load_strategy_state,
    strategy_state,
    to_numpy,
    to_record,
)

STRATEGIES = sorted(p.stem for p in (Path(configs.__file__).parent / "strategy").glob("*.yaml"))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)
        self.norm = torch.nn.InstanceNorm3d(2, affine=True)
        self.head = torch.nn.Conv3d(2, 2, 1)


def _cfg(strategy: str, extra: str = ""):
    return load_config({"overrides": f"strategy={strategy} {extra}".strip()})


def _grid(n: int) -> InProcessGrid:
    return InProcessGrid([lambda m, c: m] * n, [{} for _ in range(n)])  # configure_* only lists nodes


def _reply(
    to: Message,
    site: str,
    cases: int,
    arrays: dict[str, np.ndarray] | None = None,
    loss: float = 1.0,
    **extra,
) -> Message:
    content = RecordDict(
        {
            SITE: ConfigRecord({KEY_SITE_NAME: site}),
            METRICS: MetricRecord({NUM_EXAMPLES: cases, TRAIN_LOSS: loss}),
        }
    )
    if arrays is not None:
        content[ARRAYS] = to_record(arrays)
    for name, value in extra.items():
        content[name] = to_record(value)
    return Message(content, reply_to=to)


def _global(net: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_config_builds_with_the_fl_sampling_settings(name):
    cfg = _cfg(name, "fl.fraction_train=0.5 fl.min_train_nodes=3")
    strategy = build_strategy(cfg, _Net())
    target = hydra.utils.get_class(cfg.strategy.server._target_)
    assert type(strategy) is target
    assert strategy.fraction_train == 0.5 and strategy.min_train_nodes == 3
    assert strategy.weighted_by_key == NUM_EXAMPLES


def test_fedavg_weights_sites_by_training_cases():
    # Prepare
    net = _Net()
    strategy = build_strategy(_cfg("fedavg"), net)
    glob = _global(net)
    sent = list(strategy.configure_train(1, to_record(glob), ConfigRecord({}), _grid(2)))
    a = {k: np.zeros_like(v) for k, v in glob.items()}
    b = {k: np.full_like(v, 4.0) for k, v in glob.items()}
    replies = [_reply(sent[0], "a", 1, a, loss=1.0), _reply(sent[1], "b", 3, b, loss=2.0)]
    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)
    # Assert: (1 * 0 + 3 * 4) / 4 = 3, and the loss is case-weighted too
    for k, v in to_numpy(arrays).items():
        np.testing.assert_allclose(v, np.full_like(glob[k], 3.0), rtol=1e-6)
    assert metrics[TRAIN_LOSS] == pytest.approx((1 * 1.0 + 3 * 2.0) / 4)
    assert metrics[NUM_EXAMPLES] == 4


def test_fedprox_sends_mu_to_the_sites():
    strategy = build_strategy(_cfg("fedprox", "strategy.server.proximal_mu=0.25"), _Net())
    assert isinstance(strategy, FedProx)
    sent = list(strategy.configure_train(1, to_record(_global(_Net())), ConfigRecord({}), _grid(2)))
    assert all(m.content[CONFIG][KEY_PROXIMAL_MU] == 0.25 for m in sent)


def test_fedbn_never_sends_or_aggregates_normalisation_weights():
    # Prepare
    net = _Net()
    strategy = build_strategy(_cfg("fedbn"), net)
    assert isinstance(strategy, FedBN)
    norm = set(norm_state_keys(net))
    assert norm == {"norm.weight", "norm.bias"}
    glob = _global(net)
    # Execute
    train_msgs = list(strategy.configure_train(1, to_record(glob), ConfigRecord({}), _grid(2)))
    eval_msgs = list(strategy.configure_evaluate(1, to_record(glob), ConfigRecord({}), _grid(2)))
    shared = {k: v for k, v in glob.items() if k not in norm}
    replies = [
        _reply(train_msgs[0], "a", 2, {k: v + 1 for k, v in shared.items()}),
        _reply(train_msgs[1], "b", 2, {k: v + 3 for k, v in shared.items()}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert
    for msg in train_msgs + eval_msgs:
        assert set(msg.content[ARRAYS].keys()) == set(glob) - norm
    assert set(to_numpy(arrays)) == set(shared)
    for k, v in to_numpy(arrays).items():
        np.testing.assert_allclose(v, shared[k] + 2, rtol=1e-6)
    with pytest.raises(ValueError, match="keep_local"):
        build_strategy(_cfg("fedavg", "strategy.keep_local=norm"), net)


def test_scaffold_server_update_matches_the_paper():
    # Prepare: N = 3 sites, 2 sampled per round, eta_g = 0.5
    net = _Net()
    strategy = build_strategy(_cfg("scaffold", "strategy.server.global_lr=0.5 fl.fraction_train=0.67"), net)
    assert isinstance(strategy, Scaffold)
    glob = _global(net)
    keys = parameter_keys(net)
    grid = _grid(3)
    sent = list(strategy.configure_train(1, to_record(glob), ConfigRecord({}), grid))
    assert len(sent) == 2
    for msg in sent:  # c starts at zero and covers the trainable parameters
        c = to_numpy(msg.content[SCAFFOLD_CONTROL])
        assert set(c) == set(keys) and all(not v.any() for v in c.values())
    rng = np.random.default_rng(0)
    ys = [{k: v + rng.normal(size=v.shape).astype(v.dtype) for k, v in glob.items()} for _ in sent]
    dcs = [{k: rng.normal(size=glob[k].shape).astype(np.float32) for k in keys} for _ in sent]
    replies = [
        _reply(m, f"s{i}", 1 + i, y, **{SCAFFOLD_DELTA_CONTROL: dc})
        for i, (m, y, dc) in enumerate(zip(sent, ys, dcs, strict=True))
    ]
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert: x + eta_g * (1/|S|) sum (y_i - x) ; c + |S|/N * (1/|S|) sum dc_i  (uniform, as in the paper)
    x_new = to_numpy(arrays)
    for k in glob:
        expected = glob[k] + 0.5 * ((ys[0][k] - glob[k]) + (ys[1][k] - glob[k])) / 2
        np.testing.assert_allclose(x_new[k], expected, rtol=1e-5, atol=1e-6)
    for k in keys:
        np.testing.assert_allclose(
            strategy.control[k], (2 / 3) * (dcs[0][k] + dcs[1][k]) / 2, rtol=1e-5, atol=1e-6
        )
    # the next round sends the updated c; the state survives a checkpoint
    nxt = list(strategy.configure_train(2, arrays, ConfigRecord({}), grid))
    np.testing.assert_allclose(to_numpy(nxt[0].content[SCAFFOLD_CONTROL])[keys[0]], strategy.control[keys[0]])
    fresh = build_strategy(_cfg("scaffold"), net)
    load_strategy_state(fresh, strategy_state(strategy))
    for k in keys:
        np.testing.assert_array_equal(fresh.control[k], strategy.control[k])


def test_fedadam_server_moments_survive_a_checkpoint():
    net = _Net()
    glob = _global(net)

    def one_round(strategy, r, arrays):
        sent = list(strategy.configure_train(r, to_record(arrays), ConfigRecord({}), _grid(2)))
        replies = [
            _reply(m, f"s{i}", 2, {k: v + 0.1 * (i + r) for k, v in arrays.items()})
            for i, m in enumerate(sent)
        ]
        return to_numpy(strategy.aggregate_train(r, replies)[0])

    a = build_strategy(_cfg("fedadam"), net)
    assert isinstance(a, FedAdam)
    after1 = one_round(a, 1, glob)
    b = build_strategy(_cfg("fedadam"), net)
    load_strategy_state(b, strategy_state(a))
    assert b.m_t is not None and b.v_t is not None
    from_a, from_b = one_round(a, 2, after1), one_round(b, 2, after1)
    for k in from_a:
        np.testing.assert_array_equal(from_a[k], from_b[k])


def test_bad_sampling_settings_are_refused():
    for extra, match in (
        ("fl.fraction_train=0", "fraction_train"),
        ("fl.min_train_nodes=0", "min_train_nodes"),
    ):
        with pytest.raises(ValueError, match=match):
            build_strategy(_cfg("fedavg", extra), _Net())
