"""Run a tiny in-process federation as its own process (the resume test kills it mid-run).

python tests/fl/fl_inprocess_main.py CACHE_DIR RUN_DIR "strategy=fedadam fl.num_rounds=4"
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from fl_helpers import run_config, run_inprocess

if __name__ == "__main__":
    torch.set_num_threads(1)
    cache, run_dir, extra = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else ""
    run_inprocess(run_config(cache, run_dir, extra), say=lambda line: print(line, flush=True))
