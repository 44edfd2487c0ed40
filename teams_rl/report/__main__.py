"""`python -m teams_rl.report DIR [--compare-with DIR ...] [--out DIR]`: (re-)render a report.

DIR is a multirun directory (`multirun/<exp>/<time>`: one aggregated sweep report), a run dir
(`outputs/<exp>/<time>`: that run's report) or a finished artifact folder (`artifacts/<stage>/<fingerprint>`:
the report of that artifact and its inputs). The report goes to `DIR/report/` unless `--out` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from teams_rl.errors import TeamsRLError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m teams_rl.report", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a multirun dir, a run dir or an artifact folder")
    parser.add_argument("--compare-with", nargs="*", default=[], metavar="DIR",
                        help="run dirs or artifact folders to put beside a single run (e.g. a wizardlm_baseline run)")
    parser.add_argument("--out", help="output folder (default: PATH/report)")
    parser.add_argument("--primary-attack", default="loss", help="attack shown beside the paper's AUC (default: loss)")
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    parser.add_argument("--title", help="report title")
    args = parser.parse_args(argv)
    try:
        path = render(Path(args.path), args.compare_with, args.out, args.primary_attack, not args.no_figures,
                      args.title)
    except TeamsRLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


def render(path: Path, compare_with: list[str], out: str | None, primary_attack: str, figures: bool,
           title: str | None) -> Path:
    from teams_rl.report.collect import RunResults
    from teams_rl.report.document import build_run_report
    from teams_rl.report.paper import PaperResults
    from teams_rl.report.sweep import aggregate_sweep, is_sweep_dir

    if not path.exists():
        raise TeamsRLError(f"{path}: no such directory")
    paper = PaperResults.load()
    if is_sweep_dir(path):
        if compare_with:
            raise TeamsRLError("--compare-with applies to a single run, not to a sweep directory")
        return aggregate_sweep(path, out, paper=paper, primary_attack=primary_attack, figures=figures)
    ours = RunResults.load(path)
    if not compare_with:  # a run dir re-renders with the comparison its own config asked for
        compare_with = [str(p) for p in ours.config_value("report.compare_with") or []]
    others = [RunResults.load(p) for p in compare_with]
    out_dir = Path(out) if out else path / "report"
    report = build_run_report(ours, others, paper, out_dir, title=title, primary_attack=primary_attack,
                              figures=figures)
    return report.write(out_dir)


if __name__ == "__main__":
    sys.exit(main())
