"""One generator across processes: its replicas start equal and take the same steps.

Under data parallelism every process synthesises its own shard of the batch,
but there is one generator (and one CMI projection head). As DDP does for the
student, every process averages the gradients of the shared parameters before
each update, so replicas that start from the same weights stay the same; the
floating-point buffers (a generator's BatchNorm running statistics) are
averaged with them, in the same single collective, so eval-mode samples agree
across processes too. What belongs to one process's shard (DeepInversion's
pixels, CMI's latent codes, the pool and the memory bank) is never synchronised.

Batch-level terms (``bn``, ``balance``, ``act``) are computed over each
process's shard, as DDP without SyncBatchNorm computes the student's batch
statistics: keep the per-process synthesis batch large enough for them to be
meaningful.

These functions use ``torch.distributed`` directly and do nothing in a single
process, so the synthesizers stay usable without any launcher.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["world_size", "broadcast_module", "average_gradients", "mean_over_processes"]


def world_size() -> int:
    """The number of processes in the default group, 1 when not distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _float_buffers(modules: Iterable[nn.Module]) -> list[Tensor]:
    return [b for m in modules for b in m.buffers() if b.is_floating_point()]


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Give every process ``src``'s parameters and buffers (replicas initialised from different seeds)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src)


def average_gradients(parameters: Iterable[Tensor], modules: Iterable[nn.Module] = ()) -> None:
    """Average the gradients of ``parameters`` and the float buffers of ``modules`` over processes, in place.

    One flat all-reduce per call. Parameters without a gradient are skipped;
    every process must skip the same ones, which holds because all of them
    compute the same terms with the same weights.
    """
    if world_size() == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    tensors = grads + _float_buffers(modules)
    if not tensors:
        return
    with torch.no_grad():
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        flat /= world_size()
        for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            tensor.copy_(part.view_as(tensor))


def mean_over_processes(value: Tensor) -> float:
    """The mean of a scalar over processes, as a number every process agrees on."""
    if world_size() == 1:
        return float(value)
    total = value.detach().float().reshape(1).clone()
    dist.all_reduce(total)
    return float(total) / world_size()
