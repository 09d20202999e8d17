"""`tensorsam report RESULTS.json... [--out DIR]`: Markdown tables and figures from results files."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", help="results files written by a tensorsam task (results.json)")
    parser.add_argument(
        "--out", default=None, help="folder for report.md and figures (default: the first file's folder)"
    )
    parser.add_argument(
        "--pool", action="store_true", help="tabulate the runs of files with the same task together"
    )
    parser.add_argument("--no-figures", action="store_true", help="skip the task figures")


def run(args: argparse.Namespace) -> int:
    from ..report import make_report

    path, text = make_report(args.results, args.out, pool=args.pool, figures=not args.no_figures)
    print(text, end="")
    print(f"[wrote {path}]")
    return 0
