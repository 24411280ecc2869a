"""Secure aggregation (SecAgg+) with Flower's own workflow and mod, run in-process: the server's
aggregation code receives only the sum of the sites' updates, and what each site sends is masked.

Flower 1.41 implements SecAgg+ for its legacy message layout only: ``SecAggPlusWorkflow`` drives a
``flwr.server.strategy`` strategy inside ``DefaultWorkflow`` (``LegacyContext``), and ``secaggplus_mod``
wraps a ClientApp whose train reply is a legacy ``FitRes``. This test runs exactly those pieces over
the project's in-process grid (``server.inprocess.InProcessGrid``), with three sites whose updates are
known, and inspects both sides of the wire. The round loop uses the same pieces under ``privacy=secagg``
(``server/secure_agg.py``, ``client/secure_agg.py``; whole runs in ``tests/fl/test_fl_secagg_run.py``).
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from server.inprocess import InProcessGrid

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SHAPES = [(4, 3), (5,)]
CASES = [3, 5, 2]  # training cases (num-examples) of the three sites


def site_update(site: int) -> list[np.ndarray]:
    """What site ``site`` trains to: distinct, known values."""
    rng = np.random.default_rng(100 + site)
    return [rng.uniform(-1, 1, size=s).astype(np.float32) for s in SHAPES]


class Site(NumPyClient):
    def __init__(self, site: int) -> None:
        self.site = site

    def fit(self, parameters, config):
        return site_update(self.site), CASES[self.site], {}


client_app = ClientApp(client_fn=lambda context: Site(int(context.node_config["partition-id"])).to_client(),
                       mods=[secaggplus_mod])


class SpyFedAvg(FedAvg):
    """FedAvg that keeps what its aggregation code is given."""

    received: list[list[np.ndarray]]

    def aggregate_fit(self, server_round, results, failures):
        self.received = [parameters_to_ndarrays(res.parameters) for _, res in results]
        self.failures = failures
        return super().aggregate_fit(server_round, results, failures)


class WireTap(InProcessGrid):
    """The in-process grid, recording every reply that reaches the server (what it could look at)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replies = []

    @property
    def run(self):
        return types.SimpleNamespace(run_id=self._run_id)

    def pull_messages(self, message_ids):
        got = list(super().pull_messages(message_ids))
        self.replies += got
        return got


def _run(app, strategy) -> WireTap:
    """One SecAgg+ round of three sites through Flower's workflow; returns the tapped grid."""
    n = len(CASES)
    grid = WireTap([app] * n, [{"partition-id": i, "num-partitions": n} for i in range(n)])
    context = LegacyContext(context=Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares=n, reconstruction_threshold=2,
                                                               clipping_range=2.0, timeout=60))
    workflow(grid, context)
    return grid


def _spy() -> SpyFedAvg:
    n = len(CASES)
    return SpyFedAvg(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n, fraction_evaluate=0.0,
                     initial_parameters=ndarrays_to_parameters([np.zeros(s, np.float32) for s in SHAPES]))


def test_server_aggregates_only_the_masked_sum():
    n = len(CASES)
    strategy = _spy()
    grid = _run(client_app, strategy)

    updates = [site_update(i) for i in range(n)]
    weighted_mean = [sum(c * u[k] for c, u in zip(CASES, updates, strict=True)) / sum(CASES)
                     for k in range(len(SHAPES))]
    # 1. the aggregation code gets one vector per reply, all identical: the unmasked weighted sum
    assert not strategy.failures and len(strategy.received) == n
    for got in strategy.received:
        for g, expected in zip(got, weighted_mean, strict=True):
            np.testing.assert_allclose(g, expected, atol=1e-3)  # quantisation error only
    for i in range(n):  # ... and never a single site's update
        assert not any(np.allclose(g, u, atol=1e-2) for g, u in zip(strategy.received[0], updates[i], strict=True))

    # 2. on the wire: each site's vector is masked (uniform over the modulus), not its update
    masked = [rep for rep in grid.replies if not rep.has_error()
              and Key.MASKED_PARAMETERS in rep.content.config_records.get(RECORD_KEY_CONFIGS, {})]
    assert len(masked) == n
    for rep in masked:
        vectors = [bytes_to_ndarray(b) for b in rep.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        values = np.concatenate([v.ravel() for v in vectors[1:]]).astype(np.float64)  # [0] is the weight factor
        assert values.max() > 2**30  # masked values spread over [0, 2^32), far outside the quantised range
        assert not rep.content.array_records or all(len(r) == 0 for r in rep.content.array_records.values())


def test_secure_aggregation_combines_with_client_side_clipping():
    """Client-level DP with SecAgg+: each site clips its update (Flower's fixedclipping_mod, inside
    secaggplus_mod) before masking, so the server, which never sees one update, still aggregates bounded
    contributions (noise 0 here, to check the sum exactly)."""
    clip = 0.5
    app = ClientApp(client_fn=lambda context: Site(int(context.node_config["partition-id"])).to_client(),
                    mods=[secaggplus_mod, fixedclipping_mod])
    spy = _spy()
    _run(app, DifferentialPrivacyClientSideFixedClipping(spy, noise_multiplier=0.0, clipping_norm=clip,
                                                         num_sampled_clients=len(CASES)))
    clipped = []
    for i in range(len(CASES)):
        update = site_update(i)
        norm = np.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in update))
        assert norm > clip  # clipping does something
        clipped.append([u * (clip / norm) for u in update])
    expected = [sum(c * u[k] for c, u in zip(CASES, clipped, strict=True)) / sum(CASES) for k in range(len(SHAPES))]
    for g, e in zip(spy.received[0], expected, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-3)
