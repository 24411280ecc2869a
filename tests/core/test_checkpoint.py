from __future__ import annotations

import pytest
import torch

from medseg_core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    write_json,
)
from medseg_core.models import build_model

CFG = {"name": "unet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2]}


def test_roundtrip_rebuilds_the_same_model(tmp_path):
    kwargs = dict(CFG)
    model = build_model(kwargs.pop("name"), **kwargs)
    path = save_checkpoint(tmp_path / "a" / "best.pt", state_dict=model.state_dict(), model_config=CFG,
                           plan={"version": 1}, labels={"background": 0, "fg": 1}, channel_names={0: "CT"}, epoch=3)
    payload = load_checkpoint(path)
    assert payload["epoch"] == 3 and payload["channel_names"] == {0: "CT"}
    rebuilt = model_from_checkpoint(payload).eval()
    x = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(rebuilt(x), model.eval()(x))
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_bad_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a medseg checkpoint"):
        load_checkpoint(foreign)


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = write_json({"a": 1}, tmp_path / "h.json")
    with pytest.raises(Exception, match="pickle|lambda"):  # fails inside torch.save, mid-write
        save_checkpoint(path, state_dict={}, model_config=CFG, hook=lambda: 0)
    assert path.read_text().strip().startswith("{")  # the earlier file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["h.json"]  # and no temporary file is left


def test_nested_numpy_state_comes_back_as_numpy_and_is_stored_as_tensors(tmp_path):
    """Server optimiser moments, control variates and RNG states are NumPy; they are stored as tensors
    (torch pickles NumPy arrays slowly) and come back as the same arrays, containers and types."""
    import numpy as np

    m_t = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(2, np.float64)}
    rng = ("MT19937", np.arange(624, dtype=np.uint32), 3, 0, 0.0)
    extra = {"strategy_state": {"flower": {"m_t": m_t, "v_t": [np.ones(3, np.float32)]}},
             "rng": {"numpy": rng}, "scalar": np.asarray(2.5), "names": np.array(["a", None], dtype=object)}
    path = save_checkpoint(tmp_path / "s.pt", state_dict={}, model_config={"name": "unet"}, **extra)
    raw = torch.load(path, weights_only=False)
    assert torch.is_tensor(raw["strategy_state"]["flower"]["m_t"]["w"]["__medseg_ndarray__"])
    back = load_checkpoint(path)
    for k, v in m_t.items():
        got = back["strategy_state"]["flower"]["m_t"][k]
        assert isinstance(got, np.ndarray) and got.dtype == v.dtype
        np.testing.assert_array_equal(got, v)
    assert isinstance(back["strategy_state"]["flower"]["v_t"], list)
    assert isinstance(back["rng"]["numpy"], tuple) and back["rng"]["numpy"][1].dtype == np.uint32
    np.random.set_state(back["rng"]["numpy"])  # usable as it was
    assert float(back["scalar"]) == 2.5 and list(back["names"]) == ["a", None]
    # files written before (NumPy pickled as is) still load
    torch.save({"format": "medseg-checkpoint", "version": 1, "state_dict": {}, "model_config": {"name": "unet"},
                "strategy_state": {"own": {"control": {"w": np.full(2, 3.0)}}}}, tmp_path / "old.pt")
    np.testing.assert_array_equal(load_checkpoint(tmp_path / "old.pt")["strategy_state"]["own"]["control"]["w"], [3, 3])
