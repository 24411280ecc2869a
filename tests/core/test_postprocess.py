"""Post-processing chosen on validation cases: per-class small-component removal (medseg_core.postprocess)."""

from __future__ import annotations

import numpy as np
import pytest

from medseg_core.postprocess import (
    SAFE_FRACTION_OF_SMALLEST,
    PostProcessing,
    choose_postprocessing,
    remove_small_components,
    smallest_structures_mm3,
)


def _organ_with_lesions() -> np.ndarray:
    label = np.zeros((20, 20, 10), dtype=np.int64)
    label[2:18, 2:18, 1:9] = 1
    label[5:9, 5:9, 3:7] = 2  # 64-voxel lesion
    return label


def test_small_components_take_the_label_around_them():
    label = _organ_with_lesions()
    speck = label.copy()
    speck[14, 14, 5] = 2  # one-voxel lesion inside the organ
    speck[0, 0, 0] = 2  # one-voxel lesion in the background
    out = remove_small_components(speck, 2, 10.0, (1.0, 1.0, 2.0))  # 2 mm³ specks < 10 mm³ < 128 mm³ lesion
    assert np.array_equal(out, label)
    assert speck[14, 14, 5] == 2  # the input is not modified
    assert np.array_equal(remove_small_components(speck, 2, 0.0, (1.0, 1.0, 2.0)), speck)
    # the size is in mm³: with 0.5 mm voxels the 64-voxel lesion is 8 mm³ and goes too
    assert not (remove_small_components(speck, 2, 10.0, (0.5, 0.5, 0.5)) == 2).any()
    with pytest.raises(ValueError, match="spacing_mm"):
        remove_small_components(speck, 2, 10.0, (1.0, 1.0))
    with pytest.raises(ValueError, match="min_size_mm3"):
        remove_small_components(speck, 2, -1.0, (1.0, 1.0, 1.0))


def test_choice_on_validation_cases_removes_false_positive_specks_only_when_it_helps():
    spacing = (1.0, 1.0, 2.0)
    gt_lesion = _organ_with_lesions()
    gt_clean = np.where(gt_lesion == 2, 1, gt_lesion)  # a lesion-free patient
    pred_clean = gt_clean.copy()
    pred_clean[14, 14, 5] = 2  # false-positive speck: lesion Dice 0 on this case (empty ground truth)
    cases = [(gt_lesion.copy(), gt_lesion, spacing), (pred_clean, gt_clean, spacing)]
    post = choose_postprocessing(cases, {"organ": 1, "lesion": 2}, candidates_mm3=(0, 5, 50, 500))
    assert post.min_size_mm3 == {2: 5.0}  # the smallest size that removes the speck, not the real lesion
    dice = post.chosen_on["dice"]["lesion"]
    assert dice["before"] == pytest.approx(0.5) and dice["after"] == pytest.approx(1.0)
    assert post.active and np.array_equal(post(pred_clean, spacing), gt_clean)
    # nothing to gain: nothing chosen
    none = choose_postprocessing([(gt_lesion.copy(), gt_lesion, spacing)], {"organ": 1, "lesion": 2})
    assert none.min_size_mm3 == {} and not none.active
    with pytest.raises(ValueError, match="at least one"):
        choose_postprocessing([], {"lesion": 2})


def test_smallest_true_structure_per_class_in_mm3():
    label = _organ_with_lesions()  # organ 16x16x8 minus the lesion; lesion 4x4x4 = 64 voxels
    second = np.zeros_like(label)
    second[1:4, 1:4, 1:2] = 2  # a 9-voxel lesion
    second[10:12, 10:12, 2:4] = 2  # and an 8-voxel one in the same patient
    found = smallest_structures_mm3([(label, (1.0, 1.0, 2.0)), (second, (0.5, 0.5, 1.0))],
                                    {"organ": 1, "lesion": 2, "vessel": 3})
    assert found == {"organ": pytest.approx((16 * 16 * 8 - 64) * 2.0), "lesion": pytest.approx(8 * 0.25)}


def test_choice_never_reaches_the_size_of_real_structures():
    """Seen in a pooled run: a 30 mm³ false speck on one lesion-free validation patient made 50 mm³ the best
    size, and on a test patient a true 53 mm³ lesion, predicted at 48 mm³, was deleted."""
    spacing = (1.0, 1.0, 2.0)
    gt_lesion = _organ_with_lesions()  # its lesion: 64 voxels = 128 mm³
    gt_clean = np.where(gt_lesion == 2, 1, gt_lesion)
    pred_clean = gt_clean.copy()
    pred_clean[12:15, 12:15, 5:7] = 2  # an 18-voxel (36 mm³) false positive on a lesion-free patient
    cases = [(gt_lesion.copy(), gt_lesion, spacing), (pred_clean, gt_clean, spacing)]
    free = choose_postprocessing(cases, {"organ": 1, "lesion": 2}, candidates_mm3=(0, 20, 50))
    assert free.min_size_mm3 == {2: 50.0}  # what validation alone asks for
    # the training labels hold a 40 mm³ lesion: no size above 40 mm³ is tried, and 40 mm³ itself is
    capped = choose_postprocessing(cases, {"organ": 1, "lesion": 2}, candidates_mm3=(0, 20, 50),
                                   smallest_true_mm3={"lesion": 40.0})
    assert SAFE_FRACTION_OF_SMALLEST == 1.0 and capped.chosen_on["max_size_mm3"] == {"lesion": 40.0}
    assert capped.min_size_mm3 == {2: 40.0}  # removes the 36 mm³ speck (20 mm³ would not)
    wide = choose_postprocessing(cases, {"organ": 1, "lesion": 2}, candidates_mm3=(0, 20, 50),
                                 smallest_true_mm3={"lesion": 40.0}, safe_fraction=1.5)
    assert wide.min_size_mm3 == {2: 50.0} and wide.chosen_on["max_size_mm3"] == {"lesion": 60.0}
    with pytest.raises(ValueError, match="safe_fraction"):
        choose_postprocessing(cases, {"lesion": 2}, smallest_true_mm3={"lesion": 60.0}, safe_fraction=0)
    predicted = gt_clean.copy()  # a test patient's true 64 mm³ lesion, under-segmented to 24 voxels = 48 mm³
    predicted[3:6, 3:7, 2:4] = 2
    assert not (free(predicted, spacing) == 2).any()  # deleted by the validation-only choice
    assert np.array_equal(capped(predicted, spacing), predicted)


def test_round_trip_through_a_checkpoint_dict():
    post = PostProcessing({2: 20.0}, {"num_cases": 3})
    again = PostProcessing.from_dict(post.as_dict())
    assert again.min_size_mm3 == {2: 20.0} and again.chosen_on == {"num_cases": 3}
    assert not PostProcessing.from_dict(None).active
    with pytest.raises(ValueError, match="min_size_mm3"):
        PostProcessing.from_dict({"min_size_mm3": {"2": -1}})
