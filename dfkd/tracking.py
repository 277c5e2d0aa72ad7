"""Run outputs that are not weights: TensorBoard events, ``metrics.jsonl``, and the progress bar.

Only the main process writes. Scalars are accumulated on the device between
log points by :class:`Meter`, so the step loop itself never waits for the
device; one transfer per log point brings the means back.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dfkd.files import atomic_write_bytes

__all__ = ["GRID_PER_ROW", "GRID_PADDING", "Meter", "RunLogger", "Stopwatch", "image_grid"]

GRID_PER_ROW, GRID_PADDING = 8, 1  # the layout of every image grid a run writes


def image_grid(images: Tensor) -> Tensor:
    """Images ``[N, C, H, W]`` in ``[0, 1]`` as one RGB grid ``[3, H', W']``, ``GRID_PER_ROW`` to a row."""
    from torchvision.utils import make_grid

    images = images.detach().float().cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return make_grid(images, nrow=GRID_PER_ROW, padding=GRID_PADDING)


class Meter:
    """Running sums of scalar tensors, read back once per log interval.

    Each name is averaged over the updates that carried it, so a value logged
    every fifth step (a synthesis term) is not diluted by the other four.
    Values computed on the device (losses) are summed there; values the host
    already knows (a schedule's weight, lambda) should be passed as CPU tensors
    and are summed on the host, so logging them never copies to the device
    (a host-to-device copy from pageable memory waits for the device on CUDA).
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

    def update(self, values: Mapping[str, Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()
            self._counts[name] = self._counts.get(name, 0) + 1

    def __len__(self) -> int:
        return max(self._counts.values(), default=0)

    def pop_means(self, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """The means since the last call (one device-to-host transfer per device), and reset.

        ``reduce`` maps each device's stacked ``[N]`` sums to what is reported, e.g.
        their average over processes; it sees one tensor per device holding values.
        """
        if not self._sums:
            return {}
        means: dict[str, float] = {}
        for device in {s.device for s in self._sums.values()}:  # one transfer per device
            names = [n for n, s in self._sums.items() if s.device == device]
            counts = torch.tensor([self._counts[n] for n in names], dtype=torch.float32)
            sums = torch.stack([self._sums[n] for n in names])
            if reduce is not None:  # every process counts the same updates, so reducing sums reduces means
                sums = reduce(sums)
            means.update(zip(names, (sums.cpu() / counts).tolist()))
        means = {name: means[name] for name in self._sums}  # first-logged order
        self._sums, self._counts = {}, {}
        return means


class Stopwatch:
    """Accumulated wall time of code blocks, without host syncs on CUDA.

    On CUDA each block records a pair of events, resolved only when
    :attr:`seconds` is read (at log time, when the host waits anyway); on the
    CPU it uses ``time.perf_counter``.
    """

    def __init__(self, device: torch.device, seconds: float = 0.0) -> None:
        self.cuda = device.type == "cuda"
        self._seconds = seconds
        self._pending: list[tuple[Any, Any]] = []
        self._start: Any = None

    def __enter__(self) -> Stopwatch:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._start, end))
        else:
            self._seconds += time.perf_counter() - self._start

    @property
    def seconds(self) -> float:
        for start, end in self._pending:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1000.0
        self._pending = []
        return self._seconds


class RunLogger:
    """TensorBoard + ``metrics.jsonl`` + tqdm, active on the main process only."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        initial_step: int,
        progress_bar: bool,
        history: Sequence[Mapping[str, Any]] = (),
        label: str = "train",
    ) -> None:
        """``history`` is the run's evaluations so far (those of the checkpoint it resumes, or none):
        ``metrics.jsonl`` is rewritten to hold exactly these, so neither a fresh run in an old folder
        nor a resume after a crash between an evaluation and its checkpoint leaves stray lines.
        ``label`` names the run's phase on its progress bar (``teacher``, ``distil without data``)."""
        self.enabled = enabled
        self.dir = Path(output_dir)
        self._writer = None
        self._bar = None
        if not enabled:
            return
        self._write_history(history)
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self._writer = SummaryWriter(log_dir=str(self.dir / "tb"))
        if progress_bar:
            interactive = sys.stderr.isatty()
            self._bar = tqdm(
                total=total_steps, initial=initial_step, desc=label, unit="step", dynamic_ncols=True,
                mininterval=0.1 if interactive else 30.0,  # a log file gets a line every 30 s, not every step
            )

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)

    def histogram(self, name: str, values: Tensor, step: int) -> None:
        if self._writer is not None:
            self._writer.add_histogram(name, values.detach().float().cpu(), step)

    def images(self, name: str, grid: Tensor, step: int) -> None:
        """Log a ``[3, H, W]`` image grid in ``[0, 1]``."""
        if self._writer is not None:
            self._writer.add_image(name, grid.detach().float().cpu().clamp(0, 1), step)

    def record(self, entry: Mapping[str, Any]) -> None:
        """Append one evaluation to ``metrics.jsonl``."""
        if not self.enabled:
            return
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(_json_line(entry))

    def rewind(self, step: int, history: Sequence[Mapping[str, Any]]) -> None:
        """Go back to ``step`` with ``history`` (a reloaded checkpoint's): ``metrics.jsonl`` and the bar follow.

        TensorBoard keeps the abandoned stretch; the resumed curves overwrite it from ``step`` on.
        """
        if not self.enabled:
            return
        self._write_history(history)
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def _write_history(self, history: Sequence[Mapping[str, Any]]) -> None:
        atomic_write_bytes(self.dir / "metrics.jsonl", "".join(_json_line(entry) for entry in history).encode())

    def progress(self, n: int = 1, **postfix: float) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()


def _json_line(entry: Mapping[str, Any]) -> str:
    """One ``metrics.jsonl`` line; non-finite floats become ``null`` (JSON has no NaN)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in entry.items()}
    return json.dumps(clean) + "\n"
