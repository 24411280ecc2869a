"""Every ``medseg-*`` command documented in the README runs as written (a documented command is a tested
command). Training commands get speed overrides appended (Hydra: the last value wins)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FAST_TRAIN = ["train.epochs=1", "train.progress=false", "eval.hd95=false"]
FAST_3D = ["model.channels=[4,8,16]", "model.strides=[2,2]"]


def readme_commands(prefix: str = "medseg-") -> list[str]:
    """Commands in the README's ```bash blocks that start with ``prefix`` (continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(prefix):
                commands.append(line)
    return commands


def test_readme_documents_the_data_train_and_predict_commands():
    names = {shlex.split(c)[0] + " " + shlex.split(c)[1] for c in readme_commands()}
    assert {"medseg-data synth", "medseg-data validate", "medseg-data preview", "medseg-data fingerprint"} <= names
    assert any(n.startswith("medseg-train") for n in names) and any(n.startswith("medseg-predict") for n in names)


@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path):
    env = {**os.environ, "MEDSEG_CACHE_DIR": str(tmp_path / "cache"), "MPLBACKEND": "Agg"}
    for command in readme_commands():
        args = shlex.split(command)
        if args[0] == "medseg-train":
            args += FAST_TRAIN + ([] if "model=unet2d" in command else FAST_3D)
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "fed.png").is_file() and (tmp_path / "plan.json").is_file()
    assert (tmp_path / "runs" / "pooled" / "best.pt").is_file()
    assert (tmp_path / "preds" / "metrics.json").is_file()
