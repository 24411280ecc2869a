"""Encoder export and ``model.pretrained`` loading: weights equal the checkpoint's, key reports, mismatches."""

from __future__ import annotations

import pytest
import torch

from medseg_core.checkpoint import CheckpointError, save_checkpoint
from medseg_core.config import compose_config
from medseg_core.models import list_models, model_spatial_dims, tiny_config
from medseg_core.models.pretrained import (
    PretrainedMismatchError,
    load_pretrained_encoder,
    load_pretrained_from_config,
    model_config_hash,
    output_dependent_keys,
    read_encoder_checkpoint,
)
from medseg_core.workflow import build_configured_model, model_config
from pretrain.export import export_encoder
from pretrain.mae_transunet import TransUNetMAE
from pretrain.mae_vit import ViTMAE
from pretrain.mim import MaskedImageModel

TINY_DECODER = {"decoder_hidden_size": 16, "decoder_num_layers": 1, "decoder_num_heads": 2, "decoder_mlp_dim": 32}


def _cfg(name: str, dims: int = 3, **overrides) -> dict:
    return {"name": name, "in_channels": 1, "out_channels": 3, **tiny_config(name, dims), **overrides}


def _seg(cfg: dict) -> torch.nn.Module:
    torch.manual_seed(123)
    return build_configured_model(cfg)


def _trained(model: torch.nn.Module) -> torch.nn.Module:
    """Move every weight away from its initial value, as pretraining would."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1 + 0.05)
    return model


@pytest.mark.parametrize("pretrainer,name", [(MaskedImageModel, "unet"), (TransUNetMAE, "transunet3d"),
                                             (ViTMAE, "unetr")])
def test_loaded_weights_equal_the_checkpoints_and_the_report_is_clean(tmp_path, pretrainer, name):
    cfg = _cfg(name)
    kwargs = {} if pretrainer is MaskedImageModel else TINY_DECODER
    pre = _trained(pretrainer(cfg, **kwargs))
    path = export_encoder(pre, tmp_path / "encoder.pt", config_hash="abc", epoch=3)
    payload = read_encoder_checkpoint(path)
    meta = payload["encoder"]
    assert meta["model_name"] == name and meta["method"] == pre.method and meta["config_hash"] == "abc"
    assert meta["model_config_hash"] == model_config_hash(cfg)
    assert meta["keys"] == sorted(payload["state_dict"]) and payload["epoch"] == 3

    seg = _seg(cfg)
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    report = load_pretrained_encoder(seg, path, model_config=cfg)
    assert report.clean and report.applied and not report.config_differences
    assert sorted(report.loaded) == meta["keys"]
    after = seg.state_dict()
    for key, value in payload["state_dict"].items():
        assert torch.equal(after[key], value), key
        assert not torch.equal(before[key], value) or value.numel() == 0 or key.endswith("num_batches_tracked")
    for key in report.initialised:  # decoder and head: untouched
        assert torch.equal(after[key], before[key]), key
    assert set(report.loaded) | set(report.initialised) == set(after)
    assert "loaded" in report.summary() and report.as_dict()["clean"] is True


def test_cnn_encoder_leaves_out_the_head_whose_shape_depends_on_the_classes(tmp_path):
    cfg = _cfg("unet")
    head = output_dependent_keys(cfg)
    assert head and all(k.startswith("model.2") for k in head)  # MONAI UNet's last up-layer
    pre = _trained(MaskedImageModel(cfg))
    payload = read_encoder_checkpoint(export_encoder(pre, tmp_path / "e.pt"))
    assert not set(head) & set(payload["state_dict"])
    assert payload["encoder"]["scope"] == {"prefixes": [""], "excluded": head}
    # the encoder fits a model with another number of classes too
    other = {**cfg, "out_channels": 5}
    report = load_pretrained_encoder(_seg(other), tmp_path / "e.pt", model_config=other)
    assert report.clean and sorted(report.initialised) == head


@pytest.mark.parametrize("name", list_models())
def test_every_model_names_its_head_keys_without_touching_the_random_state(name):
    """Swin-UNETR cannot be built on the meta device (MONAI calls ``.item()`` in its constructor):
    masked-image pretraining of it used to crash before the first step."""
    dims = 3 if 3 in model_spatial_dims(name) else 2
    cfg = _cfg(name, dims)
    torch.manual_seed(5)
    head = output_dependent_keys(cfg)
    drawn = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.rand(1)), "building the stand-in models consumed random numbers"
    assert head, name  # every model's last layer depends on the number of classes


def test_a_mismatch_is_an_error_unless_allowed_and_leaves_the_model_unchanged(tmp_path):
    path = export_encoder(_trained(MaskedImageModel(_cfg("unet"))), tmp_path / "e.pt")
    wider = _cfg("unet", channels=(4, 8, 32))
    seg = _seg(wider)
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    with pytest.raises(PretrainedMismatchError, match="other shapes") as info:
        load_pretrained_encoder(seg, path, model_config=wider)
    assert info.value.report.mismatched and not info.value.report.applied
    assert all(torch.equal(v, before[k]) for k, v in seg.state_dict().items())

    report = load_pretrained_encoder(seg, path, allow_mismatch=True, model_config=wider)
    assert report.applied and not report.clean and report.loaded and report.mismatched
    assert report.config_differences == ["channels"]
    payload = read_encoder_checkpoint(path)
    for key in report.loaded:
        assert torch.equal(seg.state_dict()[key], payload["state_dict"][key])
    for key in report.mismatched:
        assert torch.equal(seg.state_dict()[key], before[key])


def test_another_model_is_refused_with_unexpected_and_missing_keys(tmp_path):
    path = export_encoder(TransUNetMAE(_cfg("transunet3d"), **TINY_DECODER), tmp_path / "t.pt")
    cfg = _cfg("unetr")
    with pytest.raises(PretrainedMismatchError) as info:
        load_pretrained_encoder(_seg(cfg), path, model_config=cfg)
    report = info.value.report
    assert report.name_mismatch and report.unexpected and not report.loaded
    assert "transunet3d" in str(info.value)
    # a ViT encoder whose blocks are missing from the checkpoint
    vit = ViTMAE(cfg, **TINY_DECODER)
    state = vit.encoder_state_dict()
    dropped = {k: v for k, v in state.items() if not k.startswith("vit.blocks.11.")}
    from medseg_core.models.pretrained import save_encoder_checkpoint

    save_encoder_checkpoint(tmp_path / "v.pt", dropped, model_config=cfg, scope_prefixes=["vit."], method="mae_vit")
    with pytest.raises(PretrainedMismatchError, match="missing") as info:
        load_pretrained_encoder(_seg(cfg), tmp_path / "v.pt", model_config=cfg)
    assert all(k.startswith("vit.blocks.11.") for k in info.value.report.missing)


def test_bad_files_fail_clearly(tmp_path):
    seg = _seg(_cfg("unet"))
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained_encoder(seg, tmp_path / "nope.pt")
    save_checkpoint(tmp_path / "full.pt", state_dict=seg.state_dict(), model_config=_cfg("unet"))
    with pytest.raises(CheckpointError, match="not an encoder checkpoint"):
        load_pretrained_encoder(seg, tmp_path / "full.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_pretrained_encoder(seg, tmp_path / "junk.pt")


def test_model_pretrained_in_a_training_config_loads_the_encoder(tmp_path):
    """What ``medseg-train model.pretrained=PATH`` does after building its model."""
    tiny = ["model.channels=[4,8,16]", "model.strides=[2,2]", "model.num_res_units=1"]
    plain = compose_config("train", tiny)
    kwargs = model_config(plain.model, in_channels=1, out_channels=3)
    path = export_encoder(_trained(MaskedImageModel(kwargs)), tmp_path / "encoder.pt")
    assert load_pretrained_from_config(_seg(kwargs), plain.model, model_config=kwargs) is None

    cfg = compose_config("train", [*tiny, f"model.pretrained={path}"])
    kwargs = model_config(cfg.model, in_channels=1, out_channels=3)  # pops `pretrained`
    assert "pretrained" not in kwargs
    lines: list[str] = []
    seg = _seg(kwargs)
    report = load_pretrained_from_config(seg, cfg.model, model_config=kwargs, log=lines.append)
    assert report is not None and report.clean and lines and "missing 0" in lines[0]
    state = read_encoder_checkpoint(path)["state_dict"]
    assert all(torch.equal(seg.state_dict()[k], v) for k, v in state.items())

    wider = compose_config("train", ["model.channels=[4,8,32]", "model.strides=[2,2]", "model.num_res_units=1",
                                      f"model.pretrained={{path:{path},allow_mismatch:true}}"])
    kwargs = model_config(wider.model, in_channels=1, out_channels=3)
    report = load_pretrained_from_config(_seg(kwargs), wider.model, model_config=kwargs, log=None)
    assert report.applied and report.mismatched
    with pytest.raises(ValueError, match="expected a path"):
        load_pretrained_from_config(seg, {"pretrained": {"file": str(path)}})
    with pytest.raises(ValueError, match="allow_mismatch"):
        load_pretrained_from_config(seg, {"pretrained": {"path": str(path), "allow_mismatch": "yes"}})
