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

import csv
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dfkd.config import load_config
from dfkd.errors import ConfigError, RunLockedError
from dfkd.registry import close_matches
from dfkd.tables import PaperNumbers, accuracy_table, fmt, load_paper_numbers, pair_of, stability_table
from dfkd.time_to_accuracy import time_to_accuracy_table

__all__ = ["Suite", "SuiteEntry", "PlannedRun", "load_suite", "resolve_suite", "run_suite", "plan_runs", "write_results", "format_results", "update_readme",
           "RECORD_FIELDS"]

SUITES_DIR = Path("benchmarks") / "suites"
_SUITE_KEYS = ("output_dir", "seeds", "overrides", "papers", "budget_s", "entries")
_ENTRY_KEYS = ("name", "method", "recipe", "overrides")
DEFAULT_PAPERS = Path("benchmarks") / "papers.yaml"
_ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # it names a folder

# The summary.json metrics a record keeps (missing ones, e.g. agreement without a teacher, are None).
_METRICS = (
    "final_acc1", "final_agree1", "final_loyalty", "final_teacher_acc1", "best_acc1", "best_agree1", "best_loyalty",
    "mean_acc1", "var_acc1", "wall_s", "synth_s", "train_s", "eval_s", "stopped_at_budget", "peak_mem_mb", "steps",
    "processes", "git_commit", "machine",
)
RECORD_FIELDS = ("entry", "method", "seed", "recipe", "dataset", "teacher", "student", "run_dir", "stability_from", *_METRICS)


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
        **{key: summary.get(key) for key in _METRICS}, "final_loyalty_hist": summary.get("final_loyalty_hist"),
    }


def run_suite(
    suite: str | Path,
    overrides: Sequence[str] = (),
    output_dir: str | Path | None = None,
    echo: Callable[[str], None] = print,
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
    """
    from accelerate import PartialState

    from dfkd.engine import Trainer

    spec = load_suite(suite)
    out = Path(output_dir) if output_dir is not None else Path(spec.output_dir)
    runs = plan_runs(spec, overrides, out)
    papers = load_paper_numbers(spec.papers) if spec.papers is not None else None  # a bad file fails before any run
    is_main = PartialState().is_main_process
    finished: dict[int, dict[str, Any]] = {}  # by index into runs, so the tables keep the suite's order
    elsewhere = []
    for i, run in enumerate(runs):
        done = run.output_dir / "summary.json"
        if done.is_file():
            summary, note = json.loads(done.read_text()), "done before, skipped"
        else:
            try:
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


def _one_line(summary: Mapping[str, Any]) -> str:
    return (f"Acc@1 {fmt(summary.get('final_acc1'), 2)}, Agree@1 {fmt(summary.get('final_agree1'), 2)}, "
            f"loyalty {fmt(summary.get('final_loyalty'), 4)}, wall {fmt(summary.get('wall_s'), 1)} s")


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
