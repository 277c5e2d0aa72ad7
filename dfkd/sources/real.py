"""``RealDataSource``: batches from a real dataset, for teachers, scratch students, KD and the curricula.

Order is a pure function of ``(seed, pass, active indices)``: each pass over
the active indices is a fresh permutation drawn from a generator seeded with
the seed and the pass number, so a resumed run replays exactly the batches an
uninterrupted one would have seen, without pickling a sampler. ``batch_size``
is the global batch; each process takes its contiguous shard of every batch.

A **curriculum** (:mod:`dfkd.curricula`) chooses the active indices at the
start of every epoch; a new selection starts a new pass. An epoch is always
``len(pool) // batch_size`` steps, whatever the active subset's size, so every
curriculum gets the same step budget as plain KD (a small subset is simply
passed over more often).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from dfkd.curricula import CURRICULA, Curriculum, Scorer, Selection
from dfkd.data.transforms import to_unit
from dfkd.errors import ConfigError
from dfkd.sources.base import SOURCES, Batch, Context, SourceEnv, per_process

__all__ = ["RealDataSource"]


@SOURCES.register("real")
class RealDataSource:
    """Uniformly shuffled batches of a real dataset's active subset, augmented and normalised on the device.

    Args:
        env: the engine's build environment (dataset, transforms, accelerator).
        batch_size: global batch size, split evenly across processes.
        num_workers: loader processes for datasets decoded per item; in-memory
            datasets are indexed directly and need none.
        curriculum: ``{name: <curriculum>, **options}`` from :data:`dfkd.curricula.CURRICULA`,
            or ``None`` for every sample throughout.
        score_batch_size: per-process batch of the curriculum's scoring passes.
    """

    def __init__(
        self, env: SourceEnv, *, batch_size: int = 128, num_workers: int = 2,
        curriculum: Optional[dict[str, Any]] = None, score_batch_size: int = 512,
    ) -> None:
        self.dataset = env.train_set()
        self.normalize = env.normalize
        self.augment = env.augment
        self.accelerator = env.accelerator
        self.device = env.accelerator.device
        self.rank = env.accelerator.process_index
        self.world = env.accelerator.num_processes
        self.seed = env.seed
        self.shard = per_process(batch_size, self.world, "source.batch_size")
        self.batch_size = batch_size
        self.targets: Tensor = torch.as_tensor(self.dataset.targets)
        self.num_workers = num_workers
        self.pool = torch.arange(len(self.dataset))  # what may be trained on (a curriculum may hold some out)
        self.curriculum: Curriculum | None = None
        self.scorer: Scorer | None = None
        if curriculum is not None:
            options = dict(curriculum)
            self.curriculum = CURRICULA.get(options.pop("name"))(**options)
            if self.curriculum.needs_teacher and env.teacher is None:
                raise ConfigError(
                    f"source.curriculum {curriculum['name']!r} scores samples with the teacher, "
                    "but the recipe has no 'teacher' section."
                )
            self.pool = self.curriculum.setup(self.pool, self.targets, self.seed)
            self.scorer = Scorer(
                self.dataset, self.normalize, env.accelerator, env.teacher,
                batch_size=score_batch_size, num_workers=num_workers,
            )
        if len(self.pool) < batch_size:
            raise ConfigError(
                f"the training split has {len(self.pool)} samples to train on, fewer than "
                f"source.batch_size={batch_size}."
            )
        self.active = self.pool
        self._selected_epoch = -1  # the epoch whose start the curriculum last decided at
        self._pass = 0
        self._cursor = 0  # batches of the current pass already handed out
        self._iter: Iterator[tuple[Tensor, Tensor, Tensor]] | None = None

    # -- schedule of indices

    def steps_per_epoch(self) -> int:
        return len(self.pool) // self.batch_size

    def _pass_order(self, pass_index: int) -> Tensor:
        """A permutation of the active indices; a subset smaller than a batch is repeated to fill one."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_index)
        repeats = -(-self.batch_size // len(self.active))
        return torch.cat([self.active[torch.randperm(len(self.active), generator=generator)] for _ in range(repeats)])

    def _shards(self, pass_index: int, start: int) -> Iterator[Tensor]:
        order = self._pass_order(pass_index)
        for b in range(start, len(order) // self.batch_size):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield batch[self.rank * self.shard : (self.rank + 1) * self.shard]

    def _read(self, pass_index: int, start: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        images = getattr(self.dataset, "images", None)
        if isinstance(images, Tensor):  # in memory: index directly, no loader needed
            for idx in self._shards(pass_index, start):
                yield images[idx], self.targets[idx], idx
            return
        shards = list(self._shards(pass_index, start))
        # A generator of its own: iterating a loader draws a seed from its generator (else the global one),
        # and a resume starts this loader at a step where the uninterrupted run started none.
        loader = DataLoader(
            self.dataset,
            batch_sampler=[s.tolist() for s in shards],
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),
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
        """Let the curriculum decide this epoch's subset (once per epoch, also across a resume)."""
        if self.curriculum is None or self._selected_epoch == ctx.epoch:
            return
        selection = self.curriculum.select(ctx.epoch, ctx.epochs, self.scorer, ctx.student)
        self._selected_epoch = ctx.epoch
        if selection is None:
            return
        if selection.index is not None:
            index = selection.index.sort().values
            self._check_same_everywhere(index, ctx.epoch)
            if not torch.equal(index, self.active):
                if len(index) == 0:
                    raise RuntimeError(f"curriculum selected no samples at epoch {ctx.epoch}")
                self.active = index
                self._pass, self._cursor, self._iter = self._pass + 1, 0, None
        self._log_selection(selection, ctx)

    def _check_same_everywhere(self, index: Tensor, epoch: int) -> None:
        """Every process must select the same subset, or their shards stop forming one global batch.

        The curricula decide from scores gathered over all processes, so they agree by
        construction; this one small collective per epoch makes a violation loud.
        """
        if self.world == 1:
            return
        signature = torch.stack([torch.tensor(len(index)), index.sum(), (index * index).sum()]).to(self.device)
        gathered = self.accelerator.gather(signature).view(self.world, -1)
        if not (gathered == gathered[0]).all():
            raise RuntimeError(
                f"the curriculum selected different subsets on different processes at epoch {epoch} "
                f"(size, sum, sum of squares per process: {gathered.tolist()})"
            )

    def _log_selection(self, selection: Selection, ctx: Context) -> None:
        """The active subset's size and class balance, the stage, and the difficulty behind it."""
        classes = int(self.targets.max()) + 1
        pool_share = torch.bincount(self.targets[self.pool], minlength=classes).double() / len(self.pool)
        active_share = torch.bincount(self.targets[self.active], minlength=classes).double() / len(self.active)
        present = pool_share > 0
        ratio = active_share[present] / pool_share[present]  # 1 where a class keeps its dataset share
        ctx.log("curriculum/active_size", float(len(self.active)))
        ctx.log("curriculum/active_fraction", len(self.active) / len(self.pool))
        ctx.log("curriculum/stage", float(selection.stage))
        ctx.log("curriculum/class_share_min", float(ratio.min()))
        ctx.log("curriculum/class_share_max", float(ratio.max()))
        ctx.histogram("curriculum/class_share", ratio.float())
        if selection.difficulty is not None:
            ctx.histogram("curriculum/difficulty", selection.difficulty.float())
        for name, value in selection.scalars.items():
            ctx.log(name, float(value))

    def on_epoch_end(self, ctx: Context) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"pass": self._pass, "cursor": self._cursor}
        if self.curriculum is not None:
            state.update(
                active=self.active.clone(), selected_epoch=self._selected_epoch,
                curriculum=self.curriculum.state_dict(),
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pass, self._cursor = int(state["pass"]), int(state["cursor"])
        if self.curriculum is not None:
            self.active = state["active"].clone()
            self._selected_epoch = int(state["selected_epoch"])
            self.curriculum.load_state_dict(state["curriculum"])
        self._iter = None
