"""``crosslayer report``: results table (Markdown + CSV) and plots from run directories, with the
papers' published errors beside the measured ones. (The zoo's params/MACs table is ``crosslayer models``.)"""

from __future__ import annotations

import sys

from crosslayer.errors import check_output_dir


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by `crosslayer train`")
    parser.add_argument("--out", default=None,
                        help="output folder (default: the run directory for one run, ./report for several)")
    parser.add_argument("--no-plots", action="store_true", help="write only results.md / results.csv")


def main(args) -> int:
    from crosslayer.analysis.report import write_report

    out = args.out or (args.runs[0] if len(args.runs) == 1 else "report")
    check_output_dir(out)
    files = write_report(args.runs, out, plots=not args.no_plots,
                         warn=lambda msg: print(f"crosslayer report: warning: {msg}", file=sys.stderr))
    with open(files[0]) as f:
        print(f.read().rstrip())
    print()
    for p in files:
        print(p)
    return 0
