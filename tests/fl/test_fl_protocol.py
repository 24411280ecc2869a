"""Pure helpers both sides of the federation share (medseg_core.federation): no Flower involved."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medseg_core.config import config_hash, load_config
from medseg_core.federation import (
    aggregate_by_cases,
    check_arrays,
    check_safe_name,
    local_keys,
    norm_state_keys,
    parameter_keys,
    protocol_hash,
    resume_identity,
    round_seed,
    scaffold_control_update,
    scaffold_server_update,
    weighted_mean,
    wire_arrays,
)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 3)
        self.bn = torch.nn.BatchNorm3d(4)
        self.inorm = torch.nn.InstanceNorm3d(4, affine=True)
        self.gn = torch.nn.GroupNorm(2, 4)
        self.ln = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 2)


def test_norm_keys_cover_every_normalisation_layer_and_nothing_else():
    net = _Net()
    keys = norm_state_keys(net)
    assert set(keys) == {
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
        "inorm.weight",
        "inorm.bias",
        "gn.weight",
        "gn.bias",
        "ln.weight",
        "ln.bias",
    }
    assert local_keys(net, "norm") == keys and local_keys(net, None) == []
    assert parameter_keys(net) == [n for n, _ in net.named_parameters()]
    with pytest.raises(ValueError, match="keep_local"):
        local_keys(net, "everything")


def test_check_arrays_reports_every_kind_of_bad_update():
    expected = {"a": (2, 2), "b": (3,)}
    assert check_arrays({"a": np.zeros((2, 2)), "b": np.ones(3)}, expected) == []
    problems = check_arrays({"a": np.zeros((3, 2)), "c": np.ones(1)}, expected)
    assert any("lacks 1" in p for p in problems) and any("unexpected" in p for p in problems)
    assert any("shape (3, 2)" in p for p in problems)
    nan = check_arrays({"a": np.full((2, 2), np.nan), "b": np.array([1.0, np.inf, 0.0])}, expected)
    assert len(nan) == 2 and "4 NaN/Inf" in nan[0] and "1 NaN/Inf" in nan[1]


def test_metrics_are_weighted_by_cases_and_nan_aware():
    assert weighted_mean([1.0, 3.0], [1, 3]) == pytest.approx(2.5)
    assert weighted_mean([1.0, math.nan], [1, 3]) == pytest.approx(1.0)
    assert math.isnan(weighted_mean([math.nan], [2]))
    with pytest.raises(ValueError):
        weighted_mean([1.0], [1, 2])
    agg = aggregate_by_cases(
        {
            "a": {"dice": 0.5, "dice/x/n": 2, "num-examples": 2},
            "b": {"dice": 0.8, "dice/x/n": 1, "num-examples": 6},
        }
    )
    assert agg["dice"] == pytest.approx((0.5 * 2 + 0.8 * 6) / 8)
    assert agg["dice/x/n"] == 3 and agg["num-examples"] == 8


def test_scaffold_updates_follow_the_paper():
    # Karimireddy et al. 2020, Alg. 1: two of N=3 sites reply, server step eta_g = 0.5
    x = {"w": np.array([1.0, 2.0], np.float32)}
    c = {"w": np.array([0.1, -0.1], np.float32)}
    ys = [{"w": np.array([0.5, 2.5], np.float32)}, {"w": np.array([1.5, 1.0], np.float32)}]
    dcs = [{"w": np.array([0.2, 0.0], np.float32)}, {"w": np.array([-0.4, 0.6], np.float32)}]
    x_new, c_new = scaffold_server_update(x, c, ys, dcs, num_nodes_total=3, global_lr=0.5)
    # x + eta_g * mean(y_i - x) ; c + |S|/N * mean(delta c_i)
    np.testing.assert_allclose(x_new["w"], [1.0, 1.875], rtol=1e-6)
    np.testing.assert_allclose(c_new["w"], [0.1 + 2 / 3 * -0.1, -0.1 + 2 / 3 * 0.3], rtol=1e-6)
    # a site: K = 4 plain SGD steps of size lr on the corrected gradient g_k + c - c_i ...
    c_i = {"w": np.array([0.05, 0.05], np.float32)}
    grads = [np.array(g, np.float32) for g in ([0.4, -1.0], [0.2, 0.6], [-0.3, 0.1], [1.1, 0.5])]
    lr = 0.25
    y = x["w"] - lr * sum(g + c["w"] - c_i["w"] for g in grads)
    c_plus, delta = scaffold_control_update(c_i, {"w": np.mean(grads, axis=0)})
    # ... c_i+ (the mean gradient) is option II's c_i - c + (x - y_i) / (K lr)
    np.testing.assert_allclose(c_plus["w"], c_i["w"] - c["w"] + (x["w"] - y) / (4 * lr), rtol=1e-5)
    np.testing.assert_allclose(c_plus["w"], [0.35, 0.05], rtol=1e-5)
    np.testing.assert_allclose(delta["w"], c_plus["w"] - c_i["w"], rtol=1e-6)
    with pytest.raises(ValueError, match="SCAFFOLD"):
        scaffold_control_update(c_i, {"w": np.zeros(3, np.float32)})
    with pytest.raises(ValueError):
        scaffold_server_update(x, c, ys, dcs, num_nodes_total=1)


def test_round_seed_is_a_function_of_seed_round_and_site_only():
    assert round_seed(0, 3, "site_00") == round_seed(0, 3, "site_00")
    assert (
        len(
            {
                round_seed(0, 3, "site_00"),
                round_seed(0, 4, "site_00"),
                round_seed(0, 3, "site_01"),
                round_seed(1, 3, "site_00"),
            }
        )
        == 4
    )


def test_names_from_the_network_are_checked():
    assert check_safe_name("fl-20260101-120000") == "fl-20260101-120000"
    for bad in ("../etc", "a/b", "", ".", "x" * 200):
        with pytest.raises(ValueError):
            check_safe_name(bad)


def test_resume_identity_ignores_only_resume_and_round_count():
    base = load_config({"experiment": "fl_smoke"})
    same = load_config({"experiment": "fl_smoke", "overrides": "fl.resume=true fl.num_rounds=7"})
    other = load_config({"experiment": "fl_smoke", "overrides": "fl.local_epochs=3"})
    assert resume_identity(base) == resume_identity(same)
    assert config_hash(base) != config_hash(same)
    assert resume_identity(base) != resume_identity(other)


def test_protocol_hash_ignores_where_each_party_keeps_files_but_not_what_is_trained():
    a = load_config({"experiment": "fl_smoke", "overrides": "data.cache_dir=/server/cache paths.run_dir=/r"})
    b = load_config({"experiment": "fl_smoke", "overrides": "data.cache_dir=/hospital/cache fl.state_dir=/s"})
    c = load_config({"experiment": "fl_smoke", "overrides": "model.channels=[4,8,32]"})
    assert protocol_hash(a) == protocol_hash(b) != protocol_hash(c)


def test_wire_arrays_keep_zero_d_arrays_zero_d_and_make_views_contiguous():
    arrays = {"bn.num_batches_tracked": np.array(7, dtype=np.int64), "w": np.arange(6.0).reshape(2, 3).T}
    out = wire_arrays(arrays)
    assert list(out) == list(arrays)
    assert out["bn.num_batches_tracked"].shape == () and int(out["bn.num_batches_tracked"]) == 7
    assert out["w"].flags.c_contiguous and np.array_equal(out["w"], arrays["w"])
    assert np.ascontiguousarray(arrays["bn.num_batches_tracked"]).shape == (1,)  # what went wrong before


def test_received_arrays_are_converted_one_thread_at_a_time():
    """Sites that are threads of one process (InProcessGrid) must not np.load at once (CPython gh-106905)."""
    import threading
    import time

    from flwr.app import Array

    from medseg_core.federation import arrays_to_numpy

    state = {"active": 0, "peak": 0}
    guard = threading.Lock()

    class Counting(Array):
        def numpy(self):
            with guard:
                state["active"] += 1
                state["peak"] = max(state["peak"], state["active"])
            time.sleep(0.005)
            out = super().numpy()
            with guard:
                state["active"] -= 1
            return out

    arrays = {f"w{i}": np.full((3, 2), i, dtype=np.float32) for i in range(4)}
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        arrays_to_numpy((k, Counting(v)) for k, v in arrays.items()))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state["peak"] == 1 and len(results) == 6
    for got in results:
        assert all(np.array_equal(got[k], arrays[k]) for k in arrays)
