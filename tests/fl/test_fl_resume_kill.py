"""Resume after a crash: the server process is killed after round 2 of 4, restarted with
``fl.resume=true``, and its final global weights equal those of an uninterrupted run with the same seed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fl_helpers import run_config, run_inprocess

from medseg_core.checkpoint import load_checkpoint
from server.run_files import RunFiles

MAIN = Path(__file__).with_name("fl_inprocess_main.py")
EXTRA = "strategy=fedadam fl.num_rounds=4"


def _weights(run_dir: Path, round_idx: int) -> dict[str, np.ndarray]:
    payload = load_checkpoint(RunFiles(run_dir).round_checkpoint(round_idx))
    return {k: v.numpy() for k, v in payload["state_dict"].items()}


@pytest.mark.slow
def test_killed_server_resumes_to_the_same_final_weights(tmp_path):
    cache = tmp_path / "cache"
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    run_inprocess(run_config(cache, full, EXTRA))  # also makes the data, so the subprocesses only train

    env = {**os.environ, "MEDSEG_TEST_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(MAIN), str(cache), str(crashed), EXTRA],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    files = RunFiles(crashed)
    deadline = time.monotonic() + 240
    try:
        while not files.round_checkpoint(2).exists():
            assert proc.poll() is None, f"the run ended before round 2:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "round 2 never finished"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the server process dies right after round 2's checkpoint
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not files.round_checkpoint(4).exists()

    resumed = subprocess.run(
        [sys.executable, str(MAIN), str(cache), str(crashed), f"{EXTRA} fl.resume=true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming run" in resumed.stdout and "round 3/4" in resumed.stdout
    assert "round 1/4" not in resumed.stdout and "round 0:" not in resumed.stdout
    a, b = _weights(full, 4), _weights(crashed, 4)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
