"""The benchmark tables, in the layout of the CuDFKD paper (seeds/003): Tables II/III and Table V.

Input is a list of run records (one per entry and seed, as ``dfkd bench``
writes them to ``results.json``); output is markdown. Published numbers come
from a data file (``benchmarks/papers.yaml``), never from code, and are shown
in brackets beside ours wherever the paper has the same cell: same dataset,
teacher, student and method.

- :func:`accuracy_table`: one column group per teacher → student pair with
  Acc@1, Agree@1 and loyalty; one row per method, T.Scratch and S.Scratch
  first. Like the paper ("the best performance during all runs of
  training"), a cell is the best value a run reached.
- :func:`stability_table`: one row per entry, Table V's mean and variance of
  Acc@1 from ``eval.stability_from`` of training to the end, the best Acc@1,
  peak memory, wall time and the part of it spent synthesising.

Several seeds show as mean ± population std; one seed as its value.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dfkd.errors import ConfigError

__all__ = ["PaperNumbers", "load_paper_numbers", "accuracy_table", "stability_table", "pair_of", "method_of", "fmt", "TEACHER_ROW", "SCRATCH_ROW"]

TEACHER_ROW = "T.Scratch"  # the teacher itself: Agree@1 100 and loyalty 1 by definition (CuDFKD, section V-B)
SCRATCH_ROW = "S.Scratch"  # the student trained on the real data, measured against the teacher
_ACCURACY_LEN, _STABILITY_LEN = 3, 5  # [Acc@1, Agree@1, loyalty] and [mu, sigma^2, best, memory GB, time h]

Pair = tuple[str, str, str]  # (dataset, teacher, student)


@dataclass(frozen=True)
class PaperNumbers:
    """Published cells keyed by ``(dataset, teacher, student)`` then method, and where each pair's tables come from."""

    accuracy: Mapping[Pair, Mapping[str, tuple[float | None, ...]]]
    stability: Mapping[Pair, Mapping[str, tuple[float | None, ...]]]
    sources: Mapping[Pair, tuple[str, ...]]

    def sources_for(self, pairs: Sequence[Pair]) -> list[str]:
        """The sources of the tables that cover any of ``pairs``, each once, in file order."""
        found = [source for pair in pairs for source in self.sources.get(pair, ())]
        return list(dict.fromkeys(found))


def _table_rows(raw: Any, where: str, length: int) -> dict[str, tuple[float | None, ...]]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: 'rows' must map each method to a list of {length} numbers (null where none).")
    rows = {}
    for method, values in raw.items():
        if (not isinstance(values, list) or len(values) != length
                or not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)):
            raise ConfigError(f"{where}, method {method!r}: expected a list of {length} numbers or nulls, got {values!r}.")
        rows[str(method)] = tuple(None if v is None else float(v) for v in values)
    return rows


def load_paper_numbers(path: str | Path) -> PaperNumbers:
    """Read a papers file: lists ``accuracy`` and ``stability`` of tables, each with its source and pair.

    Raises:
        ConfigError: naming the file and the table that does not fit the format.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no papers file at {path.resolve()} (the published numbers shown beside ours).")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    tables: dict[str, dict[Pair, dict[str, tuple[float | None, ...]]]] = {"accuracy": {}, "stability": {}}
    sources: dict[Pair, list[str]] = {}
    unknown = set(raw or {}) - set(tables)
    if not isinstance(raw, dict) or unknown:
        raise ConfigError(f"papers file {str(path)!r}: expected the keys 'accuracy' and 'stability', got {sorted(unknown or [])}.")
    for kind, length in (("accuracy", _ACCURACY_LEN), ("stability", _STABILITY_LEN)):
        for i, table in enumerate(raw.get(kind) or []):
            where = f"papers file {str(path)!r}, {kind}[{i}]"
            missing = [k for k in ("source", "dataset", "teacher", "student", "rows") if not isinstance(table, dict) or k not in table]
            if missing:
                raise ConfigError(f"{where}: missing {', '.join(missing)}.")
            pair = (str(table["dataset"]), str(table["teacher"]), str(table["student"]))
            tables[kind].setdefault(pair, {}).update(_table_rows(table["rows"], where, length))
            sources.setdefault(pair, []).append(str(table["source"]))
    return PaperNumbers(tables["accuracy"], tables["stability"], {pair: tuple(found) for pair, found in sources.items()})


# --------------------------------------------------------------------------- cells


def _numbers(records: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    values = (r.get(key) for r in records)
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def fmt(value: Any, digits: int) -> str:
    """``value`` with ``digits`` decimals; ``-`` for a missing or non-finite one."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def _cell(values: list[float], digits: int, paper: float | None = None, scale: float = 1.0) -> str:
    """``mean ± std`` of ``values`` (one value alone; ``-`` for none), then ``[paper]`` when published."""
    values = [v * scale for v in values]
    if not values:
        ours = "-"
    elif len(values) == 1:
        ours = fmt(values[0], digits)
    else:
        ours = f"{fmt(statistics.fmean(values), digits)} ± {fmt(statistics.pstdev(values), digits)}"
    return ours if paper is None else f"{ours} [{fmt(paper, digits)}]"


def _distinct(values: list[float], digits: int) -> str:
    """Each distinct value once, in order, joined by `` / `` (``-`` for none): a cell whose runs should agree."""
    return " / ".join(fmt(v, digits) for v in dict.fromkeys(values)) or "-"


def pair_of(record: Mapping[str, Any]) -> Pair:
    return (str(record.get("dataset")), str(record.get("teacher")), str(record.get("student")))


def method_of(record: Mapping[str, Any]) -> str:
    """A record's row label: its ``method``, else its entry's name."""
    return str(record.get("method") or record["entry"])


def _pair_label(pair: Pair, *, dataset: bool = True) -> str:
    name, teacher, student = pair
    label = f"{teacher} → {student}" if teacher != "None" else student
    return f"{label} ({name})" if dataset else label


# --------------------------------------------------------------------------- tables


def accuracy_table(records: Sequence[Mapping[str, Any]], papers: PaperNumbers | None = None) -> str:
    """Tables II/III: a column group (Acc@1, Agree@1, loyalty) per pair, a row per method, best values per run.

    T.Scratch is the teacher's own Acc@1 on the test split (``final_teacher_acc1``)
    with Agree@1 100 and loyalty 1; it appears for every pair that has runs
    with a teacher, each distinct value once (``a / b`` where runs evaluated on
    different test subsets or had different teachers). Methods appear in the order of their first run.
    """
    pairs: list[Pair] = []
    methods: list[str] = []
    cells: dict[tuple[str, Pair], list[Mapping[str, Any]]] = {}
    for record in records:
        if record.get("teacher") is None:
            continue  # no teacher, nothing to agree with: such a run belongs in the stability table only
        pair, method = pair_of(record), method_of(record)
        pairs += [pair] if pair not in pairs else []
        methods += [method] if method not in methods else []
        cells.setdefault((method, pair), []).append(record)
    rows = [TEACHER_ROW, *(m for m in methods if m == SCRATCH_ROW), *(m for m in methods if m not in (TEACHER_ROW, SCRATCH_ROW))]

    header = ["method"]
    for pair in pairs:
        header += [f"{_pair_label(pair)}: Acc@1", "Agree@1", "loyalty"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in rows:
        line = [method]
        for pair in pairs:
            paper = (papers.accuracy.get(pair, {}) if papers else {}).get(method, (None,) * _ACCURACY_LEN)
            if method == TEACHER_ROW:
                ran = [r for m in methods for r in cells.get((m, pair), [])]
                # Each distinct value once, side by side: runs may use another teacher (per seed) or test subset.
                accs = _numbers(ran, "final_teacher_acc1")
                teacher = _distinct(accs, 2) + (f" [{fmt(paper[0], 2)}]" if paper[0] is not None else "")
                line += [teacher, *((_cell([100.0], 2, paper[1]), _cell([1.0], 4, paper[2])) if accs else ("-", "-"))]
                continue
            ran = cells.get((method, pair), [])
            line += [
                _cell(_numbers(ran, "best_acc1"), 2, paper[0]),
                _cell(_numbers(ran, "best_agree1"), 2, paper[1]),
                _cell(_numbers(ran, "best_loyalty"), 4, paper[2]),
            ]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"


_STABILITY_COLUMNS = (
    "entry", "method", "teacher → student", "seeds", "steps", "final Acc@1", "μ Acc@1", "σ² Acc@1", "best Acc@1",
    "peak mem (GB)", "wall (h)", "synthesis (h)",
)


def stability_table(records: Sequence[Mapping[str, Any]], papers: PaperNumbers | None = None) -> str:
    """Table V and cost: one row per entry (in order of first appearance), seeds as mean ± std.

    μ and σ² are each run's mean and population variance of Acc@1 over its
    evaluations from ``eval.stability_from`` of training on; the paper's
    memory is GPU memory in GB and its time the whole run in hours.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["entry"], []).append(record)
    lines = ["| " + " | ".join(_STABILITY_COLUMNS) + " |", "|" + "---|" * len(_STABILITY_COLUMNS)]
    for entry, group in groups.items():
        first = group[0]
        paper = (papers.stability.get(pair_of(first), {}) if papers else {}).get(method_of(first), (None,) * _STABILITY_LEN)
        lines.append("| " + " | ".join([
            entry, method_of(first), _pair_label(pair_of(first), dataset=False), ", ".join(str(r["seed"]) for r in group),
            _distinct(_numbers(group, "steps"), 0),  # runs of a suite entry share it
            _cell(_numbers(group, "final_acc1"), 2),
            _cell(_numbers(group, "mean_acc1"), 2, paper[0]),
            _cell(_numbers(group, "var_acc1"), 2, paper[1]),
            _cell(_numbers(group, "best_acc1"), 2, paper[2]),
            _cell(_numbers(group, "peak_mem_mb"), 2, paper[3], scale=1 / 1024),
            _cell(_numbers(group, "wall_s"), 3, paper[4], scale=1 / 3600),
            _cell(_numbers(group, "synth_s"), 3, scale=1 / 3600),
        ]) + " |")
    return "\n".join(lines) + "\n"
