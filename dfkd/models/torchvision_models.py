"""torchvision's classification models for 224×224 inputs, registered as ``tv_<name>``.

Every name from ``torchvision.models.list_models(module=torchvision.models)`` is
registered at import as a factory; nothing is built until it is called. Weights
are never downloaded (``weights=None``): load a teacher checkpoint afterwards.
"""

from __future__ import annotations

from typing import Any

import torchvision
from torch import nn

from dfkd.errors import ConfigError
from dfkd.models._registry import register_variants

__all__ = ["PREFIX", "build_torchvision_model"]

PREFIX = "tv_"

# Without these, the training-mode forward returns auxiliary logits in a tuple, and
# construction warns that the default init will change (this pins the current one).
_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def build_torchvision_model(num_classes: int, in_channels: int = 3, *, tv_name: str) -> nn.Module:
    """Build torchvision's ``tv_name`` with random weights and a ``num_classes``-way head.

    Maps ``(B, 3, 224, 224)`` images to ``(B, num_classes)`` logits.

    Raises:
        ConfigError: If ``in_channels`` is not 3.
    """
    if in_channels != 3:
        raise ConfigError(
            f"model {PREFIX}{tv_name}: torchvision models take 3-channel input, "
            f"got in_channels={in_channels}. Use a model from the CIFAR zoo (e.g. resnet18, lenet5), "
            "or a dataset with RGB images."
        )
    extra = _KWARGS.get(tv_name, {})
    return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **extra)


register_variants(
    build_torchvision_model,
    {f"{PREFIX}{name}": {"tv_name": name} for name in torchvision.models.list_models(torchvision.models)},
)
