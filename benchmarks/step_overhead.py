"""Engine overhead of one student step: the loop's step against the bare model compute.

Builds the run of a recipe, then times, interleaved so that machine noise hits
all three alike: (1) a bare forward + backward + optimizer step on a fixed
batch, (2) the engine's ``train_step`` on that batch, (3) ``next_batch`` plus
``train_step``. Prints the medians and their ratios to (1).

    python benchmarks/step_overhead.py recipes/quickstart.yaml [key=value ...]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

import torch

from dfkd.config import load_config
from dfkd.engine import Trainer


def main(argv: list[str]) -> None:
    recipe, overrides = argv[0], argv[1:]
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(recipe, [f"output_dir={out}", "train.progress_bar=false", *overrides])
        trainer = Trainer(cfg)
        ctx = trainer.context(0)
        batch = trainer.source.next_batch(ctx)
        criterion = torch.nn.CrossEntropyLoss()

        def bare() -> None:
            loss = criterion(trainer.student(batch.x), batch.y)
            loss.backward()
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        cases = {
            "bare forward+backward+step": bare,
            "engine train_step": lambda: trainer.train_step(batch),
            "next_batch + train_step": lambda: trainer.train_step(trainer.source.next_batch(ctx)),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(6):
            for name, fn in cases.items():
                start = time.perf_counter()
                fn()
                fn()
                times[name].append((time.perf_counter() - start) / 2)
        base = statistics.median(times["bare forward+backward+step"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:32s} {median * 1000:8.1f} ms  x{median / base:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
