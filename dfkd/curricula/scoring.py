"""The one scoring pass every curriculum reads its difficulty from.

A :class:`Scorer` runs the teacher and a snapshot of the student over chosen
samples of the training set, without gradients and without augmentation, and
returns their logits as :class:`Scores`, from which every difficulty measure of
DESIGN.md section 6 is derived: the teacher's and the student's cross-entropy,
KL(teacher ‖ student) and the confidence on the true label.

Cost: one forward pass per model per sample. The teacher never changes, so its
logits are computed once per sample and cached for the whole run; the student
is re-run each time it is asked for, because its snapshot moves. Under several
processes each one scores a contiguous shard and the logits are gathered, so
every process ends with the same scores and therefore the same selection.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dfkd.data.transforms import to_unit
from generators.divergences import kl_div

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dfkd.data import ImageDataset

__all__ = ["Scores", "Scorer"]


@dataclass
class Scores:
    """Per-sample logits over ``index``, float32 on the CPU; each measure below is ``[M]``.

    Attributes:
        index: int64 ``[M]`` dataset indices.
        labels: int64 ``[M]`` their labels.
        teacher: ``[M, K]`` teacher logits, when the teacher was scored.
        student: ``[M, K]`` student-snapshot logits, when the student was scored.
    """

    index: Tensor
    labels: Tensor
    teacher: Tensor | None = None
    student: Tensor | None = None

    def teacher_ce(self) -> Tensor:
        return F.cross_entropy(self._need("teacher"), self.labels, reduction="none")

    def student_ce(self) -> Tensor:
        return F.cross_entropy(self._need("student"), self.labels, reduction="none")

    def kl(self, temperature: float = 1.0) -> Tensor:
        """``KL(softmax(t/T) ‖ softmax(s/T))`` per sample (natural log, no T² factor)."""
        return kl_div(self._need("teacher"), self._need("student"), temperature)

    def confidence(self) -> Tensor:
        """The student snapshot's probability of the true label."""
        return self._need("student").softmax(dim=-1).gather(1, self.labels[:, None]).squeeze(1)

    def student_accuracy(self) -> float:
        return float((self._need("student").argmax(dim=-1) == self.labels).float().mean())

    def teacher_accuracy(self) -> float:
        return float((self._need("teacher").argmax(dim=-1) == self.labels).float().mean())

    def _need(self, model: str) -> Tensor:
        logits = getattr(self, model)
        if logits is None:
            raise ValueError(f"these scores hold no {model} logits: score with {model}=True")
        return logits


class Scorer:
    """Scores training samples with the teacher and a student snapshot.

    Args:
        dataset: the training set (uint8 images); read without augmentation.
        normalize: the run's input normalisation.
        accelerator: gives the device, the autocast context and the process layout.
        teacher: the frozen teacher, or ``None`` for runs without one.
        batch_size: samples per forward pass, per process.
        num_workers: loader processes for datasets decoded per item.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        normalize: nn.Module,
        accelerator: Accelerator,
        teacher: nn.Module | None,
        *,
        batch_size: int = 512,
        num_workers: int = 2,
    ) -> None:
        self.dataset = dataset
        self.targets = torch.as_tensor(dataset.targets)
        self.normalize = normalize
        self.accelerator = accelerator
        self.teacher = teacher
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._teacher_cache: Tensor | None = None  # [N, K] logits, valid where _cached is set
        self._cached = torch.zeros(len(self.targets), dtype=torch.bool)

    def __call__(self, index: Tensor, student: nn.Module | None = None, *, teacher: bool = True) -> Scores:
        """Scores of the samples at ``index`` (int64 ``[M]``).

        Args:
            student: the student to snapshot (possibly wrapped for data
                parallelism); it is run in eval mode and left in the mode it had.
            teacher: also return the teacher's logits (cached after the first time).
        """
        index = index.cpu()
        scores = Scores(index=index, labels=self.targets[index])
        if teacher:
            if self.teacher is None:
                raise ValueError("this run has no teacher to score with")
            scores.teacher = self._teacher_logits(index)
        if student is not None:
            model = self.accelerator.unwrap_model(student)
            was_training = model.training
            model.eval()
            try:
                scores.student = self._logits(model, index, "student")
            finally:
                model.train(was_training)
        return scores

    def _teacher_logits(self, index: Tensor) -> Tensor:
        missing = index[~self._cached[index]].unique()
        if len(missing):
            logits = self._logits(self.teacher, missing, "teacher")
            if self._teacher_cache is None:
                self._teacher_cache = torch.zeros(len(self.targets), logits.shape[1])
            self._teacher_cache[missing] = logits
            self._cached[missing] = True
        return self._teacher_cache[index]

    @torch.no_grad()
    def _logits(self, model: nn.Module, index: Tensor, role: str) -> Tensor:
        """``[M, K]`` float32 CPU logits; each process runs its shard, then all are gathered."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per = math.ceil(len(index) / world)
        padded = torch.cat([index, index[:1].expand(per * world - len(index))]) if len(index) else index
        mine = padded[rank * per : (rank + 1) * per]
        chunks = []
        for x in self._inputs(mine):
            with self.accelerator.autocast():
                chunks.append(model(x).float())
        logits = torch.cat(chunks) if chunks else torch.zeros(0, 0, device=self.accelerator.device)
        if world > 1:
            logits = self.accelerator.gather(logits)
        return logits[: len(index)].cpu()

    def _inputs(self, index: Tensor) -> Iterator[Tensor]:
        """Normalised input batches of the samples at ``index``, in order, on the device."""
        device = self.accelerator.device
        images = getattr(self.dataset, "images", None)
        if isinstance(images, Tensor):
            batches = (images[index[i : i + self.batch_size]] for i in range(0, len(index), self.batch_size))
        else:
            loader = DataLoader(  # a generator of its own, so that scoring draws nothing from the training's stream
                self.dataset.subset(index), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                generator=torch.Generator(),
            )
            batches = (x for x, _ in loader)
        for x in batches:
            yield self.normalize(to_unit(x.to(device, non_blocking=True)))
