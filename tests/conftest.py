"""Shared fixtures: tiny synthetic federations written as real NIfTI site folders; an isolated environment
for `flwr run` that stops the local SuperLink it starts."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (a path unique to this test)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture
def flwr_env(tmp_path):
    """Environment for `flwr run` isolated in ``tmp_path``; stops the local SuperLink afterwards."""
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "MEDSEG_CACHE_DIR": str(tmp_path / "cache"),
        "RAY_DEDUP_LOGS": "0",
    }
    yield env
    for pid in _pids_with(str(home)):  # the SuperLink (its log file is under FLWR_HOME) and its group
        try:
            os.killpg(os.getpgid(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
