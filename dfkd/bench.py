"""Benchmark suites: ``dfkd bench SUITE`` runs recipes over seeds and tabulates them.

A suite is a YAML file (``benchmarks/suites/<name>.yaml``, read with OmegaConf's
safe loader) that lists what to compare::

    output_dir: runs/bench/mnist                       # default: runs/bench/<suite name>
    seeds: [0, 1]                                      # default: [0]
    overrides: [data.root=../shared/datasets]          # applied to every entry
    entries:
      - {name: dafl, recipe: recipes/mnist/dafl/lenet5_lenet5_half.yaml}
      - {name: cudfkd, recipe: recipes/mnist/cudfkd/lenet5_lenet5_half.yaml, overrides: [train.epochs=10]}

Each (entry, seed) is an ordinary run, in this process, of::

    load_config(recipe, ["train.resume=auto", *suite overrides, *entry overrides, *command-line overrides,
                         f"seed={seed}", f"output_dir={out}/{entry}/seed{seed}"])

Every entry's config is validated before the first run starts. A run whose
folder already holds ``summary.json`` is skipped, and an unfinished one resumes
from its own checkpoints, so an interrupted suite continues where it stopped.
At the end the suite's folder gets ``results.json`` and ``results.csv`` (one
record per run) and ``results.md`` (one row per entry, seeds as mean ± std).
Recipe paths, like every path in a recipe, are relative to the working directory.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dfkd.config import load_config
from dfkd.errors import ConfigError
from dfkd.registry import close_matches

__all__ = ["Suite", "SuiteEntry", "PlannedRun", "load_suite", "resolve_suite", "run_suite", "plan_runs", "format_table", "RECORD_FIELDS"]

SUITES_DIR = Path("benchmarks") / "suites"
_SUITE_KEYS = ("output_dir", "seeds", "overrides", "entries")
_ENTRY_KEYS = ("name", "recipe", "overrides")
_ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # it names a folder

# The summary.json metrics a record keeps (missing ones, e.g. agreement without a teacher, are None).
_METRICS = (
    "final_acc1", "final_agree1", "final_loyalty", "best_acc1", "mean_acc1", "var_acc1",
    "wall_s", "synth_s", "peak_mem_mb", "steps", "processes", "git_commit",
)
RECORD_FIELDS = ("entry", "seed", "recipe", "dataset", "teacher", "student", *_METRICS)


@dataclass(frozen=True)
class SuiteEntry:
    """One recipe of a suite, with the overrides that only it gets."""

    name: str
    recipe: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suite:
    """A validated suite file."""

    path: Path
    output_dir: str
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    entries: tuple[SuiteEntry, ...]


@dataclass(frozen=True)
class PlannedRun:
    entry: SuiteEntry
    seed: int
    cfg: DictConfig

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)


# --------------------------------------------------------------------------- loading


def resolve_suite(name_or_path: str | Path) -> Path:
    """``NAME`` is ``benchmarks/suites/NAME.yaml``; anything that exists, or looks like a path, is a path."""
    given = Path(name_or_path)
    if given.is_file():
        return given
    if given.suffix in (".yaml", ".yml") or len(given.parts) > 1:
        raise ConfigError(f"suite {str(given)!r} does not exist (looked at {given.resolve()}).")
    path = SUITES_DIR / f"{given}.yaml"
    if path.is_file():
        return path
    known = sorted(p.stem for p in SUITES_DIR.glob("*.yaml")) if SUITES_DIR.is_dir() else []
    close = close_matches(str(given), known)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    listing = f" Suites there: {', '.join(known)}." if known else ""
    raise ConfigError(
        f"no suite {str(given)!r}: looked for {path.resolve()}.{hint}{listing} Pass a suite's name or the path of "
        "its YAML file."
    )


def _unknown_key(where: str, key: str, valid: Sequence[str], what: str) -> ConfigError:
    close = close_matches(key, list(valid))
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}.{hint} Valid keys in {what}: {', '.join(sorted(valid))}.")


def _overrides(value: Any, where: str, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key!r} must be a list of key=value strings (e.g. [train.epochs=1]), got {value!r}.")
    return tuple(value)


def load_suite(name_or_path: str | Path) -> Suite:
    """Read and check a suite: its keys, seeds, and each entry's name, recipe and overrides.

    Raises:
        ConfigError: naming the file, the bad key (with the closest valid one) or the bad value.
    """
    path = resolve_suite(name_or_path)
    where = f"suite {str(path)!r}"
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))  # unresolved: interpolations reach load_config as written
    except Exception as exc:  # yaml.YAMLError, or an OmegaConf grammar error
        raise ConfigError(f"{where} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping with keys {', '.join(_SUITE_KEYS)}; got a {type(raw).__name__}.")
    for key in raw:
        if key not in _SUITE_KEYS:
            raise _unknown_key(where, str(key), _SUITE_KEYS, "a suite")

    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"{where}: 'seeds' must be a non-empty list of distinct integers (e.g. [0, 1]), got {seeds!r}.")
    output_dir = raw.get("output_dir") or str(Path("runs") / "bench" / path.stem)
    if not isinstance(output_dir, str):
        raise ConfigError(f"{where}: 'output_dir' must be a path, got {output_dir!r}.")

    entries_raw = raw.get("entries")
    if not isinstance(entries_raw, list) or not entries_raw:
        raise ConfigError(
            f"{where}: 'entries' must be a non-empty list of {{name: ..., recipe: ..., overrides: [...]}}, "
            f"got {entries_raw!r}."
        )
    entries: list[SuiteEntry] = []
    for i, item in enumerate(entries_raw):
        at = f"{where}, entries[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{at} must be a mapping {{name: ..., recipe: ..., overrides: [...]}}, got {item!r}.")
        for key in item:
            if key not in _ENTRY_KEYS:
                raise _unknown_key(at, str(key), _ENTRY_KEYS, "an entry")
        name, recipe = item.get("name"), item.get("recipe")
        if not isinstance(name, str) or not _ENTRY_NAME.match(name):
            raise ConfigError(f"{at}: 'name' must be a folder name (letters, digits, '_', '.', '-'), got {name!r}.")
        if any(e.name == name for e in entries):
            raise ConfigError(f"{at}: the name {name!r} is used twice; each entry needs its own (it names its folder).")
        if not isinstance(recipe, str) or not recipe:
            raise ConfigError(f"{at} ({name!r}): 'recipe' must be the path of a recipe, got {recipe!r}.")
        entries.append(SuiteEntry(name, recipe, _overrides(item.get("overrides"), f"{at} ({name!r})", "overrides")))
    return Suite(path, output_dir, tuple(seeds), _overrides(raw.get("overrides"), where, "overrides"), tuple(entries))


def plan_runs(suite: Suite, overrides: Sequence[str], output_dir: Path) -> list[PlannedRun]:
    """Every (entry, seed) with its validated config: a bad entry fails here, before any run starts."""
    runs = []
    for entry in suite.entries:
        for seed in suite.seeds:
            layers = [
                "train.resume=auto", *suite.overrides, *entry.overrides, *overrides,
                f"seed={seed}", f"output_dir={output_dir / entry.name / f'seed{seed}'}",
            ]
            try:
                cfg = load_config(entry.recipe, layers)
            except ConfigError as exc:
                raise ConfigError(f"suite {str(suite.path)!r}, entry {entry.name!r}: {exc}") from None
            runs.append(PlannedRun(entry, seed, cfg))
    return runs


# --------------------------------------------------------------------------- running


def _record(run: PlannedRun, summary: Mapping[str, Any]) -> dict[str, Any]:
    cfg = run.cfg
    return {
        "entry": run.entry.name, "seed": run.seed, "recipe": run.entry.recipe, "dataset": cfg.data.name,
        "teacher": cfg.teacher.arch if cfg.teacher is not None else None, "student": cfg.student.arch,
        **{key: summary.get(key) for key in _METRICS},
    }


def run_suite(
    suite: str | Path,
    overrides: Sequence[str] = (),
    output_dir: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> Path:
    """Run every unfinished (entry, seed) of ``suite`` and write its results; returns ``results.md``'s path.

    Args:
        suite: a suite's name in ``benchmarks/suites/`` or the path of a suite file.
        overrides: ``key=value`` strings applied to every entry, after the suite's own.
        output_dir: the suite's folder, instead of the suite's ``output_dir``.
        echo: where the one line per finished run goes.
    """
    from accelerate import PartialState

    from dfkd.engine import Trainer

    spec = load_suite(suite)
    out = Path(output_dir) if output_dir is not None else Path(spec.output_dir)
    runs = plan_runs(spec, overrides, out)
    is_main = PartialState().is_main_process
    records = []
    for run in runs:
        done = run.output_dir / "summary.json"
        if done.is_file():
            summary, note = json.loads(done.read_text()), "done before, skipped"
        else:
            summary, note = Trainer(run.cfg).fit(), "ran"
        records.append(_record(run, summary))
        if is_main:
            echo(f"{run.entry.name} seed {run.seed}: {_one_line(summary)} ({note}) -> {run.output_dir}")
    table = out / "results.md"
    if is_main:
        write_results(records, out, spec.path)
    return table


def _one_line(summary: Mapping[str, Any]) -> str:
    parts = [f"{label} {_fmt(summary.get(key), 2)}" for key, label in (
        ("final_acc1", "Acc@1"), ("final_agree1", "Agree@1"))]
    parts.append(f"loyalty {_fmt(summary.get('final_loyalty'), 4)}")
    parts.append(f"wall {_fmt(summary.get('wall_s'), 1)} s")
    return ", ".join(parts)


def write_results(records: Sequence[Mapping[str, Any]], folder: Path, suite_path: Path | None = None) -> None:
    """``results.json``, ``results.csv`` (one record per run) and ``results.md`` (one row per entry) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(list(records), indent=2) + "\n")
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RECORD_FIELDS)
        writer.writeheader()
        writer.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in RECORD_FIELDS} for r in records)
    source = f" of suite `{suite_path}`" if suite_path is not None else ""
    header = f"Results{source}: seeds as mean ± std (population); per-run records in results.json and results.csv.\n\n"
    (folder / "results.md").write_text(header + format_table(records))


# --------------------------------------------------------------------------- the table

_TABLE_COLUMNS = (
    "entry", "teacher → student", "dataset", "seeds", "Acc@1", "Agree@1", "loyalty", "best Acc@1",
    "wall", "synthesis", "peak mem",
)


def _numbers(records: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    values = [r.get(key) for r in records]
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def _fmt(value: Any, digits: int) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def _mean_std(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return _fmt(values[0], digits)
    return f"{_fmt(statistics.fmean(values), digits)} ± {_fmt(statistics.pstdev(values), digits)}"


def _mean(values: list[float], digits: int, unit: str) -> str:
    return f"{_fmt(statistics.fmean(values), digits)} {unit}" if values else "-"


def format_table(records: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table with one row per entry (in order of first appearance), ending in a newline.

    Acc@1, Agree@1, loyalty and best Acc@1 are the mean ± population std over
    the entry's seeds (just the value with one seed); wall time, synthesis time
    and peak memory are means. A metric no run of the entry has reads ``-``.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["entry"], []).append(record)
    lines = ["| " + " | ".join(_TABLE_COLUMNS) + " |", "|" + "---|" * len(_TABLE_COLUMNS)]
    for entry, group in groups.items():
        first = group[0]
        pair = f"{first.get('teacher')} → {first.get('student')}" if first.get("teacher") else f"{first.get('student')} (scratch)"
        cells = [
            entry, pair, str(first.get("dataset", "-")), ", ".join(str(r["seed"]) for r in group),
            _mean_std(_numbers(group, "final_acc1"), 2), _mean_std(_numbers(group, "final_agree1"), 2),
            _mean_std(_numbers(group, "final_loyalty"), 4), _mean_std(_numbers(group, "best_acc1"), 2),
            _mean(_numbers(group, "wall_s"), 1, "s"), _mean(_numbers(group, "synth_s"), 1, "s"),
            _mean(_numbers(group, "peak_mem_mb"), 0, "MB"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
