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


#: README sections whose commands build on a federated run; tested in order by their own test below
FEDERATED_SECTIONS = ("## Federated pretraining",)


def readme_sections() -> dict[str, str]:
    """The README's ``## `` sections by heading line."""
    parts = re.split(r"^(## .*)$", README.read_text(), flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def readme_commands(prefix: str = "medseg-", sections: tuple[str, ...] | None = None,
                    exclude: tuple[str, ...] = FEDERATED_SECTIONS) -> list[str]:
    """Commands in the ```bash blocks of the README (or of ``sections``) that start with ``prefix``
    (continuations joined), leaving out the ``exclude`` sections."""
    chosen = [text for head, text in readme_sections().items()
              if (sections is None or head in sections) and head not in (() if sections else exclude)]
    blocks = re.findall(r"```bash\n(.*?)```", "\n".join(chosen), flags=re.S)
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


def _faster_run_config(args: list[str], extra: str) -> list[str]:
    """``flwr run`` arguments with ``extra`` Hydra overrides put first into the run-config's overrides."""
    i = args.index("--run-config") + 1
    rc = args[i]
    args[i] = rc.replace("overrides='", f"overrides='{extra} ", 1) if "overrides='" in rc else f"{rc} overrides='{extra}'"
    return args


@pytest.mark.slow
def test_readme_federated_pretraining_section_runs_in_order(flwr_env, tmp_path):
    """Federated pretraining with the Flower app, then both fine-tuning commands from its encoder, as the
    README writes them (``$PWD`` expanded as the shell would; fewer rounds and epochs)."""
    env = {**flwr_env, "MPLBACKEND": "Agg"}
    commands = readme_commands(prefix="", sections=FEDERATED_SECTIONS)
    assert [c.split()[0] for c in commands] == ["flwr", "medseg-train", "flwr"], commands
    for command in commands:
        args = shlex.split(command.replace("$PWD", str(tmp_path)))
        if args[0] == "flwr":
            args = _faster_run_config(args, "fl.num_rounds=1 fl.final_test=false")
            args[2] = str(README.parent)  # `flwr run .` from the checkout
        else:
            args += FAST_TRAIN
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        out = proc.stdout[-3000:] + proc.stderr[-3000:]
        assert proc.returncode == 0, f"{command}\n{out}"
        assert "missing 0" in proc.stdout + proc.stderr or "experiment='fl_pretrain'" in command, out
    assert (tmp_path / "runs" / "fl-pretrain" / "encoder.pt").is_file()
    assert (tmp_path / "runs" / "from-fl-encoder" / "best.pt").is_file()
