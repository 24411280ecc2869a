"""``medseg-site``: prepare and launch one hospital's SuperNode.

    medseg-site certs --out certs --hosts superlink.example.org 10.0.0.5 --sites hospital_a hospital_b
    medseg-site validate /data/hospital_a
    medseg-site run --site-dir /data/hospital_a --state-dir /var/lib/medseg/hospital_a \\
        --superlink superlink.example.org:8000 --root-certificates certs/ca.crt \\
        --auth-key certs/sites/hospital_a/node.key

``run`` validates the site's dataset first (a bad dataset stops it with the full validation report,
before anything connects), then replaces itself with ``flower-supernode``, passing the site's node
config (``site-dir``, ``state-dir``, ``site-id``), the TLS root certificate and the node
authentication key. Hospital paths are given here, on the hospital's machine, and never appear in the
shared configuration.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from client.certs import make_deployment_files
from medseg_core.data.validate import skip_bad_cases, validate_site
from medseg_core.federation import NODE_SITE_DIR, NODE_SITE_ID, NODE_STATE_DIR, check_safe_name

EXIT_OK, EXIT_BAD_DATA, EXIT_USAGE = 0, 1, 2
DEFAULT_STATE_ROOT = Path("~/.local/state/medseg")


def _err(text: str) -> None:
    print(f"medseg-site: {text}", file=sys.stderr)


def validate(site_dir: Path, *, skip_bad: bool = False) -> bool:
    """Print the site's validation report; ``True`` when it can take part.

    With ``skip_bad`` the site may take part without its bad cases (listed), as ``data.skip_bad_cases``
    allows; the federation's config must then also set ``data.skip_bad_cases=true``.
    """
    report = validate_site(site_dir)
    print(report.format_text())
    if report.ok:
        return True
    if skip_bad:
        try:
            site, skipped, _ = skip_bad_cases(site_dir)
        except ValueError as exc:
            _err(str(exc))
            return False
        print(
            f"{len(skipped)} bad case(s) will be left out: {sorted(c.case_id for c in skipped)}; "
            f"{len(site.train_cases)} training case(s) remain"
        )
        return True
    return False


def node_config(site_dir: Path, state_dir: Path, site_id: str) -> str:
    """The ``--node-config`` string of a site (quoted values: paths may hold spaces)."""
    return " ".join(
        f"{key}={_toml_string(str(value))}"
        for key, value in ((NODE_SITE_DIR, site_dir), (NODE_STATE_DIR, state_dir), (NODE_SITE_ID, site_id))
    )


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def supernode_command(args: argparse.Namespace, site_dir: Path, state_dir: Path, site_id: str) -> list[str]:
    """The ``flower-supernode`` command line for this site.

    Raises:
        ValueError: neither a root certificate nor ``--insecure``.
    """
    exe = shutil.which("flower-supernode") or "flower-supernode"
    cmd = [
        exe,
        "--superlink",
        args.superlink,
        "--node-config",
        node_config(site_dir, state_dir, site_id),
        "--port",
        str(args.runtime_port),
    ]
    if args.insecure:
        cmd.append("--insecure")
    elif args.root_certificates:
        cmd += ["--root-certificates", str(Path(args.root_certificates).expanduser().resolve())]
    else:
        raise ValueError(
            "give the federation's CA certificate with --root-certificates (or --insecure for a "
            "test on one machine; never across hospitals)"
        )
    if args.auth_key:
        cmd += ["--auth-supernode-private-key", str(Path(args.auth_key).expanduser().resolve())]
    if args.max_retries is not None:
        cmd += ["--max-retries", str(args.max_retries)]
    return cmd + list(args.supernode_args)


def _cmd_run(args: argparse.Namespace) -> int:
    site_dir = Path(args.site_dir).expanduser().resolve()
    if not site_dir.is_dir():
        _err(f"--site-dir {site_dir} is not a folder")
        return EXIT_USAGE
    try:
        site_id = check_safe_name(args.site_id or site_dir.name, "--site-id")
        state_dir = (
            Path(args.state_dir).expanduser().resolve()
            if args.state_dir
            else (DEFAULT_STATE_ROOT / site_id).expanduser().resolve()
        )
        cmd = supernode_command(args, site_dir, state_dir, site_id)
    except ValueError as exc:
        _err(str(exc))
        return EXIT_USAGE
    for path, what in ((args.root_certificates, "--root-certificates"), (args.auth_key, "--auth-key")):
        if path and not Path(path).expanduser().is_file():
            _err(f"{what} {path} does not exist")
            return EXIT_USAGE
    if not validate(site_dir, skip_bad=args.skip_bad_cases):
        _err(
            f"the dataset of {site_id} is not usable (report above); fix it or use --skip-bad-cases; "
            f"the SuperNode was not started"
        )
        return EXIT_BAD_DATA
    print(f"site {site_id}: data {site_dir}, state {state_dir}")
    print(("would start: " if args.dry_run else "starting: ") + shlex.join(cmd), flush=True)
    if args.dry_run:
        return EXIT_OK
    state_dir.mkdir(parents=True, exist_ok=True)
    os.execv(cmd[0], cmd)  # the SuperNode takes over this process (signals reach it directly)
    return EXIT_OK  # not reached


def _cmd_validate(args: argparse.Namespace) -> int:
    return (
        EXIT_OK if validate(Path(args.site_dir).expanduser(), skip_bad=args.skip_bad_cases) else EXIT_BAD_DATA
    )


def _cmd_certs(args: argparse.Namespace) -> int:
    try:
        files = make_deployment_files(args.out, hosts=args.hosts, sites=args.sites)
    except ValueError as exc:
        _err(str(exc))
        return EXIT_USAGE
    print(
        f"SuperLink: flower-superlink --ssl-ca-certfile {files.ca_cert} --ssl-certfile {files.superlink_cert} "
        f"--ssl-keyfile {files.superlink_key} --enable-supernode-auth"
    )
    for site in args.sites:
        print(f"register {site}: flwr supernode register {files.node_pub(site)} <superlink-connection>")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg-site", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="validate the site's dataset, then start its flower-supernode")
    run.add_argument("--site-dir", required=True, help="the site's dataset folder (nnU-Net raw layout)")
    run.add_argument(
        "--state-dir", help=f"where the site keeps its state (default {DEFAULT_STATE_ROOT}/<site-id>)"
    )
    run.add_argument("--site-id", help="the site's name in the federation (default: the folder name)")
    run.add_argument("--superlink", required=True, help="the SuperLink's Fleet API address, host:port")
    run.add_argument(
        "--root-certificates", help="the federation's CA certificate (PEM), to verify the SuperLink"
    )
    run.add_argument("--auth-key", help="this site's node-authentication private key (node.key)")
    run.add_argument("--insecure", action="store_true", help="no TLS (tests on one machine only)")
    run.add_argument(
        "--runtime-port",
        type=int,
        default=9094,
        help="local port of the SuperNode's runtime API (one per SuperNode on a machine)",
    )
    run.add_argument("--max-retries", type=int, help="give up after this many failed connection attempts")
    run.add_argument(
        "--skip-bad-cases", action="store_true", help="take part without the cases that fail validation"
    )
    run.add_argument("--dry-run", action="store_true", help="validate and print the command, start nothing")
    run.add_argument(
        "supernode_args", nargs=argparse.REMAINDER, help="after --: extra flower-supernode arguments"
    )
    run.set_defaults(func=_cmd_run)

    val = sub.add_parser("validate", help="check the site's dataset (what `run` does first)")
    val.add_argument("site_dir")
    val.add_argument("--skip-bad-cases", action="store_true")
    val.set_defaults(func=_cmd_validate)

    certs = sub.add_parser("certs", help="create the CA, the SuperLink certificate and per-site node keys")
    certs.add_argument("--out", required=True, help="output folder (existing files are kept)")
    certs.add_argument(
        "--hosts",
        nargs="*",
        default=["127.0.0.1", "localhost"],
        help="the SuperLink's host names / IP addresses (certificate SANs)",
    )
    certs.add_argument("--sites", nargs="*", default=[], help="site ids to create node keys for")
    certs.set_defaults(func=_cmd_certs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "supernode_args", None) and args.supernode_args[0] == "--":
        args.supernode_args = args.supernode_args[1:]
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
