"""CMI's contrastive term: synthetic samples should be told apart from each other and from the past.

Contrastive Model Inversion (Fang et al., IJCAI 2021) adds an instance
discrimination loss to model inversion. Each image is described by the
teacher's **BN-input features**, ``f(x) [D]``: the per-channel spatial mean of
the input of every BatchNorm2d layer, concatenated (CMI's ``InstanceMeanHook``
on all BN layers). A teacher without BN layers (LeNet-5) is described by the
outputs of its Conv2d layers instead: the tensors a BN layer would normalise.
Two views of the same batch are compared through a projection head ``h``
(``Linear(D, D) - ReLU - Linear(D, head_dim)``, output L2-normalised):

- the **global** view, ``crop(pad 4) + flip``, is the one the synthesizer fed the
  teacher; the term's hooks record its features during that forward;
- the **local** view, ``random resized crop (scale 0.25-1) + flip`` of the images
  in ``[0, 1]``, is made and run through the teacher by the term itself.

With ``q = h(local ⊕ bank_local)`` and ``k = h(global ⊕ bank_global)`` (the
current batch's B rows first, then ``N'`` rows drawn from a memory bank of past
kept batches), the loss is InfoNCE with the matching row as the positive::

    l_i = -log softmax_j(q_i · k_j / tau)[i]       i, j over the B + N' rows
    L   = mean_{i < B} l_i + mean_{i >= B} l_i     (just mean_i l_i while the bank is empty)

exactly as ``datafree/synthesis/contrastive.py`` computes it (``CMISynthesizer.synthesize``):

- the keys ``k`` are detached, so the generator receives gradient only through
  the local view, and the head only through the queries;
- the bank stores raw features, not projections: every iteration re-projects
  its rows with the current head, so the bank rows train the head too;
- the two means are summed, not pooled, "to avoid too small gradients w.r.t. the
  generator" (the code's comment) once the bank outnumbers the batch.

Unlike the reference, the bank is a float16 device buffer (CMI keeps float32 on
the CPU), and the bank mean is taken only when rows were drawn. The reference
samples from ``range(ptr)`` until it has seen *more* than ``bank_size`` rows, so
in the round where the bank becomes exactly full (``ptr`` back at 0) it draws
none while counting the bank as non-empty: the mean over zero rows is NaN, and
that round keeps its first batch.
"""

from __future__ import annotations

from collections.abc import Callable

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generators.buffers import RingBuffer
from generators.divergences import upcast
from generators.terms import TERMS, SynthBatch, _HookedTerm

__all__ = ["Contrastive", "ProjectionHead", "info_nce"]


def info_nce(queries: Tensor, keys: Tensor, n_current: int, temperature: float) -> Tensor:
    """CMI's InfoNCE: row ``i`` of ``keys`` is the positive of query ``i``, every other row a negative.

    Args:
        queries: ``[N, d]`` projections (L2-normalised) that receive the gradient.
        keys: ``[N, d]`` projections of the other view, the same rows in the same order.
        n_current: how many leading rows are the current batch; the rest come from the bank.
        temperature: tau, dividing the cosine similarities.

    Returns:
        The mean loss over the current rows, plus the mean over the bank rows when there are any.
    """
    logits = upcast(queries) @ upcast(keys).T / temperature  # [N, N]
    per_row = F.cross_entropy(logits, torch.arange(len(logits), device=logits.device), reduction="none")  # [N]
    if len(per_row) > n_current:
        return per_row[:n_current].mean() + per_row[n_current:].mean()
    return per_row.mean()


class ProjectionHead(nn.Module):
    """``[N, in_dim] -> [N, out_dim]``: ``Linear - ReLU - Linear``, L2-normalised (CMI's ``MLPHead``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(self.net(features), dim=1)


@TERMS.register("contrastive")
class Contrastive(_HookedTerm):
    """InfoNCE between a local and a global view through a projection head, against a memory bank (CMI).

    The head and the bank are built when the term is attached to a teacher
    (their sizes follow from its BN layers), on the teacher's device. The
    head's parameters are trainable: the inversion synthesizer optimises them
    with every update of the generator. Each round's kept batch adds its
    ``[B, 2D]`` (local, global) features to the bank, through :meth:`keep` and
    :meth:`end_round`.

    Args:
        head_dim: output width of the projection head (256 in CMI's ``datafree_kd.py``).
        bank_size: rows of the memory bank (40960 in CMI).
        n_neg: bank rows drawn as extra rows per iteration, without replacement (4096 in CMI).
        temperature: tau of the InfoNCE logits (0.1, CMI's default and its reproduction script).
    """

    def __init__(
        self, *, head_dim: int = 256, bank_size: int = 40960, n_neg: int = 4096, temperature: float = 0.1
    ) -> None:
        super().__init__()
        if min(head_dim, bank_size) < 1 or n_neg < 0:
            raise ValueError(
                "contrastive needs head_dim and bank_size of at least 1 and n_neg >= 0, "
                f"got {head_dim}, {bank_size} and {n_neg}"
            )
        if temperature <= 0:
            raise ValueError(f"contrastive temperature must be positive, got {temperature}")
        self.head_dim, self.bank_size, self.n_neg, self.temperature = head_dim, bank_size, n_neg, temperature
        self.head: ProjectionHead | None = None
        self.bank: RingBuffer | None = None
        self._teacher: Callable[[Tensor], Tensor] | None = None
        self._local_views: dict[tuple[int, int], nn.Module] = {}  # by image size; kornia modules hold no state
        self._latest: Tensor | None = None  # [B, 2D] features of the last forward
        self._kept: Tensor | None = None  # [B, 2D] features of the round's kept batch so far

    def attach(self, teacher: nn.Module, *, feature_module: nn.Module | None = None) -> None:
        bn_layers = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        # What a BN layer normalises is a conv layer's output; a teacher without BN (LeNet-5) is
        # described by those outputs directly, which is the same feature where both exist.
        layers = bn_layers or [m for m in teacher.modules() if isinstance(m, nn.Conv2d)]
        if not layers:
            raise ValueError("the contrastive term needs a teacher with BatchNorm2d or Conv2d layers, and this teacher has none")
        dim = sum(layer.num_features if bn_layers else layer.out_channels for layer in layers)
        device = next(teacher.parameters()).device
        self.head = ProjectionHead(dim, self.head_dim).to(device)
        self.bank = RingBuffer(self.bank_size, (2 * dim,), torch.float16, device)
        # A bound method, not the module: the teacher must not become a submodule of this term.
        self._teacher = teacher.__call__
        record = self._record_input if bn_layers else self._record_output
        self._handles = [layer.register_forward_hook(record) for layer in layers]

    def close(self) -> None:
        super().close()
        self._teacher = None

    def _record_input(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if self._active:
            self._records.append(upcast(inputs[0]).mean(dim=(2, 3)))  # [B, C_l]

    def _record_output(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if self._active:
            self._records.append(upcast(output).mean(dim=(2, 3)))  # [B, C_l]

    def local_view(self, unit: Tensor) -> Tensor:
        """``[B, C, H, W]`` in ``[0, 1]`` to a random resized crop (25-100% of the area) with a random flip."""
        size = (unit.shape[-2], unit.shape[-1])
        if size not in self._local_views:
            crop = K.RandomResizedCrop(size, scale=(0.25, 1.0))
            self._local_views[size] = nn.Sequential(crop, K.RandomHorizontalFlip())
        return self._local_views[size](unit)

    def loss(self, local: Tensor, global_: Tensor, cached: Tensor) -> Tensor:
        """InfoNCE of the current batch's features against themselves and the bank rows.

        Args:
            local: ``[B, D]`` local-view features (differentiable).
            global_: ``[B, D]`` global-view features (their projections are detached).
            cached: ``[N', 2D]`` bank rows, each ``local ⊕ global``; ``N'`` may be 0.
        """
        if self.head is None:
            raise RuntimeError("the contrastive term has no projection head yet: attach it to a teacher first")
        cached_local, cached_global = cached.to(local.dtype).chunk(2, dim=1)
        queries = self.head(torch.cat([local, cached_local]))
        with torch.no_grad():
            keys = self.head(torch.cat([global_, cached_global]))
        return info_nce(queries, keys, len(local), self.temperature)

    def negatives(self) -> Tensor:
        """``[min(n_neg, len(bank)), 2D]`` bank rows drawn uniformly without replacement."""
        stored = self.bank.stored()
        return stored[torch.randperm(len(stored), device=stored.device)[: self.n_neg]]

    def forward(self, batch: SynthBatch) -> Tensor:
        if batch.unit is None or batch.normalize is None:
            raise ValueError("the contrastive term needs the batch in [0, 1] and the normalisation (SynthBatch.unit)")
        if self._teacher is None:
            raise RuntimeError("the contrastive term is not attached to a teacher")
        global_ = torch.cat(self._take(), dim=1)  # [B, D], recorded during the synthesizer's teacher forward
        with self.capturing():
            self._teacher(batch.normalize(self.local_view(batch.unit)))
        local = torch.cat(self._take(), dim=1)  # [B, D]
        self._latest = torch.cat([local, global_], dim=1).detach()
        return self.loss(local, global_, self.negatives())

    def keep(self, improved: Tensor) -> None:
        if self._latest is None:
            return
        self._kept = self._latest if self._kept is None else torch.where(improved, self._latest, self._kept)

    def end_round(self) -> None:
        if self._kept is not None:
            self.bank.append(self._kept)
        self._kept = self._latest = None

    def extra_repr(self) -> str:
        sizes = f"head_dim={self.head_dim}, bank_size={self.bank_size}, n_neg={self.n_neg}"
        return f"{sizes}, temperature={self.temperature}"
