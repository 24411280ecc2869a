"""bench/dice_ceiling.py: the one-voxel perturbations its table rests on, checked on hand-counted shapes."""

from __future__ import annotations

import numpy as np
import pytest
from bench_helpers import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("dice_ceiling")


def test_perturbations_of_a_cube_match_hand_counts(bench):
    # Prepare: a 3x3x3 cube (27 voxels) well inside the grid
    mask = np.zeros((9, 9, 9), dtype=bool)
    mask[3:6, 3:6, 3:6] = True
    # Execute
    got = bench.perturbations(mask)
    # Assert: 6-connected dilation adds 6 faces of 9 voxels (81 in all): 2*27/(27+81) = 0.5;
    # erosion leaves the centre voxel: 2*1/28; a one-voxel shift keeps 18 of 27: 2*18/54
    assert got["dilate_1"] == pytest.approx(0.5)
    assert got["erode_1"] == pytest.approx(2 / 28)
    assert got["shift_1"] == pytest.approx(2 / 3)


def test_a_larger_structure_loses_less_to_the_same_error(bench):
    small = np.zeros((32, 32, 32), dtype=bool)
    small[14:17, 14:17, 14:17] = True
    large = np.zeros((32, 32, 32), dtype=bool)
    large[6:26, 6:26, 6:26] = True
    for key in ("dilate_1", "erode_1", "shift_1"):
        assert bench.perturbations(large)[key] > bench.perturbations(small)[key] + 0.2


def test_dice_convention_for_empty_masks(bench):
    empty = np.zeros((4, 4, 4), dtype=bool)
    assert bench.dice(empty, empty) == 1.0
    one = empty.copy()
    one[0, 0, 0] = True
    assert bench.dice(one, empty) == 0.0


def test_refuses_a_folder_that_is_not_a_run(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--run", str(tmp_path)])
    assert exc.value.code == 2
    assert "resolved_config.yaml does not exist" in capsys.readouterr().err
