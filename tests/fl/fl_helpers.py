"""Shared helpers of the federation tests: tiny run-configs and an in-process federation.

Runs use the ``fl_smoke`` experiment (2 sites x 3 training cases at 32^3, a tiny U-Net) with every
generated or written file under pytest's temporary folders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from flwr.app import Context, Message

from client.app import app as client_app
from medseg_core.config import load_config
from server.inprocess import InProcessGrid
from server.loop import FederatedRun

ClientCallable = Callable[[Message, Context], Message]


def run_config(
    cache_dir: Path, run_dir: Path | None = None, extra: str = "", experiment: str = "fl_smoke"
) -> dict[str, str]:
    """A Flower run-config for the tiny experiment, with data and site state under ``cache_dir``."""
    overrides = f"data.cache_dir={cache_dir}"
    if run_dir is not None:
        overrides += f" paths.run_dir={run_dir}"
    return {"experiment": experiment, "overrides": f"{overrides} {extra}".strip()}


def simulated_nodes(n: int) -> list[dict[str, int]]:
    """Node configs as Flower's simulation sets them."""
    return [{"partition-id": i, "num-partitions": n} for i in range(n)]


def make_grid(
    rc: dict[str, str], clients: Sequence[ClientCallable] | None = None, n: int | None = None
) -> InProcessGrid:
    """An in-process grid of real ClientApps (or the given callables) for ``rc``'s sites."""
    if n is None:
        n = int(load_config(rc).data.synthetic.n_sites) if clients is None else len(clients)
    clients = list(clients) if clients is not None else [client_app] * n
    return InProcessGrid(clients, simulated_nodes(n), run_config=rc)


def run_inprocess(rc: dict[str, str], clients: Sequence[ClientCallable] | None = None, say=None) -> dict:
    """Run the whole federation in this process; returns the history."""
    lines: list[str] = []
    run = FederatedRun(make_grid(rc, clients), load_config(rc), say=say or lines.append)
    history = run.run()
    history["_lines"] = lines
    return history
