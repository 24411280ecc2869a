"""Pretraining models: CNN masked image modelling, TransUNet MAE (visible tokens only), MONAI MAE for
ViT/UNETR with the key mapping into our encoders; multi-channel inputs; argument errors."""

from __future__ import annotations

import pytest
import torch

from medseg_core.models import build_model, tiny_config
from pretrain.builder import build_pretrain_model, resolve_method
from pretrain.mae_transunet import TransUNetMAE
from pretrain.mae_vit import ViTMAE, mae_to_encoder_state
from pretrain.mim import MaskedImageModel, total_downsampling

TINY_DECODER = {"decoder_hidden_size": 16, "decoder_num_layers": 1, "decoder_num_heads": 2, "decoder_mlp_dim": 32}


def _cfg(name: str, dims: int, in_ch: int = 1, **overrides) -> dict:
    return {"name": name, "in_channels": in_ch, "out_channels": 3, **tiny_config(name, dims), **overrides}


def _step(model: torch.nn.Module, x: torch.Tensor) -> float:
    loss = model(x)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    return float(loss.detach())


@pytest.mark.parametrize("name,dims,channels", [("unet", 3, 1), ("unet", 2, 4), ("dynunet", 3, 2)])
def test_mim_masks_input_blocks_and_scores_masked_voxels(name, dims, channels):
    torch.manual_seed(0)
    model = MaskedImageModel(_cfg(name, dims, channels), mask_ratio=0.6, seed=0)
    x = torch.randn(2, channels, *(32,) * dims)
    _step(model, x)
    view = model.reconstruct(x)
    assert view.reconstruction.shape == x.shape and view.mask.shape == (2, 1, *(32,) * dims)
    assert view.mask.mean().item() == pytest.approx(0.6, abs=0.05)
    assert torch.equal(view.masked, x * (1 - view.mask))  # masked blocks are zero
    # the loss is the MSE of the reconstruction on masked voxels only
    m = view.mask.expand_as(x).bool()
    assert view.loss == pytest.approx(float(((view.reconstruction - x)[m] ** 2).mean()), rel=1e-4)


def test_mim_blocks_default_to_the_networks_downsampling():
    assert total_downsampling(_cfg("unet", 3, channels=(8, 16, 32, 64), strides=(2, 2, 2))) == (8, 8, 8)
    assert total_downsampling(_cfg("unet", 2)) == (4, 4)
    dyn = _cfg("dynunet", 3)
    assert total_downsampling(dyn) == tuple(MaskedImageModel(dyn).block)
    assert total_downsampling(_cfg("transunet3d", 3)) == (16, 16, 16)
    with pytest.raises(ValueError, match="block_size"):
        MaskedImageModel(_cfg("unet", 3), block_size=(4, 4))
    with pytest.raises(ValueError, match="divisible"):
        MaskedImageModel(_cfg("unet", 3), block_size=8)(torch.zeros(1, 1, 20, 20, 20))


@pytest.mark.parametrize("name,dims,channels", [("transunet3d", 3, 1), ("transunet_r50_vit_b16", 2, 2),
                                                ("transunet_vit_b16", 2, 3)])
def test_transunet_mae_encoder_sees_only_visible_tokens_and_decoder_predicts_every_patch(name, dims, channels):
    torch.manual_seed(0)
    size = 64 if dims == 2 else 32
    model = TransUNetMAE(_cfg(name, dims, channels), mask_ratio=0.75, **TINY_DECODER)
    seen: dict[str, tuple] = {}

    def record(key):
        def hook(module, inputs, output):
            seen.setdefault(key, tuple(inputs[0].shape if key == "encoder" else output.shape))

        return hook

    model.encoder.blocks[0].register_forward_hook(record("encoder"))
    model.decoder.pred.register_forward_hook(record("decoder"))
    x = torch.randn(2, channels, *(size,) * dims)
    _step(model, x)
    tokens = (size // model.stride) ** dims
    assert seen["encoder"] == (2, tokens - round(0.75 * tokens), 16)
    assert seen["decoder"] == (2, tokens, model.stride**dims * channels)
    view = model.reconstruct(x)
    assert view.reconstruction.shape == x.shape
    assert view.mask.mean().item() == pytest.approx(round(0.75 * tokens) / tokens)
    # the masked blocks are hidden from the CNN stem as well
    assert torch.equal(view.masked, x * (1 - view.mask))


def test_transunet_mae_weights_are_the_segmentation_encoders():
    cfg = _cfg("transunet3d", 3)
    mae = TransUNetMAE(cfg, **TINY_DECODER)
    seg = build_model("transunet3d", **{k: v for k, v in cfg.items() if k != "name"})
    enc = mae.encoder_state_dict()
    assert set(enc) == {k for k in seg.state_dict() if k.startswith("encoder.")}
    seg.load_state_dict(enc, strict=False)
    x = torch.randn(1, 1, 32, 32, 32)
    mae.eval()
    seg.eval()
    with torch.no_grad():
        assert torch.allclose(mae.encoder(x)[0], seg.encoder(x)[0])


@pytest.mark.parametrize("target,dims", [("unetr", 3), ("unetr", 2), ("transunet_vit_b16", 2)])
def test_monai_mae_key_mapping_gives_the_same_encoder_outputs(target, dims):
    torch.manual_seed(0)
    cfg = _cfg(target, dims, in_ch=2)
    mae = ViTMAE(cfg, **TINY_DECODER)
    for p in mae.parameters():  # non-default values everywhere, so a wrong mapping cannot pass
        torch.nn.init.normal_(p, std=0.2)
    seg = build_model(target, **{k: v for k, v in cfg.items() if k != "name"})
    enc = mae.encoder_state_dict()
    prefix = "vit." if target == "unetr" else "encoder."
    assert set(enc) == {k for k in seg.state_dict() if k.startswith(prefix)}
    missing, unexpected = seg.load_state_dict(enc, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith(prefix)]
    x = torch.randn(2, 2, *(32,) * dims)
    mae.eval()
    seg.eval()
    with torch.no_grad():
        reference = mae.mae.blocks(mae.mae.patch_embedding(x))  # MAE encoder on all tokens, no cls token
        ours = seg.vit(x)[0] if target == "unetr" else seg.encoder(x)[0]
    # TransUNet's final LayerNorm uses eps 1e-6, MONAI's 1e-5
    assert torch.allclose(ours, reference, atol=1e-3)


def test_monai_mae_is_seeded_trains_and_refuses_other_sizes():
    cfg = _cfg("unetr", 3)
    a, b = ViTMAE(cfg, seed=3, **TINY_DECODER), ViTMAE(cfg, seed=3, **TINY_DECODER)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 32, 32, 32)
    assert a(x).item() == b(x).item()
    assert a.mae.last_mask.sum(1).tolist() == [6, 6]  # 75 % of 8 tokens, every sample
    _step(a, x)
    with pytest.raises(ValueError, match="img_size"):
        a(torch.randn(1, 1, 48, 48, 48))
    with pytest.raises(ValueError, match="supports"):
        ViTMAE(_cfg("unet", 3))
    with pytest.raises(ValueError, match="no MAE key mapping"):
        mae_to_encoder_state(a.mae.state_dict(), "unet", 12)
    with pytest.raises(ValueError, match="pos_embed_type"):
        ViTMAE(cfg, pos_embed_type="rope", **TINY_DECODER)


def test_builder_picks_the_method_and_refuses_bad_settings():
    assert resolve_method("auto", "transunet3d") == "mae_transunet"
    assert resolve_method("auto", "unetr") == "mae_vit"
    assert resolve_method("auto", "unet") == "mim"
    assert isinstance(build_pretrain_model({"method": "auto", "mask_ratio": 0.5, **TINY_DECODER}, _cfg("unet", 3)),
                      MaskedImageModel)
    model = build_pretrain_model({"method": "mae_transunet", "norm_pix_loss": False, **TINY_DECODER},
                                 _cfg("transunet3d", 3))
    assert isinstance(model, TransUNetMAE) and model.norm_pix is False
    with pytest.raises(ValueError, match="method"):
        build_pretrain_model({"method": "simclr"}, _cfg("unet", 3))
    with pytest.raises(ValueError, match="unknown pretrain setting"):
        build_pretrain_model({"method": "mim", "mask_ration": 0.5}, _cfg("unet", 3))
    with pytest.raises(ValueError, match="needs a TransUNet"):
        build_pretrain_model({"method": "mae_transunet"}, _cfg("unet", 3))
    with pytest.raises(ValueError, match="divisible"):
        TransUNetMAE(_cfg("transunet3d", 3), decoder_hidden_size=10, decoder_num_heads=4)
    with pytest.raises(ValueError, match="norm_pix"):
        MaskedImageModel(_cfg("unet", 3), norm_pix="yes")
    with pytest.raises(ValueError, match="expects"):
        TransUNetMAE(_cfg("transunet3d", 3), **TINY_DECODER)(torch.zeros(1, 2, 32, 32, 32))
