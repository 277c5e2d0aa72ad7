"""Time to accuracy: how soon each method gives a student that agrees with its teacher.

A data-free method is judged by wall-clock seconds to a good student, synthesis
included. Every evaluation in a run's ``metrics.jsonl`` records ``elapsed_s``,
the training time up to it (synthesis included, evaluation excluded), and
``eval_s``, the evaluation time so far, so the methods of one suite, run with
the same ``train.time_budget_s`` on the same machine, compare fairly:

- :func:`time_to_accuracy_table`: per method, the seconds to first reach each
  Agree@1 threshold (50, 80, 90, 95 and 98%), the final Agree@1 and Acc@1 at the
  budget, the steps taken, and the training and evaluation time apart;
- :func:`time_plot`: Agree@1 over training seconds, one line per method.

Several seeds of a method show as the mean time over the seeds that reached a
threshold, with ``(k/n)`` when only k of its n seeds did; ``—`` when none did.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dfkd.tables import fmt, method_of

__all__ = ["THRESHOLDS", "curve", "time_to", "time_to_accuracy_table", "time_plot"]

THRESHOLDS = (50.0, 80.0, 90.0, 95.0, 98.0)  # Agree@1 in percent


def curve(run_dir: str | Path) -> list[tuple[float, float, float]]:
    """``[(elapsed_s, agree1, acc1), ...]`` of a run's evaluations that recorded their time."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["elapsed_s"], r["agree1"], r["acc1"]) for r in rows if "elapsed_s" in r and "agree1" in r]


def time_to(points: Sequence[tuple[float, float, float]], threshold: float) -> float | None:
    """The training seconds of the first evaluation with Agree@1 at or above ``threshold``, or ``None``."""
    return next((elapsed for elapsed, agree, _ in points if agree >= threshold), None)


def _by_method(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        grouped.setdefault(method_of(record), []).append(record)
    return grouped


def _mean(values: Sequence[float], digits: int) -> str:
    return fmt(statistics.fmean(values), digits) if values else "—"


def time_to_accuracy_table(records: Sequence[Mapping[str, Any]], thresholds: Sequence[float] = THRESHOLDS) -> str:
    """A markdown table, one row per method in the records' order (records without a timed curve are left out)."""
    header = [
        "method", *(f"to {t:g}%" for t in thresholds), "final Agree@1", "final Acc@1", "steps", "train s", "eval s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, runs in _by_method(records).items():
        curves = [curve(r["run_dir"]) for r in runs]
        if not any(curves):
            continue
        cells = [method]
        for threshold in thresholds:
            reached = [t for t in (time_to(c, threshold) for c in curves) if t is not None]
            cell = _mean(reached, 0) + (" s" if reached else "")
            if reached and len(reached) < len(runs):
                cell += f" ({len(reached)}/{len(runs)})"
            cells.append(cell)
        finals = [c[-1] for c in curves if c]
        cells += [
            _mean([agree for _, agree, _ in finals], 2),
            _mean([acc for _, _, acc in finals], 2),
            _mean([float(r["steps"]) for r in runs if r.get("steps") is not None], 0),
            _mean([float(r["train_s"]) for r in runs if r.get("train_s") is not None], 0),
            _mean([float(r["eval_s"]) for r in runs if r.get("eval_s") is not None], 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def time_plot(records: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path | None:
    """Agree@1 over training seconds, one line per method (seeds as thin lines of one colour); ``None`` when no
    record has a timed curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = {method: [curve(r["run_dir"]) for r in runs] for method, runs in _by_method(records).items()}
    grouped = {method: [c for c in curves if c] for method, curves in grouped.items()}
    grouped = {method: curves for method, curves in grouped.items() if curves}
    if not grouped:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.2))
    colours = plt.get_cmap("tab20").colors
    for i, (method, curves) in enumerate(grouped.items()):
        colour, style = colours[i % len(colours)], ("-", "--", ":")[(i // len(colours)) % 3]
        for k, points in enumerate(curves):
            elapsed, agree = [p[0] for p in points], [p[1] for p in points]
            ax.plot(elapsed, agree, color=colour, linestyle=style, linewidth=1.4, marker=".",
                    label=method if k == 0 else None)
    ax.set_xlabel("training seconds (synthesis included, evaluation excluded)")
    ax.set_ylabel("Agree@1 with the teacher (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
