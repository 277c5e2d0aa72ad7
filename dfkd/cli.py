"""Command line: ``dfkd train``, ``dfkd eval``, ``dfkd bench``, ``dfkd results`` and ``dfkd list``.

The same entry point runs as ``dfkd ...``, ``python -m dfkd ...`` and
``accelerate launch -m dfkd ...``; the launcher only decides how many
processes run it. Errors the user can fix are printed as one paragraph and
exit with status 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from dfkd.errors import USER_ERRORS

__all__ = ["main"]

_EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfkd",
        description="Data-free knowledge distillation engine. Recipes are YAML files; override any key with key=value.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="run a recipe", description="Run a recipe: dfkd train RECIPE [key=value ...]")
    train.add_argument("recipe", help="path of a YAML recipe (see recipes/)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=10")
    train.add_argument(
        "--overwrite", action="store_true",
        help="start over in an output_dir that holds a finished run (its files are deleted first)",
    )

    evaluate = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on a test split",
        description=(
            "Evaluate student.checkpoint on data's test split, optionally against a teacher, and print one JSON "
            "object with acc1, acc5 and, with a teacher, agree1, loyalty and loyalty_ref. With a run's "
            "config.yaml and no student.checkpoint, the run's student.safetensors is evaluated."
        ),
    )
    evaluate.add_argument("args", nargs="*", metavar="[CONFIG] key=value", help="an optional recipe, then overrides")

    bench = sub.add_parser(
        "bench",
        help="run a benchmark suite and tabulate it",
        description=(
            "Run every entry of a suite (benchmarks/suites/SUITE.yaml, or a path) for each of its seeds, skipping "
            "runs that already have a summary.json and resuming unfinished ones, then write results.json, "
            "results.csv, results.md (the papers' tables) and the plots into the suite's output folder. "
            "Overrides apply to every entry."
        ),
    )
    bench.add_argument("suite", help="a suite's name in benchmarks/suites/, or the path of a suite file")
    bench.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every entry, e.g. train.epochs=1")
    bench.add_argument("--output-dir", default=None, help="the suite's output folder (default: the suite's output_dir)")
    bench.add_argument(
        "--only", default="", metavar="NAME[,NAME...]",
        help="train only these entries (comma-separated names); the tables still hold every finished run",
    )

    results = sub.add_parser(
        "results",
        help="put finished suites' tables and plots into the README",
        description=(
            "Fill the README's Results section (between '<!-- results: start -->' and '<!-- results: end -->') "
            "with the results.md of each suite folder given, copying its plots under --images."
        ),
    )
    results.add_argument("folders", nargs="+", help="suite output folders that hold results.md (e.g. runs/bench/mnist)")
    results.add_argument("--readme", default="README.md", help="the file to update (default: README.md)")
    results.add_argument("--images", default="docs/results", help="where the plots are copied (default: docs/results)")

    listing = sub.add_parser("list", help="list the names a registry knows")
    listing.add_argument("what", choices=sorted(_LISTINGS), help="which registry")
    return parser


def _list_models() -> list[str]:
    from dfkd.models import list_models

    return list_models()


def _list_registry(module: str, attr: str):
    def names() -> list[str]:
        import importlib

        return getattr(importlib.import_module(module), attr).names()

    return names


_LISTINGS = {
    "models": _list_models,
    "datasets": _list_registry("dfkd.data", "DATASETS"),
    "losses": _list_registry("dfkd.losses", "STUDENT_LOSSES"),
    "schedules": _list_registry("dfkd.policies.schedules", "SCHEDULES"),
    "sources": _list_registry("dfkd.sources", "SOURCES"),
    "curricula": _list_registry("dfkd.curricula", "CURRICULA"),
    "generators": _list_registry("generators.networks", "GENERATORS"),
    "synthesizers": _list_registry("generators.synthesizers", "SYNTHESIZERS"),
    "terms": _list_registry("generators.terms", "TERMS"),
    "optimizers": _list_registry("dfkd.optim", "OPTIMIZERS"),
}


def _train(recipe: str, overrides: Sequence[str], overwrite: bool = False) -> int:
    from dfkd.recipe import load_config

    cfg = load_config(recipe, overrides)  # before torch is imported: a typo is reported in a moment
    _claim_output_dir(Path(cfg.output_dir), overwrite)
    from dfkd.teacher import train_missing_teacher
    from dfkd.trainer import Trainer

    train_missing_teacher(cfg)  # its own run, before this one: "no teacher checkpoint at ...: training the teacher first"
    trainer = Trainer(cfg)
    summary = trainer.fit()
    if trainer.accelerator.is_main_process:
        print(_report(cfg.output_dir, summary))
        final = {k: round(v, 4) for k, v in summary.items() if k.startswith("final_") and isinstance(v, float)}
        print(json.dumps({"output_dir": str(cfg.output_dir), **final, "wall_s": round(summary["wall_s"], 1)}))
    return 0


def _claim_output_dir(folder: Path, overwrite: bool) -> None:
    """Refuse a folder that holds a finished run, unless told to start over; an unfinished one resumes as the
    recipe says (``train.resume``)."""
    from dfkd.errors import DfkdError

    finished = folder / "summary.json"
    if not finished.is_file():
        return
    if not overwrite:
        raise DfkdError(
            f"{folder} holds a finished run: its summary is {finished}. To train it again from the start, "
            "add --overwrite (which deletes that run first), or choose another folder with output_dir=PATH."
        )
    if (folder / ".lock").is_file():  # never delete under a run that is still training
        from dfkd.lock import run_lock

        with run_lock(folder):
            pass
    shutil.rmtree(folder)


def _report(output_dir: str, summary: dict) -> str:
    """What a person wants to read when a run ends: the numbers, and where to look next."""
    folder = Path(output_dir)
    pct = lambda key: f"{summary[key]:.2f}%" if isinstance(summary.get(key), float) else "-"  # noqa: E731
    lines = [f"finished in {summary['wall_s']:.0f} s ({summary.get('steps', 0)} steps): {folder}"]
    if "final_agree1" in summary:
        lines += [
            f"  teacher Acc@1 {pct('final_teacher_acc1')}; student Acc@1 {pct('final_acc1')}, "
            f"Agree@1 with the teacher {pct('final_agree1')}, loyalty {summary.get('final_loyalty', 0):.3f}",
        ]
    else:
        lines += [f"  Acc@1 {pct('final_acc1')}"]
    if (folder / "synthetic.png").is_file():
        lines += [f"  synthetic images: {folder / 'synthetic.png'}"]
    lines += [f"  curves: {folder / 'metrics.jsonl'}; tensorboard --logdir {folder / 'tb'}"]
    return "\n".join(lines)


def _eval(args: Sequence[str]) -> int:
    from dfkd.evaluate import run_eval

    recipe = args[0] if args and "=" not in args[0] else None
    overrides = list(args[1:] if recipe else args)
    result, is_main = run_eval(recipe, overrides)
    if is_main:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


def _bench(suite: str, overrides: Sequence[str], output_dir: str | None, only: str) -> int:
    from dfkd.bench import run_suite

    table = run_suite(suite, overrides, output_dir, only=[name for name in only.split(",") if name])
    print(table)
    return 0


def _results(folders: Sequence[str], readme: str, images: str) -> int:
    from dfkd.results import update_readme

    copied = update_readme(folders, readme, images)
    print(f"{readme}: results of {', '.join(folders)}; {len(copied)} plots in {images}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (and exits with it when run as a script)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args.recipe, args.overrides, args.overwrite)
        if args.command == "eval":
            return _eval(args.args)
        if args.command == "bench":
            return _bench(args.suite, args.overrides, args.output_dir, args.only)
        if args.command == "results":
            return _results(args.folders, args.readme, args.images)
        print("\n".join(_LISTINGS[args.what]()))
        return 0
    except USER_ERRORS as exc:
        print(f"dfkd: error: {exc}", file=sys.stderr)
        return _EXIT_USER_ERROR
