"""The generator networks: shapes, output ranges, gradients, reference sizes, init and constructor contract."""

from __future__ import annotations

import inspect
import typing
from typing import Any

import pytest
import torch
from torch import nn

from generators.networks import (
    GENERATORS,
    LargeGenerator,
    OutputRange,
    UpsamplingGenerator,
    reset_parameters_dcgan,
)

# Narrow options so the shape and gradient tests stay fast at 64×64; the
# reference sizes are checked at the defaults below.
SMALL: dict[str, dict[str, Any]] = {
    "dcgan": {"nz": 16, "ngf": 8},
    "cudfkd": {"nz": 16, "ngf": 8},
    "large": {"nz": 16, "ngf": 8},
    "dafl": {"nz": 16, "width": 16},
}

# Parameters at the defaults for 32×32×3, counted by hand from the reference
# definitions (seed 8×8; "conv a→b" is a 3×3 conv, a·b·9 weights; BN(c) has 2c):
#   dcgan  (CMI Generator, nz=256, ngf=64): Linear 256→128·64 (256·8192 + 8192 = 2,105,344)
#          + BN(128) 256 + conv 128→128 147,456 + BN(128) 256 + conv 128→64 73,728 + BN(64) 128
#          + conv 64→3 with bias 1,731 = 2,328,899
#   large  (LargeGenerator, nz=256, ngf=64): Linear 256→256·64 (4,210,688) + BN(256) 512
#          + conv 256→128 294,912 + BN(128) 256 + conv 128→64 73,728 + BN(64) 128 + conv 64→3 1,731
#          = 4,581,955
#   cudfkd (DCGAN_Generator_CIFAR10, nz=512, ngf=64, d=2): Linear 512→256·64 (8,404,992) and then
#          the same layers as large (371,267) = 8,776,259
#   dafl   (DAFL Generator, latent 100): Linear 100→128·64 (827,392) + BN(128) 256
#          + conv 128→128 with bias 147,584 + BN(128) 256 + conv 128→64 with bias 73,792 + BN(64) 128
#          + conv 64→3 with bias 1,731 + affine-free BN(3) 0 = 1,051,139
REFERENCE_PARAMETERS = {"dcgan": 2_328_899, "large": 4_581_955, "cudfkd": 8_776_259, "dafl": 1_051_139}

# Which constructors apply the DCGAN init, as the reference code bases do.
DCGAN_INIT = {"dcgan": True, "cudfkd": True, "large": False, "dafl": False}

NAMES = GENERATORS.names()


pytestmark = pytest.mark.usefixtures("one_thread")


def small(name: str, image_size: int = 32, channels: int = 3) -> UpsamplingGenerator:
    torch.manual_seed(0)
    return GENERATORS.get(name)(image_size=image_size, channels=channels, **SMALL[name])


def test_every_generator_is_tested() -> None:
    assert NAMES == sorted(SMALL) == sorted(REFERENCE_PARAMETERS) == sorted(DCGAN_INIT)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("image_size", [28, 32, 64])
@pytest.mark.parametrize("name", NAMES)
def test_output_shape(name: str, image_size: int, channels: int) -> None:
    generator = small(name, image_size, channels)
    z = torch.randn(4, generator.nz)
    assert generator(z).shape == (4, channels, image_size, image_size)


@pytest.mark.parametrize("name", NAMES)
def test_output_range(name: str) -> None:
    generator = small(name).train()
    x = generator(torch.randn(4, generator.nz))
    assert generator.output_range in typing.get_args(OutputRange)
    if generator.output_range == "unit":
        assert x.min() >= 0 and x.max() <= 1
    else:
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
        torch.testing.assert_close(var, torch.ones_like(var), atol=1e-2, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_every_parameter(name: str) -> None:
    generator = small(name).train()
    x = generator(torch.randn(4, generator.nz))
    # A random projection, not x.sum(): after DAFL's affine-free output BN the sum is constant.
    (x * torch.randn_like(x)).sum().backward()
    for param_name, param in generator.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", NAMES)
def test_reference_parameter_count(name: str) -> None:
    generator = GENERATORS.get(name)(image_size=32, channels=3)
    assert sum(p.numel() for p in generator.parameters()) == REFERENCE_PARAMETERS[name]


def test_cudfkd_at_depth_2_has_the_layers_of_large() -> None:
    cudfkd = GENERATORS.get("cudfkd")(image_size=32, channels=3, nz=512)
    large = LargeGenerator(image_size=32, channels=3, nz=512)
    assert [p.shape for p in cudfkd.parameters()] == [p.shape for p in large.parameters()]


def test_dafl_keeps_the_reference_batch_norm_eps() -> None:
    norms = [m for m in small("dafl").modules() if isinstance(m, nn.BatchNorm2d)]
    assert [m.eps for m in norms] == [1e-5, 0.8, 0.8, 1e-5]
    assert [m.affine for m in norms] == [True, True, True, False]


@pytest.mark.parametrize("name", NAMES)
def test_reference_initialisation(name: str) -> None:
    generator = GENERATORS.get(name)(image_size=32, channels=3)
    convs = [m for m in generator.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d) and m.affine]
    if DCGAN_INIT[name]:
        for conv in convs:
            assert conv.weight.std().item() == pytest.approx(0.02, abs=0.004)
            assert conv.bias is None or not conv.bias.any()
        for norm in norms:
            assert norm.weight.mean().item() == pytest.approx(1.0, abs=0.01)
            assert not norm.bias.any()
    else:  # PyTorch's defaults: batch norms start as the identity
        assert all((norm.weight == 1).all() for norm in norms)


def test_reset_parameters_dcgan_skips_affine_free_norms() -> None:
    generator = small("dafl")
    reset_parameters_dcgan(generator)
    linear = generator.project
    assert linear.weight.std().item() == pytest.approx(0.02, abs=0.004)
    assert not linear.bias.any()


@pytest.mark.parametrize("name", NAMES)
def test_constructor_options_are_keyword_only_and_typed(name: str) -> None:
    cls = GENERATORS.get(name)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    hints = typing.get_type_hints(cls.__init__)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
    assert {p.name for p in params if p.default is inspect.Parameter.empty} == {"image_size", "channels"}
    assert {"conditional", "num_classes"} <= {p.name for p in params}, "every generator can be class-conditional"
    for p in params:
        assert hints[p.name] in (int, float, bool, str), p.name
        assert p.default is inspect.Parameter.empty or isinstance(p.default, hints[p.name]), p.name
    assert cls(image_size=32, channels=3, nz=24, **{k: v for k, v in SMALL[name].items() if k != "nz"}).nz == 24


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("dcgan", {"image_size": 30}),
        ("large", {"image_size": 0}),
        ("dafl", {"image_size": 34}),
        ("cudfkd", {"image_size": 28, "depth": 3}),
        ("cudfkd", {"depth": 0}),
        ("dafl", {"width": 15}),
        ("dcgan", {"channels": 0}),
    ],
)
def test_bad_geometry_raises(name: str, options: dict[str, Any]) -> None:
    kwargs = {"image_size": 32, "channels": 3, **SMALL[name], **options}
    with pytest.raises(ValueError, match="|".join(options)):
        GENERATORS.get(name)(**kwargs)


def test_cudfkd_depth_3_reaches_the_image_size() -> None:
    generator = GENERATORS.get("cudfkd")(image_size=32, channels=3, nz=16, ngf=4, depth=3)
    assert generator(torch.randn(2, 16)).shape == (2, 3, 32, 32)
    assert generator.seed_size == 4


@pytest.mark.parametrize("name", NAMES)
def test_a_conditional_generator_makes_the_class_it_is_given(name: str) -> None:
    torch.manual_seed(0)
    generator = GENERATORS.get(name)(image_size=32, channels=3, conditional=True, num_classes=10, **SMALL[name])
    plain = small(name)
    assert generator.conditional and not plain.conditional
    assert generator.project.in_features == plain.project.in_features + 10, "z and the label's one-hot"
    generator.eval()  # batch statistics would mix the images of a batch
    z = torch.randn(1, generator.nz).expand(3, -1)
    x = generator(z, torch.tensor([0, 0, 7]))
    assert x.shape == (3, 3, 32, 32)
    torch.testing.assert_close(x[0], x[1])
    assert not torch.allclose(x[0], x[2]), "the same z asked for another class gives another image"
    with pytest.raises(ValueError, match="give the class labels y"):
        generator(z)
    with pytest.raises(ValueError, match="not conditional"):
        plain(z, torch.tensor([0, 0, 7]))


@pytest.mark.parametrize("num_classes", [0, 1])
def test_a_conditional_generator_needs_two_classes(num_classes: int) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        GENERATORS.get("dafl")(image_size=32, channels=3, conditional=True, num_classes=num_classes)
    # num_classes is the dataset's and is ignored by an unconditional generator
    assert not GENERATORS.get("dafl")(image_size=32, channels=3, num_classes=num_classes).conditional
