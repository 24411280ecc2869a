"""Benchmark: federated rounds through Flower's simulation vs the same rounds in one process.

    python bench/federation_overhead.py                  # 3 and 10 sites, 3 rounds, 3 interleaved repeats
    python bench/federation_overhead.py --quick          # 3 sites, 2 rounds, 32^3, 1 repeat: a smoke run
    python bench/federation_overhead.py --write-docs     # also update docs/benchmarks.md

Every run is the same federation (the embedded synthetic one with N sites, same seed, same data, same
~2 M-parameter 3D U-Net, same number of rounds, 1 local epoch, no final test) in a fresh process tree,
one arm after the other, arms interleaved within each repeat so that the load of a shared machine
falls on all of them alike:

* ``flower``: ``flwr run . --stream --federation-config "num-supernodes=N client-resources-num-cpus=1"``
  in its own ``FLWR_HOME`` (cold: ``flwr run`` starts the local SuperLink, which starts the simulation
  runtime and Ray); the SuperLink it leaves running is stopped afterwards;
* ``inprocess``: the same ServerApp loop (:class:`server.loop.FederatedRun`) and the same ClientApp over
  :class:`server.inprocess.InProcessGrid` in one process (no Flower transport, no Ray; every site in a
  thread, one torch thread each, as Ray gives each simulated site one CPU);
* ``plain``: the sites' compute only: :func:`client.local.train_round` and
  :func:`client.local.evaluate_round` called directly, as many sites at once as there are CPUs (threads,
  one torch thread each, as the simulation runs them), NumPy FedAvg in between (no messages, no
  checkpoints, no plots). Torch with every core on one site at a time is no fair baseline on a shared
  machine: its OpenMP threads wait for each other when another job takes a core (5x slower here).

Per-round seconds come from each run's ``history.json`` (``rounds[i].seconds.round``: train + evaluate
+ aggregation + checkpoint, as the ServerApp measures them) or, for ``plain``, its own timers. CPU
seconds per round are those of the whole process tree during the rounds (robust to other jobs on the
machine, which delay a round but add nothing to its CPU time). The fixed cost of a run is its wall
time (launch to exit) minus the sum of its rounds, split into *start* (launch until the ServerApp loop
begins: CLI, SuperLink, runtime, Ray, imports), *round 0* (the loop's setup: enrolment, fingerprints,
plan, model) and *stop* (loop end, taken from the mtime of the run's last written file, until the
launched command exits). Peak memory is the largest sum over the whole
process tree (every descendant ever seen, also after it is re-parented: SuperLink, SuperExec, the
simulation process, Ray's GCS, raylet and workers) of the resident set (RSS: shared pages counted in
each process) and of the proportional set (PSS: shared pages split between the processes that map
them), sampled every 0.2 s from ``/proc`` (Linux only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Federation overhead (bench/federation_overhead.py)"
BLOCK = "federation_overhead"
ARMS = ("flower", "inprocess", "plain")
# MONAI 3D U-Net, InstanceNorm: 2,045,689 parameters with 1 input channel and 3 classes (the issue's ~2 M)
MODEL_OVERRIDES = "model.channels=[21,42,84,168] model.strides=[2,2,2] model.num_res_units=2"
SAMPLE_INTERVAL_S = 0.2


# ------------------------------------------------------------------------------------------------
# the federation every arm runs


def overrides(sites: int, args: argparse.Namespace, cache_dir: Path, run_dir: Path) -> str:
    """The Hydra overrides of one run (identical for every arm but the run directory)."""
    s = int(args.shape)
    return (
        f"data.cache_dir={cache_dir} paths.run_dir={run_dir} seed=0 "
        f"data.synthetic.n_sites={sites} data.synthetic.cases_per_site={args.cases} data.synthetic.n_test=0 "
        f"data.synthetic.n_unlabelled=0 data.synthetic.shape=[{s},{s},{s}] data.synthetic.seed=0 "
        f"transforms.crop.num_samples=1 {MODEL_OVERRIDES} "
        f"fl.num_rounds={args.rounds} fl.local_epochs=1 fl.final_test=false "
        f"fl.min_available_nodes={sites} fl.min_train_nodes={sites} fl.min_evaluate_nodes={sites} "
        f"fl.round_timeout_s=1800 fl.connect_timeout_s=600"
        + (f" {args.extra}" if args.extra else "")
    )


def run_config(sites: int, args: argparse.Namespace, cache_dir: Path, run_dir: Path) -> dict[str, str]:
    """Flower's run-config of one run (the app declares ``experiment`` and ``overrides``)."""
    return {"experiment": "", "overrides": overrides(sites, args, cache_dir, run_dir)}


def prepare_data(sites: Sequence[int], args: argparse.Namespace, cache_dir: Path) -> dict[str, Any]:
    """Generate each federation once, before any timed run; returns what the doc reports."""
    from medseg_core.config import load_config
    from medseg_core.data.source import ensure_data_root
    from medseg_core.models import build_model

    info: dict[str, Any] = {}
    for n in sites:
        cfg = load_config(run_config(n, args, cache_dir, cache_dir / "unused"))
        info[f"root_{n}"] = str(ensure_data_root(cfg.data))
    info["val_fraction"] = float(cfg.data.val_fraction)
    kwargs = {k: v for k, v in dict(cfg.model).items() if k not in ("_target_", "pretrained")}
    kwargs.update(in_channels=1, out_channels=3, channels=list(kwargs["channels"]), strides=list(kwargs["strides"]))
    model = build_model(kwargs.pop("name"), **kwargs)
    info["params"] = sum(p.numel() for p in model.parameters())
    return info


# ------------------------------------------------------------------------------------------------
# arms that run inside a child process (``--child ARM``)


def child_inprocess(rc: dict[str, str]) -> None:
    """The ServerApp loop and the ClientApp over an in-process Grid (every site in a thread)."""
    import torch

    from client.app import app as client_app
    from medseg_core.config import load_config
    from server.inprocess import InProcessGrid
    from server.loop import FederatedRun

    torch.set_num_threads(1)  # one CPU per site, as in the simulation (client-resources-num-cpus=1)
    cfg = load_config(rc)
    n = int(cfg.data.synthetic.n_sites)
    nodes = [{"partition-id": i, "num-partitions": n} for i in range(n)]
    FederatedRun(InProcessGrid([client_app] * n, nodes, run_config=rc), cfg).run()


def child_plain(rc: dict[str, str], out: Path) -> None:
    """Each site's local training and evaluation called directly, as many sites at once as CPUs.

    Writes ``{"setup_s", "rounds": [{"train", "evaluate", "round"}], "loop_start_epoch",
    "rounds_start_epoch", "loop_end_epoch"}`` (seconds; epochs from ``time.time()``) to ``out``.
    """
    import numpy as np
    import torch

    from client.local import TrainInstructions, TrainOutcome, evaluate_round, train_round
    from client.site import SiteRef, SiteState, load_validated_site, resolve_site, site_data
    from medseg_core.config import load_config
    from medseg_core.data.fingerprint import compute_site_fingerprint, make_plan, merge_fingerprints
    from medseg_core.federation import NUM_EXAMPLES, SPLIT_VAL, dumps, loads, state_to_numpy
    from medseg_core.runtime import seed_everything
    from medseg_core.workflow import build_configured_model, model_config
    from server.loop import round_learning_rates

    epoch0, t0 = time.time(), time.perf_counter()
    torch.set_num_threads(1)
    cfg = load_config(rc)
    seed_everything(int(cfg.seed))
    n, rounds = int(cfg.data.synthetic.n_sites), int(cfg.fl.num_rounds)
    refs = [resolve_site(cfg, {"partition-id": i, "num-partitions": n}) for i in range(n)]
    fingerprints = []
    for ref in refs:
        fp = compute_site_fingerprint(load_validated_site(ref, cfg))
        fp["sites"] = [ref.name]
        fingerprints.append(fp)
    # exactly what a site receives from the server (a JSON string in the round's config)
    plan = loads(dumps(make_plan(merge_fingerprints(fingerprints))), "plan")
    kwargs = model_config(cfg.model, in_channels=int(plan["num_channels"]),
                          out_channels=int(plan["num_classes"]), plan=plan)
    torch.manual_seed(int(cfg.seed))
    global_arrays = state_to_numpy(build_configured_model(kwargs).state_dict())
    lrs = round_learning_rates(cfg, rounds)
    run_name = f"plain-{os.getpid()}"
    setup_s = time.perf_counter() - t0

    def train(r: int, ref: SiteRef) -> TrainOutcome:
        instructions = TrainInstructions(server_round=r, lr=lrs[r - 1], local_epochs=int(cfg.fl.local_epochs))
        return train_round(cfg, site_data(ref, cfg, plan), plan, global_arrays, instructions,
                           SiteState(ref.state_root, run_name), simulated=True)

    def evaluate(r: int, ref: SiteRef) -> dict[str, float]:
        return evaluate_round(cfg, site_data(ref, cfg, plan), plan, global_arrays, split=SPLIT_VAL,
                              server_round=r, state=SiteState(ref.state_root, run_name))

    timings, rounds_start_epoch = [], time.time()
    # as many sites at once as there are CPUs, one torch thread each: what the simulation does with
    # client-resources-num-cpus=1 (one process, no messages)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for r in range(1, rounds + 1):
            t_round = time.perf_counter()
            outcomes = list(pool.map(lambda ref, r=r: train(r, ref), refs))
            weights = np.array([o.metrics[NUM_EXAMPLES] for o in outcomes], dtype=np.float64)
            global_arrays = {  # FedAvg: weighted by training cases, as the app's strategy does
                k: np.average(np.stack([o.arrays[k] for o in outcomes]), axis=0, weights=weights).astype(v.dtype)
                for k, v in global_arrays.items()
            }
            t_train = time.perf_counter() - t_round
            list(pool.map(lambda ref, r=r: evaluate(r, ref), refs))
            timings.append({"train": t_train, "evaluate": time.perf_counter() - t_round - t_train,
                            "round": time.perf_counter() - t_round})
    out.write_text(json.dumps({"setup_s": setup_s, "rounds": timings, "loop_start_epoch": epoch0,
                               "rounds_start_epoch": rounds_start_epoch, "loop_end_epoch": time.time()}))


# ------------------------------------------------------------------------------------------------
# the process tree of a run: memory and clean-up


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """``pid -> (parent pid, start time, CPU time used)`` of every process, times in clock ticks (``/proc``)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if rest[0] == b"Z":  # exited, not yet reaped by its parent: gone
            continue
        # fields after the name: state ppid ... utime(12th) stime(13th) ... starttime(20th)
        table[int(entry.name)] = (int(rest[1]), int(rest[19]), int(rest[11]) + int(rest[12]))
    return table


def _memory_kb(pid: int) -> tuple[int, int] | None:
    """``(RSS, PSS)`` of a process in kB (PSS = RSS where ``smaps_rollup`` is unavailable)."""
    values = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith((b"Rss:", b"Pss:")):
                    values[line[:3].decode()] = int(line.split()[1])
        return values["Rss"], values["Pss"]
    except (OSError, KeyError):
        pass
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    kb = int(line.split()[1])
                    return kb, kb
    except OSError:
        return None
    return None


def _label(pid: int) -> str:
    """What a process is, for the memory breakdown (Flower's and Ray's processes grouped by role)."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return "?"
    text = " ".join(argv)
    for marker, label in (("flower-superlink", "SuperLink"), ("flower-superexec", "SuperExec"),
                          ("flwr-simulation", "flwr-simulation (ServerApp, Ray driver)"),
                          ("bin/flwr run", "flwr run (CLI)"), ("--child", "bench child (everything)")):
        if marker in text:
            return label
    if text.startswith(("ray::IDLE", "ray::ClientAppActor")) or "default_worker.py" in text or "setup_worker.py" in text:
        return "Ray workers (ClientApp actors)"
    if text.startswith("ray::") or "/ray/" in text:
        return "Ray daemons (GCS, raylet, dashboard, agents, monitors)"
    return os.path.basename(argv[0]) if argv else "?"


class ProcessTree(threading.Thread):
    """Samples the memory and CPU time of a process and of every descendant it ever had.

    A descendant stays tracked after its parent exits (the SuperLink ``flwr run`` leaves behind, Ray's
    daemons), identified by pid and start time so that a reused pid is never mistaken for it. The CPU
    time of the tree is the sum over every process seen of its last sampled user + system time (a
    process that exits between two samples loses at most ``interval_s`` of it).

    Args:
        root: pid of the launched command.
        interval_s: seconds between samples.
    """

    def __init__(self, root: int, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.tracked: dict[int, int] = {}  # alive: pid -> start time
        self.cpu_ticks: dict[tuple[int, int], int] = {}  # every process seen: (pid, start) -> CPU ticks
        self.cpu_samples: list[tuple[float, float]] = []  # (time.time(), CPU seconds of the tree so far)
        self.peak_rss_kb = self.peak_pss_kb = 0
        self.peak_breakdown: dict[str, dict[str, float]] = {}  # at the PSS peak: label -> MB, processes
        self.max_processes = 0
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        table = _proc_table()
        if root in table:
            self.tracked[root] = table[root][1]

    def _update(self, table: dict[int, tuple[int, int, int]]) -> list[int]:
        with self._lock:
            for pid in [p for p, start in self.tracked.items() if table.get(p, (0, -1, 0))[1] != start]:
                self.tracked.pop(pid)  # gone (or its pid reused)
            children: dict[int, list[int]] = {}
            for pid, (ppid, _start, _cpu) in table.items():
                children.setdefault(ppid, []).append(pid)
            todo = list(self.tracked)
            while todo:
                for child in children.get(todo.pop(), []):
                    if child not in self.tracked:
                        self.tracked[child] = table[child][1]
                        todo.append(child)
            for pid, start in self.tracked.items():
                self.cpu_ticks[(pid, start)] = table[pid][2]
            return list(self.tracked)

    def sample(self) -> None:
        """One sample: refresh the tree, sum RSS, PSS and CPU time, keep the peaks."""
        rss = pss = 0
        memory: dict[int, tuple[int, int]] = {}
        alive = self._update(_proc_table())
        self.cpu_samples.append((time.time(), sum(self.cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")))
        for pid in alive:
            mem = _memory_kb(pid)
            if mem is not None:
                memory[pid] = mem
                rss, pss = rss + mem[0], pss + mem[1]
        self.max_processes = max(self.max_processes, len(alive))
        if pss > self.peak_pss_kb:  # label only at a new peak (Ray's workers change their title once started)
            self.peak_pss_kb, self.peak_breakdown = pss, {}
            for pid, (_rss, pss_kb) in memory.items():
                entry = self.peak_breakdown.setdefault(_label(pid), {"mb": 0.0, "processes": 0})
                entry["mb"] += pss_kb / 1024
                entry["processes"] += 1
        self.peak_rss_kb = max(self.peak_rss_kb, rss)

    def cpu_s_at(self, epoch: float) -> float:
        """CPU seconds the tree had used at ``epoch`` (``time.time()``), interpolated between samples."""
        samples = self.cpu_samples
        if not samples or epoch <= samples[0][0]:
            return samples[0][1] if samples else 0.0
        for (t0, c0), (t1, c1) in pairwise(samples):
            if epoch <= t1:
                return c0 + (c1 - c0) * (epoch - t0) / max(t1 - t0, 1e-9)
        return samples[-1][1]

    def run(self) -> None:  # noqa: D102
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        """Stop sampling and take a last sample."""
        self._stop_event.set()
        self.join()
        self.sample()

    def terminate_all(self, timeout_s: float = 20.0) -> float:
        """SIGTERM every tracked process still alive, SIGKILL what remains after ``timeout_s``.

        Returns:
            Seconds until none is left.
        """
        t0 = time.perf_counter()
        alive = self._update(_proc_table())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in alive:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout_s
            while alive and time.monotonic() < deadline:
                time.sleep(0.1)
                table = _proc_table()
                alive = [p for p in alive if table.get(p, (0, -1, 0))[1] == self.tracked.get(p)]
            if not alive:
                break
        return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# one run of one arm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _history(run_dir: Path, log: Path) -> dict[str, Any]:
    path = run_dir / "history.json"
    if not path.is_file():
        raise RuntimeError(f"the run wrote no {path}; see its log {log}")
    history = json.loads(path.read_text())
    if history.get("status") != "completed":
        raise RuntimeError(f"run {run_dir} ended with status {history.get('status')!r} "
                           f"({history.get('stop_reason', 'no reason')}); see its log {log}")
    return history


def run_arm(arm: str, sites: int, args: argparse.Namespace, work: Path, tag: str) -> dict[str, Any]:
    """Launch one run of ``arm`` with ``sites`` sites in a fresh process tree; time and sample it.

    Raises:
        RuntimeError: the run failed (the message names its log file).
    """
    run_dir = work / "runs" / f"{tag}-{arm}-{sites}"
    log = work / "logs" / f"{tag}-{arm}-{sites}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun in the same --work-dir starts afresh
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    rc = run_config(sites, args, work / "cache", run_dir)
    env = {**os.environ, "MPLBACKEND": "Agg", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "MEDSEG_CACHE_DIR": str(work / "cache")}
    plain_out = work / "runs" / f"{tag}-plain-{sites}.json"
    if arm == "flower":
        env.update(FLWR_HOME=str(work / "flwr" / f"{tag}-{sites}"),  # a cold SuperLink for every run
                   FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
                   FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()))
        run_cfg = " ".join(f"{k}={json.dumps(v)}".replace('"', "'") for k, v in rc.items())
        cmd = ["flwr", "run", str(ROOT), "--stream", "--run-config", run_cfg,
               "--federation-config", f"num-supernodes={sites} client-resources-num-cpus={args.client_cpus}"
               + (f" init-args-num-cpus={args.runtime_cpus}" if args.runtime_cpus else "")]
        cwd = work
    else:
        env.update(OMP_NUM_THREADS="1")  # one torch thread per site, as Ray gives each simulated site one CPU
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", arm, "--rc", json.dumps(rc),
               "--child-out", str(plain_out)]
        cwd = ROOT
    with open(log, "w") as out:
        epoch0, t0 = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        tree = ProcessTree(proc.pid)
        tree.start()
        try:
            rc_exit = proc.wait(timeout=args.timeout_s)
        except subprocess.TimeoutExpired:
            rc_exit = None
        wall_s = time.perf_counter() - t0
        teardown_s = tree.terminate_all()  # what `flwr run` leaves running (SuperLink, SuperExec, Ray)
        tree.stop()
    if rc_exit != 0:
        raise RuntimeError(f"{arm} with {sites} sites {'timed out' if rc_exit is None else f'exited {rc_exit}'}; "
                           f"see {log}")
    if arm == "plain":
        result = json.loads(plain_out.read_text())
        phases = result["rounds"]
        loop_start, loop_end, setup_s = result["loop_start_epoch"], result["loop_end_epoch"], result["setup_s"]
        rounds_start = result["rounds_start_epoch"]
    else:
        history = _history(run_dir, log)
        phases = [r["seconds"] for r in history["rounds"]]
        # total_s is taken just before history.json is written for the last time; report.md is written last
        loop_start = (run_dir / "history.json").stat().st_mtime - float(history["timings"]["total_s"])
        loop_end = (run_dir / "report.md").stat().st_mtime
        setup_s = float(history["timings"]["setup_s"])
        rounds_start = loop_start + setup_s
    rounds = [p["round"] for p in phases]
    rounds_cpu_s = tree.cpu_s_at(rounds_start + sum(rounds)) - tree.cpu_s_at(rounds_start)
    record = {
        "arm": arm, "sites": sites, "tag": tag, "wall_s": wall_s, "round_s": rounds,
        "train_s": [p["train"] for p in phases], "evaluate_s": [p["evaluate"] for p in phases],
        "start_s": loop_start - epoch0, "setup_s": setup_s, "stop_s": epoch0 + wall_s - loop_end,
        "fixed_s": wall_s - sum(rounds), "teardown_s": teardown_s,
        "round_cpu_s": rounds_cpu_s / len(rounds), "total_cpu_s": tree.cpu_samples[-1][1],
        "peak_rss_mb": tree.peak_rss_kb / 1024, "peak_pss_mb": tree.peak_pss_kb / 1024,
        "peak_breakdown": tree.peak_breakdown,
        "max_processes": tree.max_processes, "log": str(log),
    }
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return record


# ------------------------------------------------------------------------------------------------
# summary


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per number of sites: medians over repeats, ratios taken within each repeat.

    A run's round time is the mean over its rounds (wall and CPU seconds of the whole process tree);
    a ratio is Flower's over the other arm's in the same repeat (both saw about the same machine
    load), and the row keeps the median over repeats. Memory is the largest peak over repeats.

    Returns:
        ``[{"sites", "repeats", <arm>: {...medians...}, "ratio_<arm>", "cpu_ratio_<arm>",
        "extra_s_<arm>", "ratio_<arm>_per_repeat"}]`` for ``<arm>`` in ``inprocess`` / ``plain``.
    """
    rows = []
    for sites in sorted({r["sites"] for r in records}):
        by_arm: dict[str, dict[str, dict[str, Any]]] = {}
        for r in records:
            if r["sites"] == sites:
                by_arm.setdefault(r["arm"], {})[r["tag"]] = r
        row: dict[str, Any] = {"sites": sites, "repeats": max(len(v) for v in by_arm.values())}
        for arm, runs in by_arm.items():
            row[arm] = {
                "round_s": statistics.median(_mean(r["round_s"]) for r in runs.values()),
                "later_round_s": statistics.median(_mean(r["round_s"][1:] or r["round_s"]) for r in runs.values()),
                **{k: statistics.median(r[k] for r in runs.values())
                   for k in ("round_cpu_s", "wall_s", "fixed_s", "start_s", "setup_s", "stop_s", "teardown_s")},
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs.values()),
                "peak_pss_mb": max(r["peak_pss_mb"] for r in runs.values()),
                "peak_breakdown": max(runs.values(), key=lambda r: r["peak_pss_mb"])["peak_breakdown"],
            }
        flower = by_arm.get("flower", {})
        for other in ("inprocess", "plain"):
            pairs = [(flower[t], by_arm[other][t]) for t in flower if t in by_arm.get(other, {})]
            if pairs:
                ratios = [_mean(f["round_s"]) / _mean(o["round_s"]) for f, o in pairs]
                row[f"ratio_{other}"] = statistics.median(ratios)
                row[f"ratio_{other}_per_repeat"] = ratios
                row[f"cpu_ratio_{other}"] = statistics.median(f["round_cpu_s"] / o["round_cpu_s"] for f, o in pairs)
                row[f"extra_s_{other}"] = statistics.median(_mean(f["round_s"]) - _mean(o["round_s"])
                                                            for f, o in pairs)
        rows.append(row)
    return rows


def _cell(row: dict[str, Any], arm: str, key: str, spec: str = ".1f") -> str:
    return format(row[arm][key], spec) if arm in row else "-"


def _ratio(row: dict[str, Any], key: str, bold: bool = False) -> str:
    if key not in row:
        return "-"
    return f"**{row[key]:.2f}×**" if bold else f"{row[key]:.2f}×"


def markdown(rows: list[dict[str, Any]], info: dict[str, Any], command: str, loads: Sequence[float]) -> str:
    """The doc block: command, machine, setup, the table, Flower's memory by process at the most sites."""
    a = info["args"]
    load = f"{min(loads):.1f}–{max(loads):.1f}" if loads else "n/a"
    repeats = rows[0]["repeats"] if rows else 0
    val_cases = max(1, round(info["val_fraction"] * a["cases"]))  # medseg_core.data.loaders.split_train_val
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {info['machine']}, {info['cpus']} CPUs, 1-min load average after each run {load}; torch "
        f"{info['torch']}, flwr {info['flwr']}, {info['date']}; {info.get('minutes', 0):.0f} min in all.",
        "",
        f"Federation: the embedded synthetic one with N sites × {a['cases']} cases of {a['shape']}³ "
        f"({a['cases'] - val_cases} training + {val_cases} validation each), MONAI 3D U-Net with "
        f"{info['params']:,} parameters, {a['rounds']} rounds × 1 local epoch (1 crop per case, batch 2), FedAvg, "
        f"no final test; {repeats} interleaved repeat(s), each run a fresh process tree. *Round*: train + "
        "evaluate + aggregate + checkpoint, mean over the rounds of a run, median over repeats; *CPU*: user + "
        "system seconds of the whole process tree during the rounds; ratios: median over repeats of the ratio "
        "within a repeat. *Fixed cost* = wall time − Σ rounds = start (launch → loop) + round 0 (enrolment, "
        "plan, model) + stop (loop end → exit). *Memory*: peak over the run of the process tree's summed PSS "
        "(RSS in brackets).",
        "",
        "| sites | round (s): Flower / in-process / plain | **Flower ÷ in-process** | Flower ÷ plain | "
        "round CPU (s): Flower / in-process (ratio) | fixed cost (s): Flower = start + round 0 + stop / "
        "in-process | peak memory (MB): Flower / in-process / plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cpu = f"{_cell(row, 'flower', 'round_cpu_s')} / {_cell(row, 'inprocess', 'round_cpu_s')}"
        if "cpu_ratio_inprocess" in row:
            cpu += f" ({row['cpu_ratio_inprocess']:.2f}×)"
        fixed = "-"
        if "flower" in row:
            f = row["flower"]
            fixed = f"{f['fixed_s']:.1f} = {f['start_s']:.1f} + {f['setup_s']:.1f} + {f['stop_s']:.1f}"
        memory = " / ".join(f"{row[arm]['peak_pss_mb']:.0f} ({row[arm]['peak_rss_mb']:.0f})" if arm in row else "-"
                            for arm in ("flower", "inprocess", "plain"))
        lines.append(
            f"| {row['sites']} | {_cell(row, 'flower', 'round_s', '.2f')} / {_cell(row, 'inprocess', 'round_s', '.2f')}"
            f" / {_cell(row, 'plain', 'round_s', '.2f')} | {_ratio(row, 'ratio_inprocess', bold=True)} | "
            f"{_ratio(row, 'ratio_plain')} | {cpu} | {fixed} / {_cell(row, 'inprocess', 'fixed_s')} | {memory} |"
        )
    per_repeat = [f"{row['sites']} sites " + ", ".join(f"{x:.2f}" for x in row["ratio_inprocess_per_repeat"])
                  for row in rows if "ratio_inprocess_per_repeat" in row]
    if per_repeat:
        lines += ["", "Flower ÷ in-process in each repeat: " + "; ".join(per_repeat) + ". Stopping what `flwr run` "
                  "leaves running (SuperLink, SuperExec) took a further "
                  + ", ".join(f"{row['flower']['teardown_s']:.1f} s" for row in rows if "flower" in row)
                  + " (not in the fixed cost)."]
    big = next((r for r in reversed(rows) if "flower" in r), None)
    if big is not None:
        parts = sorted(big["flower"]["peak_breakdown"].items(), key=lambda kv: -kv[1]["mb"])
        lines += ["", f"Flower's peak with {big['sites']} sites, PSS by process (MB): " + ", ".join(
            f"{name} {e['mb']:.0f}" + (f" ({e['processes']} processes)" if e["processes"] > 1 else "")
            for name, e in parts) + "."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sites", type=int, nargs="+", default=[3, 10], help="numbers of sites (default 3 10)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds per run (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every arm (default 3)")
    p.add_argument("--shape", type=int, default=40, help="edge of the stored synthetic volumes (default 40)")
    p.add_argument("--cases", type=int, default=6, help="labelled cases per site (default 6)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--client-cpus", type=int, default=1,
                   help="client-resources-num-cpus of the Flower arm (2 on this 2-core machine: one actor)")
    p.add_argument("--runtime-cpus", type=int, default=None,
                   help="init-args-num-cpus of the Flower arm: the CPUs Ray believes it has (default: the "
                        "machine's); the number of sites gives every site its own actor, as in-process threads")
    p.add_argument("--set", dest="extra", default="",
                   help="more Hydra overrides for every arm, e.g. 'fl.keep_optimizer_state=false'")
    p.add_argument("--work-dir", type=Path, default=None, help="where data, runs and logs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the run directories and logs")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="limit for one run")
    p.add_argument("--quick", action="store_true", help="3 sites, 2 rounds, 32^3, 4 cases, 1 repeat")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="write the command, setup and every run's record here")
    p.add_argument("--from-json", type=Path, default=None, help="summarise a --json file instead of measuring")
    p.add_argument("--child", choices=["inprocess", "plain"], help=argparse.SUPPRESS)
    p.add_argument("--rc", help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sites, args.rounds, args.repeats, args.shape, args.cases = [3], 2, 1, 32, 4
    for name in ("rounds", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.cases < 4:
        p.error(f"--cases must be >= 4 (3 training + 1 validation case per site), got {args.cases}")
    if min(args.sites) < 2:
        p.error(f"--sites must be >= 2 (FedAvg needs two sites), got {args.sites}")
    return args


def measure(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Every run of every arm; returns ``{"command", "info", "records"}`` (also saved to ``--json``)."""
    import flwr
    import torch

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fed-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    info = prepare_data(args.sites, args, work / "cache")
    info.update(args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                torch=torch.__version__, flwr=flwr.__version__, cpus=os.cpu_count(), machine=platform.machine(),
                date=date.today().isoformat())
    print(f"model: {info['params']:,} parameters; data under {work / 'cache'}", flush=True)
    result: dict[str, Any] = {"command": command, "info": info, "records": []}
    try:
        for rep in range(args.repeats):
            for sites in args.sites:
                for arm in args.arms if rep % 2 == 0 else args.arms[::-1]:
                    rec = run_arm(arm, sites, args, work, tag=f"r{rep}")
                    rec["load_1min"] = os.getloadavg()[0]
                    result["records"].append(rec)
                    print(f"repeat {rep + 1}/{args.repeats} {arm:9s} {sites:2d} sites: rounds "
                          f"{' '.join(f'{s:.2f}' for s in rec['round_s'])} s, wall {rec['wall_s']:.1f} s, fixed "
                          f"{rec['fixed_s']:.1f} s, peak PSS {rec['peak_pss_mb']:.0f} MB "
                          f"(RSS {rec['peak_rss_mb']:.0f} MB, {rec['max_processes']} processes), "
                          f"load {rec['load_1min']:.1f}", flush=True)
                    info["minutes"] = (time.perf_counter() - t_start) / 60
                    if args.json is not None:  # after every run: an interrupted bench keeps what it measured
                        args.json.write_text(json.dumps(result, indent=1))
    finally:
        if args.work_dir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        rc = json.loads(args.rc)
        child_inprocess(rc) if args.child == "inprocess" else child_plain(rc, args.child_out)
        return 0
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
    else:
        if not Path("/proc/self/stat").exists():
            raise SystemExit("bench/federation_overhead.py measures process trees through /proc (Linux only)")
        if "flower" in args.arms and shutil.which("flwr") is None:
            raise SystemExit("the 'flower' arm needs Flower's CLI `flwr` on PATH (pip install -e .)")
        command = "python bench/federation_overhead.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        result = measure(args, command.strip())
    rows = summarize(result["records"])
    print(json.dumps(rows, indent=1))
    md = markdown(rows, result["info"], result["command"], [r["load_1min"] for r in result["records"]])
    print(md)
    if args.write_docs:
        from docs_block import write_block  # bench/ is on sys.path when this file runs as a script

        write_block(BLOCK, SECTION, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
