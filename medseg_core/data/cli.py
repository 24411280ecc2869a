"""``medseg-data``: synthetic federations, dataset validation, previews, fingerprints and plans.

Subcommands::

    medseg-data synth --out DIR [--sites N] [--cases-per-site K] [--seed S] [--shape X Y Z]
                      [--test T] [--unlabelled M]
    medseg-data validate PATH [--json] [--verbose]
    medseg-data preview PATH --out FILE.png
    medseg-data fingerprint PATH [--out FILE] [--plan FILE] [--no-validate]
    medseg-data plan FP.json [FP.json ...] --out plan.json

Exit status: 0 success, 1 the data has errors or the command failed (with a message naming the file
and the reason, never a traceback), 2 bad command-line usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from medseg_core.data.problems import DatasetError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _cmd_synth(args: argparse.Namespace) -> int:
    from medseg_core.data.synthetic import make_federation

    start = time.perf_counter()
    sites = make_federation(args.out, n_sites=args.sites, cases_per_site=args.cases_per_site, seed=args.seed,
                            shape=tuple(args.shape), n_test=args.test, n_unlabelled=args.unlabelled,
                            progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    print(f"wrote {len(sites)} site(s) to {args.out} in {elapsed:.1f} s")
    for site in sites:
        with open(site / "dataset.json", encoding="utf-8") as f:
            meta = json.load(f)
        print(f"  {site.name}: {meta['scanner']['description']}")
    print(f"check with: medseg-data validate {args.out}")
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    from medseg_core.data.validate import validate_path

    report = validate_path(args.path)
    print(report.to_json() if args.json else report.format_text(verbose=args.verbose))
    return EXIT_OK if report.ok else EXIT_FAILED


def _cmd_preview(args: argparse.Namespace) -> int:
    from medseg_core.data.preview import render_preview

    out = render_preview(args.path, args.out, dpi=args.dpi)
    print(f"wrote {out}")
    return EXIT_OK


def _load_fingerprint_module():
    try:
        from medseg_core.data import fingerprint
    except ImportError as exc:
        raise RuntimeError(f"fingerprinting is not available (medseg_core.data.fingerprint: {exc})") from exc
    return fingerprint


def _cmd_fingerprint(args: argparse.Namespace) -> int:
    from medseg_core.data.dataset import is_site_dir, load_federation
    from medseg_core.data.validate import validate_path

    fpm = _load_fingerprint_module()
    if not args.no_validate:
        report = validate_path(args.path)
        if not report.ok:
            print(report.format_text())
            _err(f"{args.path} has {len(report.errors)} error(s); fix them (or pass --no-validate) first")
            return EXIT_FAILED
    sites = load_federation(args.path)
    fps = {s.name: fpm.compute_site_fingerprint(s) for s in sites}
    for fp in fps.values():
        for p in fpm.fingerprint_problems(fp):
            print(f"warning: {p.path}: {p.message}", file=sys.stderr)
    # One site: the bare fingerprint (what a hospital sends); a federation root: {site: fingerprint}.
    out_obj = next(iter(fps.values())) if is_site_dir(args.path) else fps
    if args.out:
        fpm.save_json(out_obj, args.out)
        print(f"wrote fingerprint of {len(fps)} site(s) to {args.out}")
    else:
        print(json.dumps(out_obj, indent=1))
    if args.plan:
        plan = fpm.make_plan(fpm.merge_fingerprints(list(fps.values())))
        fpm.save_json(plan, args.plan)
        print(f"wrote plan for {len(fps)} site(s) to {args.plan}")
    return EXIT_OK


def _read_fingerprints(path: Path, kind: str) -> list[dict]:
    """A fingerprint file holds one fingerprint or a ``{site: fingerprint}`` mapping."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: file does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from None
    if isinstance(obj, dict) and obj.get("kind") == kind:
        return [obj]
    if isinstance(obj, dict) and obj and all(isinstance(v, dict) and v.get("kind") == kind for v in obj.values()):
        return list(obj.values())
    raise ValueError(f"{path}: neither a fingerprint nor a {{site: fingerprint}} mapping "
                     f"(written by 'medseg-data fingerprint')")


def _cmd_plan(args: argparse.Namespace) -> int:
    fpm = _load_fingerprint_module()
    fps = [fp for p in args.fingerprints for fp in _read_fingerprints(Path(p), fpm.FINGERPRINT_KIND)]
    plan = fpm.make_plan(fpm.merge_fingerprints(fps))
    fpm.save_json(plan, args.out)
    names = sorted(s for fp in fps for s in fp.get("sites", []))
    print(f"wrote plan for {len(names)} site(s) {names} to {args.out}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medseg-data", description="Site datasets: synthetic federation, validation, preview, fingerprint, plan.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic multi-site federation (NIfTI site folders)")
    p.add_argument("--out", required=True, type=Path, help="federation root to create")
    p.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    p.add_argument("--cases-per-site", type=int, default=8, help="labelled training cases per site (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64], metavar=("X", "Y", "Z"),
                   help="stored volume shape in voxels (default 64 64 64)")
    p.add_argument("--test", type=int, default=None, metavar="T",
                   help="labelled test cases per site (default cases-per-site // 4, at least 1)")
    p.add_argument("--unlabelled", type=int, default=0, metavar="M", help="unlabelled images per site (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("validate", help="check a site folder or federation root; exit 1 on any error")
    p.add_argument("path", type=Path, help="site folder or federation root")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--verbose", action="store_true", help="also list info findings (e.g. unlabelled images)")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("preview", help="PNG with one slice per site (image, label overlay, histogram)")
    p.add_argument("path", type=Path, help="site folder or federation root")
    p.add_argument("--out", required=True, type=Path, help="output PNG file")
    p.add_argument("--dpi", type=int, default=110, help="resolution (default 110)")
    p.set_defaults(func=_cmd_preview)

    p = sub.add_parser("fingerprint", help="per-site dataset fingerprint (aggregates only) and optional plan")
    p.add_argument("path", type=Path, help="site folder or federation root")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file (default: stdout); a federation root gives {site: fingerprint}")
    p.add_argument("--plan", type=Path, default=None, help="also merge the fingerprints and write the plan here")
    p.add_argument("--no-validate", action="store_true", help="skip validation before fingerprinting")
    p.set_defaults(func=_cmd_fingerprint)

    p = sub.add_parser("plan", help="merge fingerprint files into one federated plan")
    p.add_argument("fingerprints", nargs="+", type=Path, metavar="FP.json", help="fingerprint files")
    p.add_argument("--out", required=True, type=Path, help="plan JSON file to write")
    p.set_defaults(func=_cmd_plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``medseg-data``; returns the exit status (never raises, never prints a traceback)."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    except SystemExit as exc:  # --help (0) or a usage error (2); argparse has printed the message
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except DatasetError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except (ValueError, OSError, RuntimeError) as exc:  # includes FileExistsError, PlanError
        _err(str(exc))
        return EXIT_FAILED
    except Exception as exc:  # the contract is "no traceback": name the failure instead
        _err(f"unexpected {type(exc).__name__}: {exc} (while running '{args.command}'; please report this)")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
