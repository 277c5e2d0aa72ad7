"""The benchmark plots, as PNG files: the CuDFKD paper's Fig. 3 and Fig. 2, and its schedules.

- ``curves_<pair>.png``: validation Acc@1 and Agree@1 against epoch, one line
  per method (the mean over seeds, with the seeds' range shaded), from each
  run's ``metrics.jsonl``.
- ``loyalty_<pair>.png``: each method's distribution of per-sample loyalty on
  the test set at the end of training, one panel per method, from
  ``final_loyalty_hist`` in the runs' summaries (seeds pooled).
- ``time_<pair>.png``: Agree@1 against training seconds (synthesis included, evaluation
  excluded), one line per method, for runs whose evaluations record their time
  (:mod:`dfkd.time_to_accuracy`).
- ``schedules_<entry>.png``: alpha_adv, lambda and the mean self-paced weight
  v over training, one line per seed, from the TensorBoard scalars
  ``synth/weight/adv``, ``weighting/lambda`` and ``weighting/v_mean``, for
  every entry that logs lambda (the self-paced, CuDFKD-style runs).

Each figure is small (about 8 × 3.2 inches at 100 dpi: tens of kilobytes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dfkd.tables import method_of, pair_of  # noqa: E402
from dfkd.time_to_accuracy import time_plot  # noqa: E402

__all__ = ["write_plots"]

_DPI = 100
_SCHEDULE_TAGS = (("synth/weight/adv", "alpha_adv"), ("weighting/lambda", "lambda"), ("weighting/v_mean", "mean v"))


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(parts)).strip("_")


def _history(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def _curves(title: str, by_method: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path | None:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharex=True)
    drawn = False
    for method, runs in by_method.items():
        histories = [_history(Path(r["run_dir"])) for r in runs]
        for ax, metric in zip(axes, ("acc1", "agree1")):
            series = [[(h["epoch"], h[metric]) for h in history if metric in h] for history in histories]
            series = [s for s in series if s]
            if not series:
                continue
            length = min(len(s) for s in series)  # seeds of one entry share their evaluation epochs
            epochs = np.array([e for e, _ in series[0][:length]])
            values = np.array([[v for _, v in s[:length]] for s in series])
            (line,) = ax.plot(epochs, values.mean(axis=0), label=method, linewidth=1.4, marker=".", markersize=4)
            if len(series) > 1:
                ax.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, name in zip(axes, ("Acc@1 (%)", "Agree@1 (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _loyalty(title: str, by_method: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path | None:
    """One panel per method, as the paper's Fig. 2 (a)-(d): the density of per-sample loyalty, seeds pooled."""
    hists = {
        method: np.sum(np.array([r["final_loyalty_hist"] for r in runs], dtype=float), axis=0)
        for method, runs in by_method.items() if all(r.get("final_loyalty_hist") for r in runs)
    }
    if not hists:
        return None
    cols = min(len(hists), 3)
    rows = -(-len(hists) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), sharex=True, squeeze=False)
    for ax, (method, counts) in zip(axes.flat, hists.items()):
        bins = len(counts)
        edges = np.linspace(0.0, 1.0, bins + 1)
        density = counts / counts.sum() * bins  # area 1
        ax.stairs(density, edges, fill=True, alpha=0.6)
        mean = float(np.sum(counts * (edges[:-1] + 0.5 / bins)) / counts.sum())
        ax.axvline(mean, color="black", linewidth=0.8, linestyle="--")
        ax.set_title(f"{method} (mean {mean:.2f})", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(hists):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("per-sample loyalty on the test set")
    for ax in axes[:, 0]:
        ax.set_ylabel("density")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _scalars(tb_dir: Path, tags: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    present = set(accumulator.Tags().get("scalars", []))
    out = {}
    for tag in tags:
        if tag in present:
            events = accumulator.Scalars(tag)
            out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events]))
    return out


def _schedules(entry: str, runs: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    per_seed = [(r["seed"], _scalars(Path(r["run_dir"]) / "tb", [t for t, _ in _SCHEDULE_TAGS])) for r in runs]
    if not any("weighting/lambda" in scalars for _, scalars in per_seed):
        return None
    fig, axes = plt.subplots(1, len(_SCHEDULE_TAGS), figsize=(9, 3.0), sharex=True)
    for ax, (tag, name) in zip(axes, _SCHEDULE_TAGS):
        for seed, scalars in per_seed:
            if tag in scalars:
                ax.plot(*scalars[tag], label=f"seed {seed}", linewidth=1.2, marker="." if len(scalars[tag][0]) < 30 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{entry}: adversarial weight, self-paced threshold and mean weight", fontsize=9)
    return _save(fig, path)


def write_plots(records: Sequence[Mapping[str, Any]], folder: Path) -> list[Path]:
    """Every plot the records support, written into ``folder``; returns their paths in a stable order.

    Each record needs ``entry``, ``seed``, ``run_dir`` and the pair's
    ``dataset``, ``teacher`` and ``student``; ``final_loyalty_hist`` and
    ``method`` are used where present.
    """
    by_pair: dict[tuple[str, str, str], dict[str, list[Mapping[str, Any]]]] = {}
    by_entry: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_pair.setdefault(pair_of(record), {}).setdefault(method_of(record), []).append(record)
        by_entry.setdefault(record["entry"], []).append(record)
    written: list[Path] = []
    for (dataset, teacher, student), by_method in by_pair.items():
        title = f"{teacher} → {student} on {dataset}" if teacher != "None" else f"{student} on {dataset}"
        slug = _slug(dataset, teacher, student)
        written += filter(None, [
            _curves(title, by_method, folder / f"curves_{slug}.png"),
            _loyalty(title, by_method, folder / f"loyalty_{slug}.png"),
            time_plot([r for runs in by_method.values() for r in runs], folder / f"time_{slug}.png",
                      f"{title}: Agree@1 against training time"),
        ])
    for entry, runs in by_entry.items():
        path = _schedules(entry, runs, folder / f"schedules_{_slug(entry)}.png")
        written += [path] if path is not None else []
    return written
