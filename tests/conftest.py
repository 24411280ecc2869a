"""Shared fixtures: tiny synthetic federations written as real NIfTI site folders."""

from __future__ import annotations

import os

import pytest
import torch

# Keep tests polite on the 2-core CI machine.
torch.set_num_threads(int(os.environ.get("MEDSEG_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def synth_fed(tmp_path_factory):
    """A 2-site synthetic federation (4 train + 2 test + 1 unlabelled case per site, 32³)."""
    from medseg_core.data.synthetic import make_federation

    root = tmp_path_factory.mktemp("fed")
    make_federation(root, n_sites=2, cases_per_site=4, seed=0, shape=(32, 32, 32), n_test=2, n_unlabelled=1)
    return root
