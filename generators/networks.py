"""Generator networks: latent codes ``z: [B, nz]`` to images ``[B, C, S, S]``.

Every generator of the DFKD reference code bases is the same upsampling
network with different widths and a different output layer::

    z ─ Linear(nz, w0·(S/2^k)²) ─ reshape [B, w0, S/2^k, S/2^k] ─ BN(w0)
      ─ k × [Upsample×2 ─ Conv3×3(w_{i-1} → w_i) ─ BN(w_i) ─ LeakyReLU(0.2)]
      ─ Conv3×3(w_k → C) ─ output layer

- ``dcgan``: CMI's ``Generator``; widths ``2ngf, 2ngf, ngf``; sigmoid; DCGAN init.
- ``cudfkd``: CuDFKD's ``DCGAN_Generator_CIFAR10``; widths ``ngf·2^d, …, 2ngf, ngf``;
  sigmoid; DCGAN init.
- ``large``: the CuDFKD code base's ``LargeGenerator``; widths ``4ngf, 2ngf, ngf``;
  sigmoid; PyTorch's default init.
- ``dafl``: DAFL's ``Generator``; widths ``w, w, w/2``; tanh, then an affine-free
  batch norm; PyTorch's default init.

The hidden convolutions have no bias, except in DAFL, whose inner batch norms
also carry that code's ``eps=0.8`` (see :class:`DAFLGenerator`). Upsampling is
nearest-neighbour everywhere, as in the references.

A generator built with ``conditional=True`` is class-conditional: it also takes
class labels ``y: [B]`` and reads ``[z, one_hot(y)]``, so ``Linear(nz + K, …)``
for the ``K`` classes of the dataset (the conditional DCGAN's input, as the
conditional generators of CGDD and of the CuDFKD code's unused ``cond`` option
intend). The synthesizer asks each image for a class, so every class is made
from the first step instead of being discovered by the generator.

Each registered class is built as ``cls(*, image_size, channels, num_classes, **options)``
(``num_classes`` is the dataset's, used only when ``conditional``);
its options are keyword-only, annotated and defaulted, so the engine can check
a recipe against the constructor. ``output_range`` tells the engine what the
images mean: ``"unit"`` images lie in ``[0, 1]`` and still need the dataset's
normalisation, ``"normalized"`` images are already normalised and are fed to
the networks as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import Any, ClassVar, Literal

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from generators.registry import Registry

__all__ = [
    "GENERATORS",
    "CuDFKDGenerator",
    "DAFLGenerator",
    "DCGANGenerator",
    "LargeGenerator",
    "OutputRange",
    "UpsamplingGenerator",
    "reset_parameters_dcgan",
]

GENERATORS: Registry[type[UpsamplingGenerator]] = Registry("generators")

OutputRange = Literal["unit", "normalized"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def reset_parameters_dcgan(module: nn.Module) -> None:
    """Re-initialise ``module`` in place as the DCGAN paper, CMI and CuDFKD do for their generators.

    Weights of (transposed) convolutions and linear layers are drawn from
    N(0, 0.02²) and their biases zeroed; affine batch-norm scales are drawn from
    N(1, 0.02²) and their shifts zeroed. Batch norms without affine parameters,
    and every other module, are left as they are.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _BATCH_NORMS) and m.affine:
            nn.init.normal_(m.weight, mean=1.0, std=0.02)
            nn.init.zeros_(m.bias)


def _upsampling_stage(in_channels: int, out_channels: int, *, conv_bias: bool, bn_eps: float) -> nn.Sequential:
    """``[B, in_channels, H, W] -> [B, out_channels, 2H, 2W]``: upsample, 3×3 conv, batch norm, LeakyReLU(0.2)."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=conv_bias),
        nn.BatchNorm2d(out_channels, eps=bn_eps),
        nn.LeakyReLU(0.2),
    )


class UpsamplingGenerator(nn.Module):
    """The shared body: a linear projection, then one ×2 upsampling stage per width after the first.

    Subclasses fix the widths, the output layer and the initialisation, and
    expose the recipe options in their own keyword-only constructors.

    Args:
        image_size: Side ``S`` of the square output; a multiple of ``2^k`` for ``k`` stages.
        channels: Channels ``C`` of the output.
        nz: Size of the latent code.
        widths: ``w0, …, wk``: channels of the projected map, then of each stage's output.
        output: Layer applied after the final ``w_k → C`` convolution.
        conv_bias: Whether the hidden convolutions have a bias (the final one always has).
        bn_eps: ``eps`` of the stages' batch norms (the first one keeps PyTorch's default).
        num_classes: ``K`` classes to condition on (``forward(z, y)``); 0 for an unconditional generator.

    Raises:
        ValueError: if ``image_size`` is not a positive multiple of ``2^k``, or a size is not positive.
    """

    output_range: ClassVar[OutputRange]

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Raise a ``ValueError`` naming the first size option below 1 (``nz``, ``ngf``, ``width``, ``depth``)."""
        for key in ("nz", "ngf", "width", "depth"):
            if key in options and options[key] < 1:
                raise ValueError(f"{key} must be at least 1, got {options[key]}")

    def __init__(
        self,
        *,
        image_size: int,
        channels: int,
        nz: int,
        widths: Sequence[int],
        output: nn.Module,
        conv_bias: bool = False,
        bn_eps: float = 1e-5,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        scale = 2 ** (len(widths) - 1)
        if image_size <= 0 or image_size % scale:
            raise ValueError(
                f"{name} upsamples {scale}× from a square seed, so image_size must be a positive multiple "
                f"of {scale}; got {image_size}"
            )
        for option, value in (("channels", channels), ("nz", nz), ("smallest width", min(widths))):
            if value <= 0:
                raise ValueError(f"{name}: {option} must be positive, got {value}")
        if num_classes == 1 or num_classes < 0:
            raise ValueError(f"{name}: a conditional generator needs at least 2 classes, got {num_classes}")
        self.nz = nz
        self.num_classes = num_classes
        self.image_size = image_size
        self.channels = channels
        self.seed_size = image_size // scale
        self.project = nn.Linear(nz + num_classes, widths[0] * self.seed_size**2)
        self.stages = nn.Sequential(
            nn.BatchNorm2d(widths[0]),
            *(
                _upsampling_stage(c_in, c_out, conv_bias=conv_bias, bn_eps=bn_eps)
                for c_in, c_out in pairwise(widths)
            ),
        )
        self.to_image = nn.Conv2d(widths[-1], channels, kernel_size=3, padding=1)
        self.output = output

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """Map ``z: [B, nz]`` (and, for a conditional generator, labels ``y: [B]``) to images ``[B, C, S, S]``."""
        if self.conditional:
            if y is None:
                raise ValueError(f"{type(self).__name__} is conditional: give the class labels y with z")
            z = torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], dim=1)
        elif y is not None:
            raise ValueError(f"{type(self).__name__} is not conditional: it takes no class labels")
        seed = rearrange(self.project(z), "b (c h w) -> b c h w", h=self.seed_size, w=self.seed_size)
        return self.output(self.to_image(self.stages(seed)))

    def extra_repr(self) -> str:
        sizes = f"nz={self.nz}, image_size={self.image_size}, channels={self.channels}"
        condition = f", num_classes={self.num_classes}" if self.conditional else ""
        return f"{sizes}{condition}, output_range={self.output_range!r}"


def _condition_on(conditional: bool, num_classes: int) -> int:
    """The class count a generator conditions on: the dataset's when ``conditional``, else 0."""
    if conditional and num_classes < 2:
        raise ValueError(f"conditional: true needs the dataset's class count (at least 2), got num_classes={num_classes}")
    return num_classes if conditional else 0


@GENERATORS.register("dcgan")
class DCGANGenerator(UpsamplingGenerator):
    """CMI's ``Generator`` (zju-vipa/CMI ``datafree/models/generator.py``), the default DCGAN-style generator.

    Widths ``2ngf, 2ngf, ngf`` over two ×2 stages, sigmoid output. CMI uses it
    with ``nz=256, ngf=64`` for CMI and for its ZSKT, DFAD, DFQ and DAFL
    baselines (``nz=512`` for DAFL). CMI's synthesizer re-applies
    :func:`reset_parameters_dcgan` before every synthesis round; here the
    constructor applies it once, and a synthesizer that re-initialises per
    round calls it again.

    Args:
        image_size: Output side, a multiple of 4.
        channels: Output channels.
        nz: Latent size.
        ngf: Base width.
        conditional: Condition on the dataset's ``num_classes`` classes (see the module's docstring).
        num_classes: The dataset's class count, given by the engine.
    """

    output_range = "unit"

    def __init__(
        self, *, image_size: int, channels: int, nz: int = 256, ngf: int = 64, conditional: bool = False,
        num_classes: int = 0,
    ) -> None:
        super().__init__(
            image_size=image_size, channels=channels, nz=nz, widths=(2 * ngf, 2 * ngf, ngf), output=nn.Sigmoid(),
            num_classes=_condition_on(conditional, num_classes),
        )
        reset_parameters_dcgan(self)


@GENERATORS.register("cudfkd")
class CuDFKDGenerator(UpsamplingGenerator):
    """CuDFKD's ``DCGAN_Generator_CIFAR10`` (ljrprocc/DataFree ``datafree/models/generator.py``).

    ``depth`` ×2 stages halving the width from ``ngf·2^depth`` to ``ngf``,
    sigmoid output, DCGAN initialisation (the CuDFKD synthesizer applies it to
    every generator it is given). The CuDFKD scripts use ``nz=512`` on CIFAR
    (1024 at 64×64), ``ngf=64``, ``depth=2``; at ``depth=2`` the layers are
    exactly those of :class:`LargeGenerator` with ``nz=512``. The reference
    accepts depth 2 or 3 only; any depth ≥ 1 works here.

    Left out, because the default single-level use does not touch them:

    - the multi-level outputs (``forward(z, l>0)``), which return an
      intermediate feature map through ``trans_convs``; at the commit the
      scripts use, ``trans_convs`` is commented out, so ``l > 0`` raises there;
    - ``type`` (``normal``/``tiny``/``wider``) and ``widen_factor``: they only
      choose the widths of those commented-out ``trans_convs``, so they change
      nothing in the image generator, WRN teachers included;
    - ``cond``/``n_emb``: the class embedding is built but never used in ``forward``.

    Args:
        image_size: Output side, a multiple of ``2^depth``.
        channels: Output channels.
        nz: Latent size.
        ngf: Width of the last stage.
        depth: Number of ×2 upsampling stages.
        conditional, num_classes: as for :class:`DCGANGenerator`.
    """

    output_range = "unit"

    def __init__(
        self, *, image_size: int, channels: int, nz: int = 512, ngf: int = 64, depth: int = 2,
        conditional: bool = False, num_classes: int = 0,
    ) -> None:
        if depth < 1:
            raise ValueError(f"CuDFKDGenerator: depth must be at least 1, got {depth}")
        widths = tuple(ngf * 2**level for level in range(depth, -1, -1))
        super().__init__(
            image_size=image_size, channels=channels, nz=nz, widths=widths, output=nn.Sigmoid(),
            num_classes=_condition_on(conditional, num_classes),
        )
        reset_parameters_dcgan(self)


@GENERATORS.register("large")
class LargeGenerator(UpsamplingGenerator):
    """The CuDFKD code base's ``LargeGenerator`` (ljrprocc/DataFree), used there for ZSKT, DFAD, DFQ and DAFL.

    Widths ``4ngf, 2ngf, ngf`` over two ×2 stages, sigmoid output: CMI's
    generator with a twice-as-wide projection. That code builds it with
    ``nz=256, ngf=64`` (``nz=512`` for DAFL) and keeps PyTorch's default
    initialisation, as here. Its arguments are :class:`DCGANGenerator`'s.
    """

    output_range = "unit"

    def __init__(
        self, *, image_size: int, channels: int, nz: int = 256, ngf: int = 64, conditional: bool = False,
        num_classes: int = 0,
    ) -> None:
        super().__init__(
            image_size=image_size, channels=channels, nz=nz, widths=(4 * ngf, 2 * ngf, ngf), output=nn.Sigmoid(),
            num_classes=_condition_on(conditional, num_classes),
        )


@GENERATORS.register("dafl")
class DAFLGenerator(UpsamplingGenerator):
    """DAFL's ``Generator`` (``DAFL_train.py`` of the DAFL code): its images are already normalised.

    Widths ``width, width, width/2`` (128, 128, 64 in the paper) over two ×2
    stages; the hidden convolutions have biases, and the output is
    ``Tanh`` followed by an affine-free ``BatchNorm2d(channels)``, so in train
    mode every channel of a batch has mean 0 and variance 1. In eval mode that
    batch norm uses its running statistics instead; the DAFL code never puts
    the generator in eval mode. PyTorch's default initialisation, as in DAFL.

    The reference writes ``nn.BatchNorm2d(128, 0.8)`` for the stages' batch
    norms. The second positional argument of ``BatchNorm2d`` is ``eps``, not
    ``momentum``, so those layers use ``eps=0.8``: a known quirk inherited from
    PyTorch-GAN, kept here because every published DAFL number was trained
    with it.

    Args:
        image_size: Output side, a multiple of 4.
        channels: Output channels.
        nz: Latent size (DAFL's ``latent_dim``).
        width: Width of the projected map and of the first stage; the second has ``width / 2``.
        conditional, num_classes: as for :class:`DCGANGenerator`.
    """

    output_range = "normalized"

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        if "width" in options and (options["width"] < 2 or options["width"] % 2):
            raise ValueError(f"width must be even and at least 2 (the second stage has width / 2), got {options['width']}")
        super().check_options(options)

    def __init__(
        self, *, image_size: int, channels: int, nz: int = 100, width: int = 128, conditional: bool = False,
        num_classes: int = 0,
    ) -> None:
        self.check_options({"width": width})
        super().__init__(
            image_size=image_size,
            channels=channels,
            nz=nz,
            widths=(width, width, width // 2),
            output=nn.Sequential(nn.Tanh(), nn.BatchNorm2d(channels, affine=False)),
            conv_bias=True,
            bn_eps=0.8,
            num_classes=_condition_on(conditional, num_classes),
        )
