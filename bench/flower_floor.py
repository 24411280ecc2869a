"""Benchmark: what Flower's simulation runtime costs with an app that does nothing, on this machine.

    python bench/flower_floor.py            # 3 and 10 sites, with and without importing MONAI (about 2 min)

``bench/federation_overhead.py`` measures our ServerApp/ClientApp against the same work in one process.
This measures the floor under it: a throw-away Flower app (written to a temporary folder) whose ServerApp
sends one message to every node per round and whose ClientApp replies at once, run with ``flwr run
--stream`` exactly as the overhead bench runs ours (a cold local SuperLink in its own ``FLWR_HOME``).
With ``monai`` the ServerApp imports MONAI before its loop and the ClientApp on its first message, as
ours must (MONAI's ``__init__`` imports torch, scipy, matplotlib and ``torch._dynamo``). Reported: wall
time, start (launch to loop), first round (Ray's start and the actors), the later rounds (one exchange
each), stop, and the peak summed PSS of the process tree by process kind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from federation_overhead import ProcessTree, _free_port

PYPROJECT = """[build-system]
requires = ["setuptools>=68", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "floor-app"
version = "0.1.0"
dependencies = ["flwr[simulation]>=1.41,<2"]

[tool.setuptools]
packages = ["floor"]

[tool.flwr.app]
publisher = "medseg"

[tool.flwr.app.components]
serverapp = "floor.app:server"
clientapp = "floor.app:client"

[tool.flwr.app.config]
rounds = 10
monai = 0
"""

APP = '''"""One message per node and round, answered at once (MONAI imported only when asked)."""
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    if int(context.run_config["monai"]):
        import monai  # noqa: F401
    print(f"FLOOR loop-start {time.time():.4f}", flush=True)
    nodes = []
    while not nodes:
        nodes = list(grid.get_node_ids())
        time.sleep(0.02)
    for r in range(int(context.run_config["rounds"])):
        msgs = [Message(RecordDict({"c": ConfigRecord({"r": r})}), dst_node_id=n, message_type="query") for n in nodes]
        replies = list(grid.send_and_receive(msgs))
        assert len(replies) == len(msgs)
        print(f"FLOOR round {r} {time.time():.4f}", flush=True)
    print(f"FLOOR loop-end {time.time():.4f}", flush=True)


@client.query()
def query(msg: Message, context: Context) -> Message:
    if int(context.run_config["monai"]):
        import monai  # noqa: F401
    return Message(RecordDict({"m": MetricRecord({"ok": 1.0})}), reply_to=msg)
'''


def run_once(app: Path, work: Path, sites: int, client_cpus: int, monai: bool, rounds: int) -> dict:
    home = work / f"flwr-{sites}-{int(monai)}-{time.time_ns()}"
    home.mkdir(parents=True)
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port())}
    cmd = ["flwr", "run", str(app), "--stream", "--run-config", f"monai={int(monai)} rounds={rounds}",
           "--federation-config", f"num-supernodes={sites} client-resources-num-cpus={client_cpus}"]
    log = home / "log.txt"
    with open(log, "w") as out:
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT)
        tree = ProcessTree(proc.pid)
        tree.start()
        rc = proc.wait(timeout=600)
        wall = time.time() - t0
        tree.terminate_all()
        tree.stop()
    lines = log.read_text().splitlines()
    marks = {ln.split()[1]: float(ln.split()[-1]) for ln in lines if ln.startswith("FLOOR loop")}
    ends = [float(ln.split()[-1]) for ln in lines if ln.startswith("FLOOR round")]
    if rc != 0 or len(ends) != rounds:
        raise RuntimeError(f"the floor app failed (exit {rc}); see {log}")
    later = [b - a for a, b in zip(ends, ends[1:], strict=False)]  # the rounds after the first: one exchange each
    return {"sites": sites, "monai": monai, "client_cpus": client_cpus, "wall_s": wall,
            "start_s": marks["loop-start"] - t0, "first_round_s": ends[0] - marks["loop-start"],
            "exchange_s": statistics.median(later), "stop_s": t0 + wall - marks["loop-end"],
            "fixed_s": wall - sum(later),
            "peak_pss_mb": tree.peak_pss_kb / 1024,
            "breakdown": {k: round(v["mb"]) for k, v in tree.peak_breakdown.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flower-floor-") as tmp:
        app = Path(tmp) / "app"
        (app / "floor").mkdir(parents=True)
        (app / "pyproject.toml").write_text(PYPROJECT)
        (app / "floor" / "__init__.py").write_text("")
        (app / "floor" / "app.py").write_text(APP)
        records = []
        for sites in args.sites:
            # the overhead bench's settings: 2 actors for 3 sites; one actor for 10 (its memory case)
            cpus = 1 if sites <= 3 else 2
            for monai in (False, True):
                rec = run_once(app, Path(tmp) / "work", sites, cpus, monai, args.rounds)
                records.append(rec)
                print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
        shutil.rmtree(Path(tmp) / "work", ignore_errors=True)
    print("\n| sites (actors) | imports | wall (s) | fixed (s) = start + first round + stop | one exchange (s) | peak PSS (MB) |")
    print("|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['sites']} ({2 if r['client_cpus'] == 1 else 1}) | {'MONAI' if r['monai'] else 'flwr only'} | "
              f"{r['wall_s']:.1f} | {r['fixed_s']:.1f} = {r['start_s']:.1f} + {r['first_round_s']:.1f} + "
              f"{r['stop_s']:.1f} | {r['exchange_s']:.2f} | {r['peak_pss_mb']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
