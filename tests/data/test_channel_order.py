"""Sites that list the same sequences in different orders feed the model the same channels (matched by name)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Invertd

from medseg_core.data.dataset import load_site
from medseg_core.data.fingerprint import (
    check_plan,
    compute_site_fingerprint,
    make_plan,
    merge_fingerprints,
    model_channel_order,
    plan_federation,
)
from medseg_core.data.synthetic import make_site
from medseg_core.data.transforms import build_transforms, input_channel_names, input_channel_order


@pytest.fixture(scope="module")
def two_orders(tmp_path_factory):
    """The MR-T2 scanner's site (files and dataset.json: T2, T1) and the same scans listed as T1, T2."""
    root = tmp_path_factory.mktemp("orders")
    a = make_site(root / "site_t2_first", site_index=2, cases=3, shape=(24, 24, 24), n_test=1, n_channels=2)
    b = root / "site_t1_first"
    shutil.copytree(a, b)
    for folder in ("imagesTr", "imagesTs"):
        for f in sorted((b / folder).glob("*_0000.nii.gz")):
            other = f.with_name(f.name.replace("_0000", "_0001"))
            tmp = f.with_name("swap.nii.gz")
            f.rename(tmp)
            other.rename(f)
            tmp.rename(other)
    meta = json.loads((b / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T2", "1": "T1"}
    meta["channel_names"] = {"0": "T1", "1": "T2"}
    (b / "dataset.json").write_text(json.dumps(meta))
    return load_site(a), load_site(b)


def test_model_channel_order_sorts_by_name_and_keeps_repeats_in_place():
    assert model_channel_order(["T2", "T1"]) == [1, 0]
    assert model_channel_order(["T1", "T2"]) == [0, 1]
    assert model_channel_order(["CT", "ct"]) == [0, 1]  # two CT phases: declared order kept
    assert model_channel_order(["t2", "T1", "FLAIR"]) == [2, 1, 0]


def test_both_orders_give_the_same_fingerprint_plan_and_tensors(two_orders):
    a, b = two_orders
    fa, fb = compute_site_fingerprint(a), compute_site_fingerprint(b)
    assert fa["declared_channels"] == ["T2", "T1"] and fb["declared_channels"] == ["T1", "T2"]
    assert fa["channels"] == fb["channels"]  # recorded in the model's order at both sites
    assert list(fa["channels"]["0"]) == ["T1"] and list(fa["channels"]["1"]) == ["T2"]

    _fps, _merged, plan = plan_federation([a, b])
    assert plan["channel_order"] == "by-name"
    assert {ch: list(m) for ch, m in plan["normalization"].items()} == {"0": ["T1"], "1": ["T2"]}
    assert plan["notes"] == ["site_t2_first lists its channels as T2, T1; they are matched to the model's "
                             "channels by name: T1, T2"]
    assert input_channel_order(plan, a.channel_names) == ([1, 0], ["T1", "T2"])
    assert input_channel_order(plan, b.channel_names) == ([0, 1], ["T1", "T2"])

    ta = build_transforms(plan, train=False, modalities=a.channel_names)
    tb = build_transforms(plan, train=False, modalities=b.channel_names)
    for ca, cb in zip(a.cases, b.cases, strict=True):
        if ca.label_path is None:
            continue
        oa, ob = ta(ca.as_dict()), tb(cb.as_dict())
        assert torch.equal(oa["image"].as_tensor(), ob["image"].as_tensor()), ca.case_id
        assert torch.equal(oa["label"].as_tensor(), ob["label"].as_tensor())

    # training patches too (same random state)
    pa = build_transforms(plan, train=True, modalities=a.channel_names).set_random_state(7)
    pb = build_transforms(plan, train=True, modalities=b.channel_names).set_random_state(7)
    for x, y in zip(pa(a.train_cases[0].as_dict()), pb(b.train_cases[0].as_dict()), strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])

    # the checkpoint of a pooled run over both records the model's order as predict's default input order
    assert input_channel_names(plan, [a, b]) == {0: "T1", 1: "T2"}
    assert input_channel_names(plan, [a]) == {0: "T2", 1: "T1"}  # one site: its own file order


def test_reordered_inference_still_inverts_to_the_input_grid(two_orders):
    a, _b = two_orders
    plan = make_plan(compute_site_fingerprint(a))
    case = a.test_cases[0]
    tf = build_transforms(plan, train=False, with_label=False, modalities=a.channel_names)
    out = tf({"image": [str(p) for p in case.image_paths]})
    first = nib.load(str(case.image_paths[0]))  # T2, fed to model channel 1
    out["pred"] = (out["image"][1:2] != 0).float()
    back = Invertd(keys="pred", transform=tf, orig_keys="image", nearest_interp=True)(out)["pred"]
    assert tuple(back.shape[1:]) == first.shape
    assert np.allclose(back.affine.numpy(), first.affine, atol=1e-4)
    nonzero = np.asarray(first.dataobj) != 0
    assert (back[0].numpy() > 0)[nonzero].mean() > 0.95  # the T2 body maps back onto the T2 file


def test_a_4d_file_is_reordered_like_separate_files(two_orders, tmp_path):
    a, _b = two_orders
    plan = make_plan(compute_site_fingerprint(a))
    case = a.train_cases[0]
    imgs = [nib.load(str(p)) for p in case.image_paths]
    stacked = tmp_path / "case_4d.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([np.asarray(i.dataobj) for i in imgs], axis=-1), imgs[0].affine), str(stacked))
    tf = build_transforms(plan, train=False, with_label=False, modalities=a.channel_names)
    one = tf({"image": [str(stacked)]})["image"]
    separate = tf({"image": [str(p) for p in case.image_paths]})["image"]
    assert torch.allclose(one.as_tensor(), separate.as_tensor())


def test_plans_without_channel_order_keep_the_declared_order(two_orders):
    a, b = two_orders
    plan = make_plan(merge_fingerprints([compute_site_fingerprint(a), compute_site_fingerprint(b)]))
    old = {k: v for k, v in plan.items() if k != "channel_order"}  # a plan written before by-name matching
    check_plan(old)
    assert input_channel_order(old, a.channel_names) == ([0, 1], ["T2", "T1"])
    case = a.train_cases[0].as_dict()
    new_img = build_transforms(plan, train=False, modalities=a.channel_names)(case)["image"]
    old_img = build_transforms(old, train=False, modalities=a.channel_names)(case)["image"]
    assert torch.equal(old_img[0], new_img[1]) and torch.equal(old_img[1], new_img[0])
    with pytest.raises(Exception, match="channel_order"):
        check_plan({**plan, "channel_order": "alphabetical"})


def test_fingerprints_of_both_conventions_are_not_merged(two_orders):
    a, b = two_orders
    fa, fb = compute_site_fingerprint(a), compute_site_fingerprint(b)
    legacy = {k: v for k, v in fb.items() if k not in ("channel_order", "declared_channels")}
    with pytest.raises(ValueError, match="by name"):
        merge_fingerprints([fa, legacy])


def test_the_federated_plan_lists_reordered_sites(two_orders):
    from medseg_core.config import load_config
    from server.loop import compatible_fingerprints, plan_from_fingerprints

    a, b = two_orders
    fps = {a.name: compute_site_fingerprint(a), b.name: compute_site_fingerprint(b)}
    kept, left_out = compatible_fingerprints(fps)
    assert sorted(kept) == sorted(fps) and not left_out
    plan, merged = plan_from_fingerprints(fps, load_config({}))
    assert plan["channel_order"] == "by-name" and list(merged["channels"]["0"]) == ["T1"]
    assert plan["notes"] == [f"{a.name} lists its channels as T2, T1; they are matched to the model's channels "
                             f"by name: T1, T2"]


def test_a_channel_with_different_modalities_at_different_sites_is_noted(synth_fed):
    from medseg_core.data.dataset import load_federation

    sites = load_federation(synth_fed)  # site_00 CT, site_01 MR (T1)
    _fps, _merged, plan = plan_federation(sites)
    assert plan["notes"] == ["model channel 0 is CT at site_00, T1 at site_01: one input for different "
                             "modalities (each normalised by its own scheme)"]


def test_predict_matches_input_channels_to_the_model_by_name(two_orders, tmp_path):
    from medseg_core.checkpoint import save_checkpoint
    from medseg_core.models import build_model
    from medseg_core.predict import Predictor

    a, b = two_orders
    _fps, _merged, plan = plan_federation([a])
    cfg = {"name": "unet", "spatial_dims": 3, "in_channels": 2, "out_channels": 3, "channels": [4, 8], "strides": [2]}
    torch.manual_seed(0)
    model = build_model(cfg["name"], **{k: v for k, v in cfg.items() if k != "name"})
    # trained at site a: the checkpoint records a's file order (T2, T1) as predict's default input order
    ckpt = save_checkpoint(tmp_path / "best.pt", state_dict=model.state_dict(), model_config=cfg, plan=plan,
                           labels=a.labels, channel_names=input_channel_names(plan, [a]))
    files_a = [str(p) for p in a.test_cases[0].image_paths]  # T2, T1
    files_b = [str(p) for p in b.test_cases[0].image_paths]  # the same scans as T1, T2
    default = Predictor(ckpt, device="cpu", postprocess=False)
    named = Predictor(ckpt, device="cpu", postprocess=False, modalities=["T1", "T2"])
    assert default.modalities == ["T2", "T1"]
    ia, ib = default.transform({"image": files_a})["image"], named.transform({"image": files_b})["image"]
    assert torch.equal(ia.as_tensor(), ib.as_tensor())
    wrong = Predictor(ckpt, device="cpu", postprocess=False).transform({"image": files_b})["image"]
    assert not torch.equal(wrong.as_tensor(), ia.as_tensor())  # b's files read as if they were a's order
    la, _ = default.predict_case([p for p in a.test_cases[0].image_paths])
    lb, _ = named.predict_case([p for p in b.test_cases[0].image_paths])
    np.testing.assert_array_equal(la, lb)
