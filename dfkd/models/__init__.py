"""The model zoo: classifiers by name, for teachers and students alike.

Every entry is a factory ``(num_classes, in_channels=3) -> nn.Module`` mapping
``(B, in_channels, H, W)`` images to ``(B, num_classes)`` logits:

- CIFAR/MNIST networks for 32×32 inputs, with the state-dict layouts of the
  public definitions so that released checkpoints load unchanged: ``resnet18``/
  ``resnet34`` (DAFL/CMI), ``resnet8`` to ``resnet110`` and ``resnet8x4``/
  ``resnet32x4`` (RepDistiller), ``resnet20_a`` to ``resnet110_a`` (He et al.
  option A, akamaster), ``wrn_16_1`` to ``wrn_40_2``, ``vgg8_bn`` to
  ``vgg19_bn``, ``mobilenetv2``, ``mobilenetv2_half``, ``shufflenetv2``,
  ``lenet5`` and ``lenet5_half``;
- torchvision's ImageNet classifiers for 224×224 inputs as ``tv_<name>``.
"""

from __future__ import annotations

from torch import nn

from dfkd.errors import ConfigError
from dfkd.models._registry import MODELS, ModelFactory
from dfkd.models.lenet import LeNet5
from dfkd.models.mobilenetv2 import MobileNetV2
from dfkd.models.resnet import ResNet
from dfkd.models.resnet_a import ResNetA
from dfkd.models.resnet_cifar import ResNetCifar
from dfkd.models.shufflenetv2 import ShuffleNetV2
from dfkd.models.torchvision_models import build_torchvision_model
from dfkd.models.vgg import VGG
from dfkd.models.wrn import WideResNet
from dfkd.registry import close_matches

__all__ = [
    "MODELS",
    "ModelFactory",
    "check_arch",
    "create_model",
    "list_models",
    "penultimate_module",
    "LeNet5",
    "MobileNetV2",
    "ResNet",
    "ResNetA",
    "ResNetCifar",
    "ShuffleNetV2",
    "VGG",
    "WideResNet",
    "build_torchvision_model",
]


def create_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build the registered model ``name`` with freshly initialised weights.

    Raises:
        RegistryError: If ``name`` is unknown; the message lists the close matches.
        ConfigError: If ``num_classes`` or ``in_channels`` is not positive, or
            the model cannot take ``in_channels``.
    """
    factory = MODELS.get(name)
    if num_classes < 1 or in_channels < 1:
        raise ConfigError(
            f"model {name}: num_classes and in_channels must be positive, got {num_classes} and {in_channels}"
        )
    return factory(num_classes=num_classes, in_channels=in_channels)


def list_models() -> list[str]:
    """Every registered name, sorted, the ``tv_`` models included."""
    return MODELS.names()


def check_arch(arch: str, role: str) -> None:
    """Check a recipe's ``<role>.arch`` (``student`` or ``teacher``) against the zoo.

    Raises:
        ConfigError: the zoo has no ``arch``; the message names the close matches.
    """
    names = list_models()
    if arch not in names:
        close = close_matches(arch, names)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"{role}.arch: the model zoo has no {arch!r}.{hint} See `dfkd list models`.")


def penultimate_module(model: nn.Module) -> nn.Module:
    """The module whose input is the network's penultimate feature ``(B, D)``.

    A forward hook on it sees that feature as its input, e.g. for DAFL's
    activation loss. Zoo models name it in the class attribute ``head``; for
    other models (torchvision's) it is the last ``nn.Linear`` in
    ``model.modules()`` order.

    Raises:
        ConfigError: If the model has neither a ``head`` nor any ``nn.Linear``.
    """
    head = getattr(type(model), "head", None)
    if isinstance(head, str):
        return model.get_submodule(head)
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ConfigError(
            f"{type(model).__name__} has no nn.Linear layer, so its penultimate feature is unknown; "
            "give the class a `head` attribute naming the module whose input is that feature"
        )
    return linears[-1]
