"""A suite's results: one record per run, ``results.json``, ``results.csv``, ``results.md`` and its plots,
and the README's Results section that ``dfkd results`` fills from finished suites.

``results.md`` holds the papers' tables (:mod:`dfkd.tables`), the time-to-accuracy
table when the suite's runs have timed curves (:mod:`dfkd.time_to_accuracy`) and
the plots (:mod:`dfkd.plots`).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dfkd.errors import ConfigError
from dfkd.tables import PaperNumbers, accuracy_table, pair_of, stability_table
from dfkd.time_to_accuracy import time_to_accuracy_table

__all__ = ["METRICS", "RECORD_FIELDS", "write_results", "format_results", "update_readme"]

# The summary.json metrics a record keeps (missing ones, e.g. agreement without a teacher, are None).
METRICS = (
    "final_acc1", "final_agree1", "final_loyalty", "final_teacher_acc1", "best_acc1", "best_agree1", "best_loyalty",
    "mean_acc1", "var_acc1", "wall_s", "synth_s", "train_s", "eval_s", "stopped_at_budget", "peak_mem_mb", "steps",
    "processes", "git_commit", "machine",
)
RECORD_FIELDS = ("entry", "method", "seed", "recipe", "dataset", "teacher", "student", "run_dir", "stability_from", *METRICS)


def write_results(
    records: Sequence[Mapping[str, Any]], folder: Path, suite_path: Path | None = None, papers: PaperNumbers | None = None,
) -> list[Path]:
    """``results.json``, ``results.csv`` (one record per run), the plots and ``results.md`` in ``folder``.

    Returns the plots' paths.
    """
    from dfkd.plots import write_plots  # matplotlib is imported only when a suite is tabulated

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(list(records), indent=2) + "\n")
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RECORD_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in RECORD_FIELDS} for r in records)
    plots = write_plots(records, folder)
    (folder / "results.md").write_text(format_results(records, suite_path, papers, [p.name for p in plots]))
    return plots


def _distinct(records: Sequence[Mapping[str, Any]], key: str) -> str:
    values = list(dict.fromkeys(str(r.get(key)) for r in records if r.get(key)))
    return ", ".join(f"`{v[:10]}`" if key == "git_commit" else v for v in values) or "unknown"


def format_results(
    records: Sequence[Mapping[str, Any]], suite_path: Path | None = None, papers: PaperNumbers | None = None,
    plots: Sequence[str] = (),
) -> str:
    """results.md: where the numbers come from, the accuracy table, the stability and cost table, the plots."""
    source = f" of suite `{suite_path}`" if suite_path is not None else ""
    windows = sorted({r.get("stability_from") for r in records if r.get("stability_from") is not None})
    window = " and ".join(f"{w:g}" for w in windows) or "eval.stability_from"
    lines = [
        f"Results{source}: {len(records)} runs; commit {_distinct(records, 'git_commit')}; "
        f"machine {_distinct(records, 'machine')}. Per-run records in results.json and results.csv.",
        "",
        "Accuracy, in the layout of CuDFKD Tables II and III: the best Acc@1, Agree@1 and loyalty each run reached "
        "on the test split, as the paper reports them; several seeds as mean ± std. [Brackets]: the published "
        "number for the same cell" + _cited(records, papers),
        "",
        accuracy_table(records, papers),
        f"Stability and cost, as in CuDFKD Table V: μ and σ² of Acc@1 over the evaluations from {window} of training "
        "to the end, the best Acc@1, peak memory (GPU memory on a GPU, resident memory on a CPU), wall time and the "
        "part of it spent synthesising. Published Table V cells are for one RTX 3090 at the papers' full length.",
        "",
        stability_table(records, papers),
    ]
    timed = time_to_accuracy_table(records)
    if timed.count("\n") > 2:  # a header and at least one method with a timed curve
        stopped = sum(bool(r.get("stopped_at_budget")) for r in records)
        lines += [
            "Time to accuracy: the training seconds (synthesis included; evaluation excluded and given apart) "
            "until the first evaluation at or above each Agree@1, and the Agree@1 and Acc@1 of the last evaluation. "
            f"{stopped} of {len(records)} runs stopped at the suite's time budget, the others at their last epoch.",
            "",
            timed,
        ]
    if plots:
        lines += ["Plots:", "", *(f"![{name}]({name})" for name in plots), ""]
    return "\n".join(lines)


def _cited(records: Sequence[Mapping[str, Any]], papers: PaperNumbers | None) -> str:
    sources = papers.sources_for(list(dict.fromkeys(map(pair_of, records)))) if papers is not None else []
    return f" ({'; '.join(sources)})." if sources else "; the papers report none for these pairs."


# --------------------------------------------------------------------------- README

README_START, README_END = "<!-- results: start -->", "<!-- results: end -->"


def update_readme(folders: Sequence[str | Path], readme: str | Path, images: str | Path) -> list[Path]:
    """Put each finished suite's results.md into the README between the results markers.

    The plots are copied into ``images`` (committed, unlike run folders) and
    linked from there; each suite's section starts with its folder's name.

    Returns:
        the copied plots.

    Raises:
        ConfigError: a folder without results.md, or a README without both markers.
    """
    readme, images = Path(readme), Path(images)
    text = readme.read_text() if readme.is_file() else ""
    if README_START not in text or README_END not in text or text.index(README_START) > text.index(README_END):
        raise ConfigError(
            f"{readme} has no results section to fill: add a line {README_START} and, below it, a line {README_END}."
        )
    sections, copied = [], []
    for folder in map(Path, folders):
        results = folder / "results.md"
        if not results.is_file():
            raise ConfigError(f"no results.md in {folder.resolve()}: run `dfkd bench SUITE` there first.")
        body = results.read_text()
        target = images / folder.name
        target.mkdir(parents=True, exist_ok=True)
        for link in re.findall(r"!\[([^\]]+)\]\(([^)/]+\.png)\)", body):
            shutil.copyfile(folder / link[1], target / link[1])
            copied.append(target / link[1])
            rel = Path(os.path.relpath(target / link[1], readme.parent)).as_posix()
            body = body.replace(f"]({link[1]})", f"]({rel})")
        sections.append(f"### {folder.name}\n\n{body.strip()}\n")
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(f"{head}{README_START}\n\n" + "\n".join(sections) + f"\n{README_END}{tail}")
    return copied
