"""Interleaved timing: two sides of each case, timed back to back round after round, and their table.

A :class:`Case` pairs an engine call with its bare counterpart; :func:`measure`
times both sides of every case in interleaved rounds, so that a slow spell of
the machine hits both sides alike, and reports the medians, one :class:`Row`
per case; :func:`format_table` writes the rows as markdown.
``benchmarks/speed.py`` says what each side runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["COLUMNS", "Row", "Case", "Clock", "measure", "format_table"]

COLUMNS = ("entry", "phase", "images", "bare ms", "engine ms", "engine / bare", "images/s")


@dataclass(frozen=True)
class Row:
    """The medians of one phase of one entry."""

    entry: str
    phase: str
    images: int  # images per call: synthesised (synthesis) or trained on (student)
    bare_s: float  # median seconds per call
    engine_s: float
    ratio: float  # engine / bare: the median of the per-round ratios (see measure)

    @property
    def images_per_s(self) -> float:
        return self.images / self.engine_s

    def cells(self) -> tuple[str, ...]:
        return (
            self.entry, self.phase, str(self.images), f"{self.bare_s * 1e3:.1f}", f"{self.engine_s * 1e3:.1f}",
            f"{self.ratio:.3f}", f"{self.images_per_s:.0f}",
        )


@dataclass(frozen=True)
class Case:
    """One phase: the engine's call and its bare counterpart, each processing ``images`` images."""

    phase: str
    images: int
    bare: Callable[[], object]
    engine: Callable[[], object]


class Clock:
    """Seconds per call of a function, averaged over ``steps`` back-to-back calls.

    Args:
        device: where the work runs; on CUDA every timing starts and ends synchronised.
        cuda_events: time with a pair of CUDA events around the calls instead of the host clock.
    """

    def __init__(self, device: torch.device, cuda_events: bool = False) -> None:
        if cuda_events and device.type != "cuda":
            raise ValueError(f"CUDA events time CUDA work, but the runs are on {device.type}")
        self.cuda = device.type == "cuda"
        self.cuda_events = cuda_events

    def __call__(self, fn: Callable[[], object], steps: int) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        if self.cuda_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / steps
        begin = time.perf_counter()
        for _ in range(steps):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - begin) / steps


def measure(entry: str, cases: Sequence[Case], clock: Clock, steps: int, repeats: int) -> list[Row]:
    """Time every case's two sides interleaved: a warm-up of each, then ``repeats`` rounds.

    In each round every case times its bare and its engine side back to back, in
    alternating order from one round to the next. The times are the medians over
    the rounds; the ratio is the median of the rounds' own ratios, so that a slow
    spell of the machine, which hits both sides of a round alike, cancels out.
    """
    for case in cases:
        clock(case.bare, 1)
        clock(case.engine, 1)
    times = [{"bare": [], "engine": []} for _ in cases]
    for round_index in range(repeats):
        order = ("bare", "engine") if round_index % 2 == 0 else ("engine", "bare")
        for case, timed in zip(cases, times):
            for side in order:
                timed[side].append(clock(getattr(case, side), steps))
    return [
        Row(
            entry, case.phase, case.images, statistics.median(timed["bare"]), statistics.median(timed["engine"]),
            statistics.median(e / b for e, b in zip(timed["engine"], timed["bare"])),
        )
        for case, timed in zip(cases, times)
    ]


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table under :data:`COLUMNS`."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines) + "\n"
