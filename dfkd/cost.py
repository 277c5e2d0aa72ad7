"""What one image costs: the multiply-adds of a network's forward pass.

A data-free run pays the generator's forward and backward for every synthetic
image, the teacher's forward (and, for the adversarial and BN terms, its
backward), and the student's step. Their multiply-adds per image say at a glance
where a run's time goes (DESIGN.md section 10): on MNIST, DAFL's generator at
width 128 costs about 270 times the LeNet-5 teacher.

Counted with :class:`torch.utils.flop_counter.FlopCounterMode` on a forward of two
images in eval mode (the batch norms then use their running statistics, which
cost what batch statistics cost), halved once for multiply-adds and once for the
two images. Convolutions, linear layers and matrix products are counted;
elementwise operations, which are memory-bound, are not.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["multiply_adds"]


@torch.no_grad()
def multiply_adds(
    module: nn.Module, input_shape: tuple[int, ...], device: torch.device | str = "cpu", *, labelled: bool = False
) -> int:
    """Multiply-adds of ``module`` per input of shape ``input_shape`` (without the batch axis).

    ``labelled``: the module also takes a class label per input (a conditional
    generator's ``forward(z, y)``); class 0 is given. The module's mode is
    restored afterwards and nothing it holds changes.
    """
    was_training = module.training
    module.eval()
    inputs = [torch.zeros(2, *input_shape, device=device)]
    if labelled:
        inputs.append(torch.zeros(2, dtype=torch.long, device=device))
    try:
        with FlopCounterMode(display=False) as counter:
            module(*inputs)
    finally:
        module.train(was_training)
    return counter.get_total_flops() // 4
