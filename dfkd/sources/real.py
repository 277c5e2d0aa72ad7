"""``RealDataSource``: batches from a real dataset, for teachers, scratch students and real-data KD.

Order is a pure function of ``(seed, pass)``: each pass over the active
indices is a fresh permutation drawn from a generator seeded with both, so a
resumed run replays exactly the batches an uninterrupted one would have seen,
without pickling a sampler. ``batch_size`` is the global batch; each process
takes its contiguous shard of every batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from dfkd.data.transforms import to_unit
from dfkd.errors import ConfigError
from dfkd.sources.base import SOURCES, Batch, Context, SourceEnv

__all__ = ["RealDataSource"]


@SOURCES.register("real")
class RealDataSource:
    """Uniformly shuffled batches of a real dataset, augmented and normalised on the device.

    Args:
        env: the engine's build environment (dataset, transforms, accelerator).
        batch_size: global batch size, split evenly across processes.
        num_workers: loader processes for datasets decoded per item; in-memory
            datasets are indexed directly and need none.
    """

    def __init__(self, env: SourceEnv, *, batch_size: int = 128, num_workers: int = 2) -> None:
        self.dataset = env.train_set()
        self.normalize = env.normalize
        self.augment = env.augment
        self.device = env.accelerator.device
        self.rank = env.accelerator.process_index
        self.world = env.accelerator.num_processes
        self.seed = env.seed
        if batch_size % self.world:
            raise ConfigError(
                f"source.batch_size={batch_size} does not split evenly over {self.world} processes; "
                "use a multiple of the process count."
            )
        self.batch_size = batch_size
        self.targets: Tensor = torch.as_tensor(self.dataset.targets)
        self.active = torch.arange(len(self.dataset))
        if len(self.active) < batch_size:
            raise ConfigError(
                f"the training split has {len(self.active)} samples, fewer than source.batch_size={batch_size}."
            )
        self.num_workers = num_workers
        self._pass = 0
        self._cursor = 0  # batches of the current pass already handed out
        self._iter: Iterator[tuple[Tensor, Tensor, Tensor]] | None = None

    # -- schedule of indices

    def steps_per_epoch(self) -> int:
        return len(self.active) // self.batch_size

    def _pass_order(self, pass_index: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_index)
        return self.active[torch.randperm(len(self.active), generator=generator)]

    def _shards(self, pass_index: int, start: int) -> Iterator[Tensor]:
        order = self._pass_order(pass_index)
        shard = self.batch_size // self.world
        for b in range(start, self.steps_per_epoch()):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield batch[self.rank * shard : (self.rank + 1) * shard]

    def _read(self, pass_index: int, start: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        images = getattr(self.dataset, "images", None)
        if isinstance(images, Tensor):  # in memory: index directly, no loader needed
            for idx in self._shards(pass_index, start):
                yield images[idx], self.targets[idx], idx
            return
        shards = list(self._shards(pass_index, start))
        loader = DataLoader(
            self.dataset,
            batch_sampler=[s.tolist() for s in shards],
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for idx, (x, y) in zip(shards, loader):
            yield x, torch.as_tensor(y), idx

    # -- the contract

    def next_batch(self, ctx: Context) -> Batch:
        if self._iter is None:
            self._iter = self._read(self._pass, self._cursor)
        item = next(self._iter, None)
        if item is None:  # the pass is exhausted: start the next permutation
            self._pass, self._cursor = self._pass + 1, 0
            self._iter = self._read(self._pass, 0)
            item = next(self._iter)
        self._cursor += 1
        x, y, idx = item
        x = x.to(self.device, non_blocking=True)
        x = self.normalize(self.augment(to_unit(x)))
        return Batch(x=x, y=y.to(self.device, non_blocking=True), index=idx.to(self.device, non_blocking=True))

    def on_epoch_start(self, ctx: Context) -> None:
        pass

    def on_epoch_end(self, ctx: Context) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"pass": self._pass, "cursor": self._cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pass, self._cursor = int(state["pass"]), int(state["cursor"])
        self._iter = None
