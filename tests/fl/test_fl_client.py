"""The site side without Flower's runtime: which site a node is, its state files, local training."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from fl_helpers import run_config
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from omegaconf import OmegaConf

from client.app import ConfigMismatchError
from client.app import app as client_app
from client.local import (
    CONTROL,
    LOCAL,
    OPTIM,
    TrainInstructions,
    UpdateError,
    build_site_model,
    load_weights,
    train_round,
)
from client.site import SiteConfigError, SiteState, cached_bytes, resolve_site, site_data, trim_cache
from medseg_core.config import load_config
from medseg_core.data.dataset import load_site
from medseg_core.data.fingerprint import plan_federation
from medseg_core.data.source import ensure_data_root
from medseg_core.federation import CONFIG, FINGERPRINT_ACTION, KEY_CONFIG_HASH, KEY_RUN_NAME, norm_state_keys
from server.inprocess import InProcessGrid


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cache = tmp_path_factory.mktemp("fl-client")
    cfg = load_config(run_config(cache))
    root = ensure_data_root(cfg.data)
    ref = resolve_site(cfg, {"partition-id": 0, "num-partitions": 2})
    data = site_data(ref, cfg, _plan_of(load_site(ref.data_dir)))
    return cache, cfg, root, ref, data


def _plan_of(site):
    return plan_federation([site])[2]


def test_simulated_partitions_map_to_sites_and_deployments_name_their_folder(setup, tmp_path):
    cache, cfg, root, _ref, _data = setup
    refs = [resolve_site(cfg, {"partition-id": i, "num-partitions": 2}) for i in range(2)]
    assert [r.name for r in refs] == ["site_00", "site_01"] and not refs[0].note
    assert refs[1].state_root == cache / "site-state" / "site_01"
    one = resolve_site(cfg, {"partition-id": 0, "num-partitions": 1})
    assert "site_01" in one.note and "num-supernodes=2" in one.note
    with pytest.raises(SiteConfigError, match="only 2 site"):
        resolve_site(cfg, {"partition-id": 2, "num-partitions": 3})
    dep = resolve_site(
        cfg, {"site-dir": str(root / "site_01"), "state-dir": str(tmp_path / "st"), "site-id": "hospital_b"}
    )
    assert (dep.name, dep.data_dir, dep.state_root) == ("hospital_b", root / "site_01", tmp_path / "st")
    with pytest.raises(SiteConfigError, match="is not a folder"):
        resolve_site(cfg, {"site-dir": str(tmp_path / "nope")})
    with pytest.raises(SiteConfigError, match="names no site"):
        resolve_site(cfg, {})
    with pytest.raises(ValueError, match="not a safe name"):
        resolve_site(cfg, {"site-dir": str(root / "site_01"), "site-id": "../x"})


def test_site_state_reads_the_newest_round_before_the_current_one(tmp_path):
    state = SiteState(tmp_path, "run-1")
    assert state.load(LOCAL, 5) is None
    for r in (1, 2, 3):
        state.save(CONTROL, r, {"c": np.full(2, float(r))}, keep=2)
    assert sorted(p.name for p in state.dir.iterdir()) == ["control_0002.pt", "control_0003.pt"]
    np.testing.assert_array_equal(state.load(CONTROL, 3)["c"], [2.0, 2.0])  # round 3 reads round 2's
    np.testing.assert_array_equal(state.load(CONTROL, 9)["c"], [3.0, 3.0])
    with pytest.raises(ValueError):
        SiteState(tmp_path, "../escape")


def test_site_state_round_trips_arrays_as_tensors_and_reads_older_numpy_files(tmp_path):
    state = SiteState(tmp_path, "run-1")
    arrays = {"w/exp_avg": np.arange(6, dtype=np.float32).reshape(2, 3), "w/step": np.asarray(7.0),
              "n": np.asarray([1, 2], dtype=np.int64), "view": np.arange(10, dtype=np.float32)[::2]}
    path = state.save(OPTIM, 1, arrays)
    stored = torch.load(path, weights_only=True)  # plain tensors: fast to write and read, no pickled NumPy
    assert all(torch.is_tensor(v) for v in stored.values())
    back = state.load(OPTIM, 2)
    assert set(back) == set(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    torch.save({"c": np.full(3, 5.0)}, state.dir / "control_0001.pt")  # as sessions 1-6 wrote them
    np.testing.assert_array_equal(state.load(CONTROL, 2)["c"], [5.0, 5.0, 5.0])


def test_the_client_refuses_a_server_with_another_configuration(setup):
    cache, _cfg, _root, _ref, _data = setup
    rc = run_config(cache)
    InProcessGrid([client_app], [{}])  # sets the message identity
    msg = Message(
        RecordDict({CONFIG: ConfigRecord({KEY_CONFIG_HASH: "0123456789abcdef", KEY_RUN_NAME: "r"})}),
        dst_node_id=5,
        message_type=f"{MessageType.QUERY}.{FINGERPRINT_ACTION}",
    )
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=rc,
    )
    with pytest.raises(ConfigMismatchError, match="configuration mismatch"):
        client_app._registered_funcs[f"query.{FINGERPRINT_ACTION}"](msg, context)


def test_received_weights_are_checked_and_local_keys_kept(setup):
    _cache, cfg, _root, _ref, data = setup
    plan = _plan_of(data.site)
    model = build_site_model(cfg, data, plan)
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    norm = norm_state_keys(model)
    shared = load_weights(model, state, norm, {k: state[k] + 1 for k in norm})
    assert set(shared) == set(state) - set(norm)
    assert torch.equal(model.state_dict()[norm[0]], torch.as_tensor(state[norm[0]] + 1))
    bad = dict(state)
    bad[shared[0]] = np.zeros(7, np.float32)
    with pytest.raises(UpdateError, match="shape"):
        load_weights(model, bad, [], None)
    missing = {k: v for k, v in state.items() if k != shared[-1]}
    with pytest.raises(UpdateError, match="lacks 1"):
        load_weights(model, missing, [], None)


def _distance(a, b, keys):
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in keys))


def test_fedprox_term_keeps_the_site_close_to_the_global_model(setup, tmp_path):
    _cache, cfg, _root, _ref, data = setup
    plan = _plan_of(data.site)
    model = build_site_model(cfg, data, plan)
    glob = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    keys = [n for n, _ in model.named_parameters()]
    # several steps: the proximal gradient mu * (w - w_global) is zero at the first one
    free = train_round(
        cfg, data, plan, glob, TrainInstructions(1, lr=0.05, local_epochs=6), SiteState(tmp_path, "a")
    )
    prox = train_round(
        cfg,
        data,
        plan,
        glob,
        TrainInstructions(1, lr=0.05, local_epochs=6, proximal_mu=1e4),
        SiteState(tmp_path, "b"),
    )
    assert free.metrics["num-examples"] == prox.metrics["num-examples"] == data.num_train_cases
    assert _distance(prox.arrays, glob, keys) < 0.2 * _distance(free.arrays, glob, keys)
    again = train_round(
        cfg, data, plan, glob, TrainInstructions(1, lr=0.05, local_epochs=6), SiteState(tmp_path, "c")
    )
    for k in free.arrays:  # the same round at the same site draws the same crops
        np.testing.assert_array_equal(free.arrays[k], again.arrays[k])


def _with(cfg, **dotted):
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, value in dotted.items():
        OmegaConf.update(c, key.replace("__", "."), value)
    return c


def test_scaffold_control_variate_is_the_mean_gradient_which_is_option_ii_under_plain_sgd(setup, tmp_path):
    _cache, cfg, _root, _ref, data = setup
    plan = _plan_of(data.site)
    model = build_site_model(cfg, data, plan)
    glob = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    params = [n for n, _ in model.named_parameters()]
    control = {k: np.zeros_like(glob[k]) for k in params}
    lr = 0.01
    sgd = _with(cfg, optim={"_target_": "torch.optim.SGD", "_partial_": True, "lr": lr}, train__grad_clip_norm=None)
    state = SiteState(tmp_path, "s")
    out = train_round(sgd, data, plan, glob, TrainInstructions(1, lr=lr, control=control), state)
    steps = int(out.metrics["num-steps"])
    c_plus = state.load(CONTROL, 2)
    assert set(c_plus) == set(params) and set(out.delta_control) == set(params)
    moved = 0
    for k in params:  # c = c_i = 0 and plain SGD: c_i+ = (x - y) / (K lr) (option II), sent as c_i+ - c_i
        option_ii = (glob[k] - out.arrays[k]) / (steps * lr)
        np.testing.assert_allclose(c_plus[k], option_ii, rtol=2e-3, atol=2e-5)
        np.testing.assert_allclose(out.delta_control[k], c_plus[k], rtol=1e-6)
        moved += float(np.abs(option_ii).sum())
    assert moved > 0

    # AdamW moves every weight by about lr per step whatever its gradient: the displacement is no
    # measure of the gradient there (option II blew SCAFFOLD up), the mean gradient still is
    adam = _with(cfg, optim={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": lr})
    state = SiteState(tmp_path, "a")
    out = train_round(adam, data, plan, glob, TrainInstructions(1, lr=lr, control=control), state)
    steps = int(out.metrics["num-steps"])
    c_plus = state.load(CONTROL, 2)
    displacement = np.concatenate([((glob[k] - out.arrays[k]) / (steps * lr)).ravel() for k in params])
    mean_grad = np.concatenate([c_plus[k].ravel() for k in params])
    assert np.isfinite(mean_grad).all() and np.abs(mean_grad).sum() > 0
    assert np.linalg.norm(mean_grad) < 0.1 * np.linalg.norm(displacement)
    with pytest.raises(ValueError):
        TrainInstructions(0, lr=0.1)
    with pytest.raises(ValueError):
        TrainInstructions(1, lr=float("nan"))


def test_a_site_carries_its_optimiser_state_between_rounds_when_asked(setup, tmp_path):
    _cache, cfg, _root, _ref, data = setup
    plan = _plan_of(data.site)
    model = build_site_model(cfg, data, plan)
    glob = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    kept = _with(cfg, fl__keep_optimizer_state=True)
    state = SiteState(tmp_path, "k")
    first = train_round(kept, data, plan, glob, TrainInstructions(1, lr=0.01), state)
    k1 = int(first.metrics["num-steps"])
    moments = state.load(OPTIM, 2)
    weight = next(n for n, p in model.named_parameters() if p.ndim > 1)
    assert float(moments[f"{weight}/step"]) == k1 and np.abs(moments[f"{weight}/exp_avg_sq"]).sum() > 0
    second = train_round(kept, data, plan, first.arrays, TrainInstructions(2, lr=0.01), state)
    k2 = int(second.metrics["num-steps"])
    assert float(state.load(OPTIM, 3)[f"{weight}/step"]) == k1 + k2  # Adam's count went on from round 1
    assert float(state.load(OPTIM, 2)[f"{weight}/step"]) == k1  # a resumed round 2 starts from round 1's
    # the same round from a fresh optimiser is a different update
    off = _with(cfg, fl__keep_optimizer_state=False)
    fresh = train_round(off, data, plan, first.arrays, TrainInstructions(2, lr=0.01), SiteState(tmp_path, "f"))
    assert any(not np.array_equal(fresh.arrays[k], second.arrays[k]) for k in fresh.arrays)
    assert not list((tmp_path / "f").glob("optim_*"))  # switched off: nothing written
    # a state file of another model is refused, naming where it is
    state.save(OPTIM, 3, {"no.such.layer/exp_avg": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"optimiser state in .*k.*no\.such\.layer"):
        train_round(kept, data, plan, second.arrays, TrainInstructions(4, lr=0.01), state)


def test_process_cache_keeps_every_site_that_fits_and_drops_the_oldest_beyond_the_budget(setup):
    _cache, cfg, _root, _ref, data = setup
    size = cached_bytes(data.loaders.train, data.loaders.val)
    # the in-memory cache holds the site's preprocessed volumes: images + labels of its training cases
    first = data.loaders.train.dataset._cache[0]
    assert size >= len(data.loaders.train.dataset) * first["image"].nelement() * first["image"].element_size()

    def with_budget(gb):
        c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        c.data.process_cache_gb = gb
        return c

    def cache_of(n):
        return OrderedDict((f"site_{i:02d}", data) for i in range(n))

    roomy = with_budget(10 * size / 2**30)  # ten sites' worth
    ten = cache_of(10)
    trim_cache(ten, roomy, lambda d: cached_bytes(d.loaders.train, d.loaders.val))
    assert len(ten) == 10  # a simulation actor serving 10 small sites rebuilds none of them

    tight = with_budget(3.5 * size / 2**30)
    ten = cache_of(10)
    trim_cache(ten, tight, lambda d: cached_bytes(d.loaders.train, d.loaders.val))
    assert list(ten) == ["site_07", "site_08", "site_09"]  # least recently used dropped first

    tiny = with_budget(0.0)
    one = cache_of(3)
    trim_cache(one, tiny, lambda d: cached_bytes(d.loaders.train, d.loaders.val))
    assert list(one) == ["site_02"]  # the entry in use always stays
