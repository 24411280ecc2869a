"""`flwr run` end to end: Flower's own simulation runtime (local SuperLink, Ray), the tiny experiment.

Flower's CLI starts a local SuperLink that outlives the command; the fixture gives it its own
``FLWR_HOME`` and ports and stops exactly the processes it started. Nothing is installed at run time
(``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from server.run_files import RunFiles

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flwr") is None, reason="Flower CLI not installed")
def test_flwr_run_trains_the_tiny_federation_and_writes_the_run_directory(flwr_env, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        "flwr",
        "run",
        str(REPO),
        "--stream",
        "--run-config",
        f"experiment='fl_smoke' overrides='paths.run_dir={run_dir}'",
        "--federation-config",
        "num-supernodes=2 client-resources-num-cpus=1",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=flwr_env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "round 0: 2 site(s) enrolled" in out, out
    for r in (1, 2):
        line = next((ln for ln in out.splitlines() if f"round {r}/2" in ln), "")
        assert "val Dice site_00" in line and "site_01" in line, out
    assert "done: best round" in out, out
    files = RunFiles(run_dir)
    for path in (
        files.resolved_config,
        files.plan,
        files.best,
        files.history,
        files.dice_plot,
        files.loss_plot,
        files.report,
        files.round_checkpoint(1),
        files.round_checkpoint(2),
    ):
        assert path.is_file(), path
    history = json.loads(files.history.read_text())
    assert history["status"] == "completed" and set(history["test"]["sites"]) == {"site_00", "site_01"}


def _readme_main_command() -> list[str]:
    """The README's main-job command: the `flwr run` part of its first ```bash block."""
    import re
    import shlex

    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1)
    command = first_block.split("&&")[-1].strip()
    assert command.startswith("flwr run ."), command
    return shlex.split(command)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flwr") is None, reason="Flower CLI not installed")
def test_readme_main_command_runs_the_embedded_default_within_five_minutes(flwr_env, tmp_path):
    import time

    cmd = _readme_main_command()
    cmd[2] = str(REPO)  # "." is the repository: the test runs in its own folder
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=flwr_env, capture_output=True, text=True, timeout=420)
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "round 0: 3 site(s) enrolled" in out, out[-5000:]
    assert "done: best round" in out, out[-5000:]
    runs = sorted((tmp_path / "runs").glob("fl-*"))
    assert len(runs) == 1, runs
    history = json.loads(RunFiles(runs[0]).history.read_text())
    assert history["status"] == "completed"
    print(f"README main command: {seconds:.0f} s")
