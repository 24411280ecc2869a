"""A real deployment on 127.0.0.1: `flower-superlink` with TLS and SuperNode authentication, two sites
started with `medseg-site run`, 2 rounds with `flwr run . <federation>`, and an unregistered node refused.

Every process is started in its own session and stopped (its process group) at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.certs import make_deployment_files
from medseg_core.checkpoint import load_checkpoint
from medseg_core.data.synthetic import make_federation
from medseg_core.federation import SITE_MODEL
from server.run_files import RunFiles

REPO = Path(__file__).resolve().parents[2]
SITES = {"hospital_a": "site_00", "hospital_b": "site_01"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _medseg_site() -> list[str]:
    exe = shutil.which("medseg-site")
    return [exe] if exe else [sys.executable, "-m", "client.site_cli"]


def _wait_for_tls(port: int, ca: Path, timeout_s: float = 60) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                with context.wrap_socket(sock, server_hostname="127.0.0.1"):
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the SuperLink did not accept TLS connections on port {port}")


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in started:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="Flower not installed")
def test_two_hospitals_train_over_tls_with_node_authentication(tmp_path, processes):
    fed = tmp_path / "fed"
    make_federation(fed, n_sites=2, cases_per_site=3, seed=0, shape=(32, 32, 32), n_test=1, n_unlabelled=0)
    certs = make_deployment_files(
        tmp_path / "certs", hosts=["127.0.0.1", "localhost"], sites=[*SITES, "rogue"], log=lambda s: None
    )
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "MEDSEG_CACHE_DIR": str(tmp_path / "cache"),
    }
    port = _free_port()
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(cmd: list[str], name: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=env,
            stdout=open(logs / f"{name}.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        processes.append(proc)
        return proc

    start(
        [
            "flower-superlink",
            "--ssl-ca-certfile",
            str(certs.ca_cert),
            "--ssl-certfile",
            str(certs.superlink_cert),
            "--ssl-keyfile",
            str(certs.superlink_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(tmp_path / "superlink.db"),
        ],
        "superlink",
    )
    _wait_for_tls(port, certs.ca_cert)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "hospitals"\n\n[superlink.hospitals]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs.ca_cert}"\n'
    )
    for site in SITES:
        reg = subprocess.run(
            ["flwr", "supernode", "register", str(certs.node_pub(site)), "hospitals"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout + reg.stderr

    for site, folder in SITES.items():
        start(
            [
                *_medseg_site(),
                "run",
                "--site-dir",
                str(fed / folder),
                "--site-id",
                site,
                "--state-dir",
                str(tmp_path / "state" / site),
                "--superlink",
                f"127.0.0.1:{port}",
                "--root-certificates",
                str(certs.ca_cert),
                "--auth-key",
                str(certs.node_key(site)),
                "--runtime-port",
                str(_free_port()),
            ],
            site,
        )
    rogue = start(
        [
            "flower-supernode",
            "--superlink",
            f"127.0.0.1:{port}",
            "--root-certificates",
            str(certs.ca_cert),
            "--auth-supernode-private-key",
            str(certs.node_key("rogue")),
            "--port",
            str(_free_port()),
            "--max-retries",
            "1",
        ],
        "rogue",
    )

    def flwr_run(run_dir, extra: str = "") -> str:
        """`flwr run . hospitals` of the tiny experiment; returns its output after checking it succeeded."""
        proc = subprocess.run(
            [
                "flwr",
                "run",
                str(REPO),
                "hospitals",
                "--stream",
                "--run-config",
                f"experiment='fl_smoke' overrides='paths.run_dir={run_dir} fl.connect_timeout_s=120 "
                f"{extra}'",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    run_dir = tmp_path / "run"
    out = flwr_run(run_dir, "fl.final_test=true")
    assert "round 0: 2 site(s) enrolled ['hospital_a', 'hospital_b']" in out, out
    assert "round 1/2" in out and "round 2/2" in out and "done: best round" in out, out
    history = json.loads(RunFiles(run_dir).history.read_text())
    assert history["status"] == "completed" and len(history["rounds"]) == 2
    assert set(history["rounds"][1]["train"]) == set(SITES)
    assert (tmp_path / "state" / "hospital_a").is_dir()  # the site's state lives where its node config says
    # each hospital keeps the final test's model in its own state folder, ready for medseg-predict
    assert set(history["test"]["sites"]) == set(SITES) and "each site that answered keeps this model" in out
    for site in SITES:
        kept = load_checkpoint(tmp_path / "state" / site / history["run_name"] / SITE_MODEL)
        assert kept["round_idx"] == history["test"]["round"]

    # the same deployment with SecAgg+: the train phase goes through Flower's masking protocol end to end
    secure_dir = tmp_path / "run-secagg"
    out = flwr_run(secure_dir, "fl.final_test=false fl.num_rounds=1 privacy=secagg")
    history = json.loads(RunFiles(secure_dir).history.read_text())
    assert history["status"] == "completed", out
    (secure,) = history["privacy"]["secagg_rounds"]
    assert secure["in_sum"] == 2 and sorted(secure["sites_in_sum"]) == sorted(SITES), secure
    assert not secure["dropped"] and secure["halted"] is None, secure

    # the unregistered node was refused and never took part
    assert rogue.wait(timeout=120) != 0
    superlink_log = (logs / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log
