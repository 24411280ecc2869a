"""The Flower ServerApp: compose the config from the run-config and hand the Grid to the run loop.

    flwr run . --stream --federation-config "num-supernodes=3 client-resources-num-cpus=1"
    flwr run . --stream --run-config "experiment='fl_smoke' overrides='strategy=fedbn fl.num_rounds=5'"
    flwr run . --stream --run-config "experiment='fl_pretrain'"     # federated self-supervised pretraining

Everything else (round 0 plan, rounds, checkpoints, report) is in :mod:`server.loop` (fine-tuning) and
:mod:`server.pretrain_loop` (pretraining: chosen when the composed config has a ``pretrain`` group).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medseg_core.config import load_config
from server.loop import FederatedRun
from server.pretrain_loop import FederatedPretrainRun

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the configured federation to the end."""
    cfg = load_config(context.run_config)
    run = FederatedPretrainRun if cfg.get("pretrain") is not None else FederatedRun
    run(grid, cfg).run()
