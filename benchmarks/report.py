"""A markdown table of finished runs, in the columns of the CuDFKD paper's tables plus cost.

Reads each run directory's ``summary.json`` (and ``config.yaml`` for the
student, teacher and dataset), and prints one row per run: final Acc@1 and
Agree@1 on the real test split, probability loyalty (and the reference code's
``loyalty_ref``), best Acc@1, CuDFKD Table V's stability (mean and variance of
Acc@1 over the last part of training), steps, wall time, the part of it spent
synthesising, and peak memory.

    python benchmarks/report.py runs/mnist/dafl/lenet5_lenet5_half runs/mnist/cudfkd/lenet5_lenet5_half
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dfkd.config import load_config

COLUMNS = (
    "run", "teacher → student", "Acc@1", "Agree@1", "loyalty", "loyalty_ref", "best Acc@1",
    "mean±var Acc@1", "steps", "wall", "synthesis", "peak mem",
)


def row(run: Path) -> list[str]:
    summary = json.loads((run / "summary.json").read_text())
    cfg = load_config(run / "config.yaml")
    pair = f"{cfg.teacher.arch} → {cfg.student.arch}" if cfg.teacher is not None else f"{cfg.student.arch} (scratch)"

    def pct(key: str) -> str:
        return f"{summary[key]:.2f}" if key in summary else "-"

    def frac(key: str) -> str:
        return f"{summary[key]:.4f}" if key in summary else "-"

    return [
        str(run), pair, pct("final_acc1"), pct("final_agree1"), frac("final_loyalty"), frac("final_loyalty_ref"),
        pct("best_acc1"), f"{summary['mean_acc1']:.2f}±{summary['var_acc1']:.2f}", str(summary["steps"]),
        f"{summary['wall_s']:.0f} s", f"{summary['synth_s']:.0f} s", f"{summary['peak_mem_mb'] / 1024:.2f} GB",
    ]


def main(runs: list[str]) -> None:
    if not runs:
        raise SystemExit(__doc__)
    missing = [r for r in runs if not (Path(r) / "summary.json").is_file()]
    if missing:
        raise SystemExit(f"no summary.json (unfinished or not a run directory): {', '.join(missing)}")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for run in runs:
        print("| " + " | ".join(row(Path(run))) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
