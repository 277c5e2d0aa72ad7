"""Benchmark suites: ``dfkd bench SUITE`` runs recipes over seeds and tabulates them.

A suite is a YAML file (``benchmarks/suites/<name>.yaml``, read with OmegaConf's
safe loader) that lists what to compare::

    output_dir: runs/bench/mnist                       # default: runs/bench/<suite name>
    seeds: [0, 1]                                      # default: [0]
    overrides: [data.root=../shared/datasets]          # applied to every entry
    papers: benchmarks/papers.yaml                     # published numbers shown beside ours (the default; null: none)
    budget_s: 600                                      # optional: every run stops after 600 s of training
    entries:
      - {name: dafl, method: DAFL, recipe: recipes/mnist/dafl/lenet5_lenet5_half.yaml}
      - {name: cudfkd, method: CuDFKD, recipe: recipes/mnist/cudfkd/lenet5_lenet5_half.yaml, overrides: [train.epochs=10]}

``--only NAME,...`` trains only the entries named.

Each (entry, seed) is an ordinary run, in this process, of::

    load_config(recipe, ["train.resume=auto", *suite overrides, *entry overrides, *command-line overrides,
                         f"train.time_budget_s={budget_s}", f"seed={seed}", f"output_dir={out}/{entry}/seed{seed}"])

With ``budget_s`` the suite is a time-to-accuracy benchmark: every method gets
the same training time (synthesis included, evaluation excluded) on the same
machine, and results.md adds the seconds each one took to reach 50, 80, 90, 95
and 98% Agree@1 (:mod:`dfkd.time_to_accuracy`).

Every entry's config is validated before the first run starts. A run whose
folder already holds ``summary.json`` is skipped, and an unfinished one resumes
from its own checkpoints, so an interrupted suite continues where it stopped.
At the end the suite's folder gets ``results.json`` and ``results.csv`` (one
record per run), ``results.md`` with the papers' tables (:mod:`dfkd.tables`;
``method`` names an entry's row there, default its name) and the plots
(:mod:`dfkd.plots`). Recipe paths, like every path in a recipe, are relative
to the working directory. ``dfkd results`` re-tabulates finished suites and
copies their tables and plots into the README's Results section.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dfkd.errors import ConfigError, RunLockedError
from dfkd.recipe import load_config
from dfkd.registry import close_matches
from dfkd.results import METRICS, write_results
from dfkd.tables import fmt, load_paper_numbers

__all__ = ["Suite", "SuiteEntry", "PlannedRun", "load_suite", "resolve_suite", "run_suite", "plan_runs"]

SUITES_DIR = Path("benchmarks") / "suites"
_SUITE_KEYS = ("output_dir", "seeds", "overrides", "papers", "budget_s", "entries")
_ENTRY_KEYS = ("name", "method", "recipe", "overrides")
DEFAULT_PAPERS = Path("benchmarks") / "papers.yaml"
_ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # it names a folder

@dataclass(frozen=True)
class SuiteEntry:
    """One recipe of a suite, with the overrides that only it gets."""

    name: str
    recipe: str
    overrides: tuple[str, ...] = ()
    method: str | None = None  # its row in the papers' tables; None: the name


@dataclass(frozen=True)
class Suite:
    """A validated suite file."""

    path: Path
    output_dir: str
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    entries: tuple[SuiteEntry, ...]
    papers: Path | None = DEFAULT_PAPERS
    budget_s: float | None = None  # every run's train.time_budget_s


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
        method = item.get("method")
        if method is not None and (not isinstance(method, str) or not method.strip()):
            raise ConfigError(f"{at} ({name!r}): 'method' must be the row label in the tables (e.g. CuDFKD), got {method!r}.")
        entries.append(SuiteEntry(name, recipe, _overrides(item.get("overrides"), f"{at} ({name!r})", "overrides"), method))
    papers = raw.get("papers", str(DEFAULT_PAPERS))
    if papers is not None and not isinstance(papers, str):
        raise ConfigError(f"{where}: 'papers' must be the path of a papers file or null, got {papers!r}.")
    budget = raw.get("budget_s")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
        raise ConfigError(f"{where}: 'budget_s' must be a positive number of seconds, got {budget!r}.")
    return Suite(
        path, output_dir, tuple(seeds), _overrides(raw.get("overrides"), where, "overrides"), tuple(entries),
        None if papers is None else Path(papers), None if budget is None else float(budget),
    )


def plan_runs(suite: Suite, overrides: Sequence[str], output_dir: Path) -> list[PlannedRun]:
    """Every (entry, seed) with its validated config: a bad entry fails here, before any run starts."""
    runs = []
    for entry in suite.entries:
        for seed in suite.seeds:
            budget = [f"train.time_budget_s={suite.budget_s}"] if suite.budget_s is not None else []
            layers = [
                "train.resume=auto", *suite.overrides, *entry.overrides, *overrides, *budget,
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
        "entry": run.entry.name, "method": run.entry.method or run.entry.name, "seed": run.seed,
        "recipe": run.entry.recipe, "dataset": cfg.data.name,
        "teacher": cfg.teacher.arch if cfg.teacher is not None else None, "student": cfg.student.arch,
        "run_dir": str(run.output_dir), "stability_from": cfg.eval.stability_from,
        **{key: summary.get(key) for key in METRICS}, "final_loyalty_hist": summary.get("final_loyalty_hist"),
    }


def run_suite(
    suite: str | Path,
    overrides: Sequence[str] = (),
    output_dir: str | Path | None = None,
    echo: Callable[[str], None] = print,
    only: Sequence[str] = (),
) -> Path:
    """Run every unfinished (entry, seed) of ``suite`` and write its results; returns ``results.md``'s path.

    The results are rewritten after each run, with the runs finished so far. A
    run that another process is training (its folder is locked) is left to it,
    so several ``dfkd bench`` commands of one suite share its runs out.

    Args:
        suite: a suite's name in ``benchmarks/suites/`` or the path of a suite file.
        overrides: ``key=value`` strings applied to every entry, after the suite's own.
        output_dir: the suite's folder, instead of the suite's ``output_dir``.
        echo: where the one line per finished run goes.
        only: entry names: train only these (every entry is still validated, and the
            tables still hold every finished run of the suite's folder). Empty: all.
    """
    from accelerate import PartialState

    from dfkd.teacher import train_missing_teacher
    from dfkd.trainer import Trainer

    spec = load_suite(suite)
    out = Path(output_dir) if output_dir is not None else Path(spec.output_dir)
    runs = plan_runs(spec, overrides, out)
    selected = _select(spec, only)
    papers = load_paper_numbers(spec.papers) if spec.papers is not None else None  # a bad file fails before any run
    is_main = PartialState().is_main_process
    finished: dict[int, dict[str, Any]] = {}  # by index into runs, so the tables keep the suite's order
    elsewhere = []
    for i, run in enumerate(runs):
        done = run.output_dir / "summary.json"
        if done.is_file():
            summary, note = json.loads(done.read_text()), "done before, skipped"
        elif run.entry.name not in selected:
            continue
        else:
            try:
                train_missing_teacher(run.cfg, echo)
                summary, note = Trainer(run.cfg).fit(), "ran"
            except RunLockedError:  # another `dfkd bench` of this suite has it: go on with the next run
                elsewhere.append(i)
                if is_main:
                    echo(f"{run.entry.name} seed {run.seed}: running in another process, skipped -> {run.output_dir}")
                continue
        finished[i] = _record(run, summary)
        if is_main:
            echo(f"{run.entry.name} seed {run.seed}: {_one_line(summary)} ({note}) -> {run.output_dir}")
            if note == "ran":  # the tables so far, so that a long suite can be read while it runs
                write_results([finished[k] for k in sorted(finished)], out, spec.path, papers)
    for i in elsewhere:  # those the other processes finished meanwhile
        done = runs[i].output_dir / "summary.json"
        if done.is_file():
            finished[i] = _record(runs[i], json.loads(done.read_text()))
    table = out / "results.md"
    if is_main:
        write_results([finished[k] for k in sorted(finished)], out, spec.path, papers)
    return table


def _select(suite: Suite, only: Sequence[str]) -> set[str]:
    """The entries to train: ``only``, each checked against the suite's entry names; all when empty."""
    names = [entry.name for entry in suite.entries]
    for name in only:
        if name not in names:
            close = close_matches(name, names)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"suite {str(suite.path)!r} has no entry {name!r}.{hint} Its entries: {', '.join(names)}."
            )
    return set(only) if only else set(names)


def _one_line(summary: Mapping[str, Any]) -> str:
    return (f"Acc@1 {fmt(summary.get('final_acc1'), 2)}, Agree@1 {fmt(summary.get('final_agree1'), 2)}, "
            f"loyalty {fmt(summary.get('final_loyalty'), 4)}, wall {fmt(summary.get('wall_s'), 1)} s")
