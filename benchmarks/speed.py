"""The speed benchmark: what the engine adds to the model compute of a synthesis step and a student step.

For each entry (a recipe and its overrides; by default every entry of
``benchmarks/suites/speed.yaml``) the run is built in a temporary folder and
placed halfway through its training, so that every scheduled term weight (such
as CuDFKD's adversarial one, 0 until a fifth of the run) is on. Then two
phases are timed, each against a **bare** version of the same model compute:
the same models, batch and device, with no hooks, loss terms, schedules or
logging, and one simple scalar loss in place of the method's terms.

- **synthesis** (data-free entries only):

  - for a generative synthesizer, one ``next_batch`` of a step on which the
    source synthesises (its ``kd_steps`` is set to 1 so that every step does):
    the synthesizer's generator update(s), then the student's batch. Bare: the
    generator forward, the teacher forward, the student forward when the active
    terms need the student, the simple loss, a backward into the generator only,
    the synthesizer's own optimiser step; and, where the student's batch is fresh
    noise (``sample_from`` ``train`` or ``eval``), the same no-grad generator forward.
  - for an inversion synthesizer (DeepInversion, CMI), one inner iteration of a
    round (``update``), not the whole round. Bare: the round's pixels (or the
    generator on its codes), the teacher forward, the student forward when
    needed, the simple loss, a backward into the round's variables only, and an
    Adam step with the round's settings.

- **student**: the engine's ``train_step`` on one fixed batch. Bare: the teacher
  forward (only where ``train_step`` runs it: not when the batch already carries
  the teacher's logits, as with ``sample_from: last``), the student forward, the
  simple loss, the backward and the student optimiser's step.

The bare teacher is a copy of the teacher (same weights, device and memory
format) without the hooks that the synthesis terms place on it. After one
untimed warm-up call of each side, an entry's cases run interleaved for
``--repeats`` rounds, each timing averaging ``--steps`` back-to-back calls; in
every round each case times its bare and engine side back to back. The table
gives the median times, and as the ratio the median of the rounds' own ratios,
so that machine noise, which hits both sides of a round alike, cancels: compare
ratios, not absolute times across entries. Images per second are those of the
engine side. On CUDA each timing synchronises before and after
(``time.perf_counter``); ``--cuda-events`` times with pairs of ``torch.cuda.Event``
instead.

    python benchmarks/speed.py [SUITE_OR_RECIPE ...] [--steps N] [--repeats R] [--device cpu|cuda]
                               [--cuda-events] [--out FILE.md] [key=value ...]

The ``key=value`` overrides apply to every entry, after the suite's.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from dfkd.bench import SuiteEntry, load_suite
from dfkd.build import make_accelerator
from dfkd.engine import Loop
from dfkd.models import create_model
from dfkd.recipe import load_config
from dfkd.sources import Batch, Context
from dfkd.teacher import train_missing_teacher
from generators.inversion import InversionSynthesizer
from generators.synthesizers import GenerativeSynthesizer, eval_mode

# benchmarks/timing.py: this script's folder is on sys.path when it runs (python benchmarks/speed.py)
from timing import Case, Clock, Row, format_table, measure

__all__ = ["main", "entries_of", "build_run", "entry_cases", "synthesis_case", "student_case", "bare_teacher"]


# --------------------------------------------------------------------------- the two phases


def _simple_loss(first: Tensor, second: Tensor | None = None) -> Tensor:
    """The bare side's loss: the mean square of ``first [B, K]``, or of ``first - second``."""
    diff = first.float() if second is None else first.float() - second.float()
    return diff.square().mean()


def bare_teacher(loop: Loop) -> nn.Module | None:
    """The run's teacher rebuilt without the synthesis terms' hooks: same weights, device and memory format."""
    if loop.teacher is None:
        return None
    spec = loop.spec
    teacher = create_model(loop.cfg.teacher.arch, num_classes=spec.num_classes, in_channels=spec.in_channels)
    teacher.load_state_dict(loop.teacher.state_dict())
    return teacher.to(loop.device, memory_format=loop.memory_format).eval().requires_grad_(False)


def synthesis_case(loop: Loop, ctx: Context, teacher: nn.Module) -> Case | None:
    """The synthesis phase of a data-free run at ``ctx``'s progress; ``None`` where the source does not synthesise."""
    built = getattr(loop.source, "built", None)
    if built is None:
        return None
    synth = built.synthesizer
    weights = built.weights(ctx.step / ctx.steps_per_epoch, ctx.epochs)
    needs_student = any(term.needs_student for name, term in synth.terms.items() if weights[name] != 0)
    student = loop.unwrapped_student if needs_student else None
    if isinstance(synth, InversionSynthesizer):
        return _inversion_case(loop, synth, weights, teacher, student)
    if isinstance(synth, GenerativeSynthesizer):
        return _generative_case(loop, synth, ctx, teacher, student)
    raise TypeError(f"no bare synthesis step for {type(synth).__name__}; add one to benchmarks/speed.py")


def _generative_case(
    loop: Loop, synth: GenerativeSynthesizer, ctx: Context, teacher: nn.Module, student: nn.Module | None
) -> Case:
    source, autocast = loop.source, loop.accelerator.autocast

    def draw(n: int) -> Tensor:
        return torch.randn(n, synth.net.nz, device=synth.device)

    def bare() -> None:
        synth.generator.train()
        with eval_mode(student), autocast():
            for _ in range(synth.g_steps):
                x = synth.render(draw(synth.batch_size))
                loss = _simple_loss(teacher(x), None if student is None else student(x))
                synth.optimizer.zero_grad(set_to_none=True)
                loss.backward(inputs=synth.trainable)
                synth.optimizer.step()
            if synth.sample_from != "last":  # the student's batch: fresh noise through the generator
                with torch.no_grad(), eval_mode(synth.generator if synth.sample_from == "eval" else None):
                    synth.render(draw(source.local_batch))

    phase = "synthesis" if synth.g_steps == 1 else f"synthesis ({synth.g_steps} updates)"
    return Case(phase, synth.batch_size * synth.g_steps, bare, lambda: source.next_batch(ctx))


def _inversion_case(
    loop: Loop, synth: InversionSynthesizer, weights: dict[str, float], teacher: nn.Module,
    student: nn.Module | None,
) -> Case:
    autocast, device = loop.accelerator.autocast, loop.device
    current = synth.begin_round(device)
    if synth.generator is None:
        pixels = torch.randn(synth.batch_size, *synth.image_shape, device=device, requires_grad=True)
        variables, render = [pixels], lambda: pixels
    else:
        generator = synth.generator
        z = torch.randn(synth.batch_size, generator.nz, device=device, requires_grad=True)
        variables = [z, *generator.parameters()]

        def render() -> Tensor:
            out = generator(z)
            return out if generator.output_range == "normalized" else synth.normalize(out)

    optimizer = torch.optim.Adam(variables, lr=synth.lr, betas=synth.betas)

    def bare() -> None:
        with eval_mode(student), autocast():
            x = render()
            loss = _simple_loss(teacher(x), None if student is None else student(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=variables)
        optimizer.step()

    def engine() -> None:
        with eval_mode(loop.teacher, student), autocast():
            synth.update(current, loop.teacher, student, weights)

    return Case("synthesis, per inner iteration", synth.batch_size, bare, engine)


def student_case(loop: Loop, batch: Batch, teacher: nn.Module | None) -> Case:
    """``train_step`` on ``batch`` against the bare student step."""
    x = batch.x.contiguous(memory_format=loop.memory_format)
    runs_teacher = batch.teacher_logits is None and loop.loss.needs_teacher
    optimizer = getattr(loop.optimizer, "optimizer", loop.optimizer)  # the torch optimiser accelerate wraps

    def bare() -> None:
        with loop.accelerator.autocast():
            t_logits = batch.teacher_logits
            if runs_teacher:
                with torch.no_grad():
                    t_logits = teacher(x)
            s_logits = loop.student(x)
            loss = F.cross_entropy(s_logits.float(), batch.y) if t_logits is None else _simple_loss(s_logits, t_logits)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Case("student", len(batch.x), bare, lambda: loop.train_step(batch))


def entry_cases(loop: Loop) -> list[Case]:
    """Both phases of a built run, placed halfway through its training."""
    loop.state.step = loop.total_steps // 2
    ctx = loop.context(loop.state.step // loop.steps_per_epoch)
    batch = loop.source.next_batch(ctx)  # a data-free source synthesises first (a pool source: a whole round)
    teacher = bare_teacher(loop)
    synthesis = synthesis_case(loop, ctx, teacher)
    return [*([synthesis] if synthesis is not None else []), student_case(loop, batch, teacher)]


# --------------------------------------------------------------------------- entries and the command line


def entries_of(targets: Sequence[str]) -> Iterator[SuiteEntry]:
    """Each target's entries: a suite (a name, or a YAML file with ``entries``) or one recipe file.

    A suite's own overrides come first in each of its entries' overrides.
    """
    for target in targets:
        path = Path(target)
        if path.is_file() and "entries" not in (OmegaConf.load(path) or {}):
            yield SuiteEntry(path.stem, target)
            continue
        suite = load_suite(target)
        for entry in suite.entries:
            yield dataclasses.replace(entry, overrides=(*suite.overrides, *entry.overrides))


def build_run(entry: SuiteEntry, overrides: Sequence[str], out: Path) -> Loop:
    """The entry's components, built as its run builds them, with ``out`` as its run folder; a missing
    teacher is trained first, into its own folder. A generator source synthesises on every step (``kd_steps=1``)."""
    layers = [*entry.overrides, *overrides, f"output_dir={out / entry.name}", "train.progress_bar=false"]
    cfg = load_config(entry.recipe, layers)
    if cfg.source is not None and "kd_steps" in cfg.source:
        cfg = load_config(entry.recipe, [*layers, "source.kd_steps=1"])
    train_missing_teacher(cfg)
    return Loop(cfg, make_accelerator(cfg))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/speed.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("targets", nargs="*", metavar="SUITE_OR_RECIPE | key=value",
                        help="suites (names or files) or recipe files (default: speed); key=value overrides for all")
    parser.add_argument("--steps", type=int, default=1, help="calls averaged per timing (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timings per case, median taken (default 7)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: accelerate's choice (CUDA when available)")
    parser.add_argument("--cuda-events", action="store_true", help="time with torch.cuda.Event pairs (CUDA only)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    return parser


def _device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The device type the runs will use; errors before any run is built."""
    cuda = torch.cuda.is_available()
    if args.cuda_events and not cuda:
        parser.error(
            f"--cuda-events needs a CUDA device, and torch {torch.__version__} finds none on this machine "
            "(torch.cuda.is_available() is False). Leave it out to time with time.perf_counter."
        )
    if args.cuda_events and args.device == "cpu":
        parser.error("--cuda-events times CUDA work: it cannot go with --device cpu.")
    if args.device == "cuda" and not cuda:
        parser.error(f"--device cuda: torch {torch.__version__} finds no CUDA device on this machine.")
    if args.device == "cpu" and cuda:
        os.environ["ACCELERATE_USE_CPU"] = "true"  # accelerate's switch; read when the first run is built
    return args.device or ("cuda" if cuda else "cpu")


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the benchmark, print the table (and write it to ``--out``); returns the rows."""
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1.")
    device = _device(parser, args)
    overrides = [t for t in args.targets if "=" in t]
    entries = list(entries_of([t for t in args.targets if "=" not in t] or ["speed"]))
    clock = Clock(torch.device(device), args.cuda_events)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="dfkd-speed-") as out:
        for number, entry in enumerate(entries, 1):
            print(f"speed: {entry.name} ({number}/{len(entries)})", file=sys.stderr, flush=True)
            loop = build_run(entry, overrides, Path(out))
            if loop.device.type != device:
                raise RuntimeError(f"{entry.name} was built on {loop.device}, not {device}: this process's "
                                   "accelerate state was made earlier for another device.")
            rows += measure(entry.name, entry_cases(loop), clock, args.steps, args.repeats)
            del loop
            gc.collect()
    timing = "CUDA events" if args.cuda_events else "time.perf_counter"
    if device == "cuda" and not args.cuda_events:
        timing += " with synchronisation"
    header = (
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {timing}; "
        f"medians of {args.repeats} interleaved rounds of {args.steps} call(s) per side\n\n"
    )
    table = header + format_table(rows)
    print(table, end="")
    if args.out is not None:
        args.out.write_text(table)
    return rows


if __name__ == "__main__":
    main()
