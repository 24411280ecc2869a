"""The Flower ServerApp: compose the config from the run-config and hand the Grid to the run loop.

    flwr run . --stream --federation-config "num-supernodes=3 client-resources-num-cpus=1"
    flwr run . --stream --run-config "experiment='fl_smoke' overrides='strategy=fedbn fl.num_rounds=5'"

Everything else (round 0 plan, rounds, checkpoints, report) is in :mod:`server.loop`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medseg_core.config import load_config
from server.loop import FederatedRun

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the configured federation to the end."""
    FederatedRun(grid, load_config(context.run_config)).run()
