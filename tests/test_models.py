"""The model zoo: public state-dict layouts, released checkpoints, every name, init, feature hook."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from dfkd.errors import ConfigError
from dfkd.models import create_model, list_models, penultimate_module
from dfkd.models.resnet_base import ZeroPadShortcut
from dfkd.registry import RegistryError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
REFERENCE = SHARED / "reference" / "cifar_model_state_dicts.json"
AKAMASTER = SHARED / "teachers" / "cifar10-akamaster"
DATASET_SUFFIXES = ("_cifar10", "_cifar100", "_mnist")

ZOO_NAMES = [name for name in list_models() if not name.startswith("tv_")]


pytestmark = pytest.mark.usefixtures("one_thread")


def input_channels(name: str) -> int:
    """The zoo's MNIST models are exercised on 1-channel images, the rest on RGB."""
    return 1 if name.startswith("lenet5") else 3


@functools.cache
def reference() -> dict[str, dict[str, Any]]:
    return json.loads(REFERENCE.read_text())


def reference_keys() -> list[Any]:
    if not REFERENCE.is_file():
        reason = f"{REFERENCE} is absent: the shared reference data sits next to the repository"
        return [pytest.param("absent", marks=pytest.mark.skip(reason=reason))]
    return sorted(reference())


@pytest.mark.shared
@pytest.mark.parametrize("key", reference_keys())
def test_matches_public_layout(key: str) -> None:
    entry = reference()[key]
    suffix = next(s for s in DATASET_SUFFIXES if key.endswith(s))
    batch, channels, height, width = entry["input_shape"]
    model = create_model(key.removesuffix(suffix), num_classes=entry["output_shape"][1], in_channels=channels)

    shapes = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    assert sorted(shapes.keys() - entry["state_dict"].keys()) == [], "unexpected keys"
    assert sorted(entry["state_dict"].keys() - shapes.keys()) == [], "missing keys"
    assert shapes == entry["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == entry["params"]
    with torch.no_grad():
        logits = model.eval()(torch.zeros(batch, channels, height, width))
    assert list(logits.shape) == entry["output_shape"]


@pytest.mark.shared
@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_akamaster_checkpoint_loads_unchanged(depth: int) -> None:
    paths = sorted(AKAMASTER.glob(f"resnet{depth}-*.th"))
    if not paths:
        pytest.skip(f"no resnet{depth}-*.th in {AKAMASTER}")
    checkpoint = torch.load(paths[0], map_location="cpu", weights_only=True)
    state = {key.removeprefix("module."): value for key, value in checkpoint["state_dict"].items()}
    model = create_model(f"resnet{depth}_a", num_classes=10)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        logits = model.eval()(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10)
    assert torch.isfinite(logits).all()


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    x = torch.randn(2, 16, 8, 8)
    y = ZeroPadShortcut(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


@pytest.mark.parametrize("depth", [20, 110])
def test_option_a_resnets_have_parameter_free_shortcuts(depth: int) -> None:
    model = create_model(f"resnet{depth}_a", num_classes=10)
    assert not [key for key in model.state_dict() if "shortcut" in key]


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_every_zoo_model_runs(name: str) -> None:
    channels = input_channels(name)
    model = create_model(name, num_classes=10, in_channels=channels)
    with torch.no_grad():
        logits = model(torch.randn(2, channels, 32, 32))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_in_channels_sets_the_stem(name: str) -> None:
    channels = 4 - input_channels(name)
    model = create_model(name, num_classes=10, in_channels=channels)
    stem = next(module for module in model.modules() if isinstance(module, nn.Conv2d))
    assert stem.in_channels == channels


def test_resnet18_runs_on_mnist_sized_input() -> None:
    with torch.no_grad():
        logits = create_model("resnet18", num_classes=10, in_channels=1)(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 10)


def test_torchvision_models_are_all_listed() -> None:
    expected = {f"tv_{name}" for name in torchvision.models.list_models(module=torchvision.models)}
    assert expected == {name for name in list_models() if name.startswith("tv_")}


@pytest.mark.parametrize("name", ["tv_resnet18", "tv_mobilenet_v3_small"])
def test_torchvision_model_runs(name: str) -> None:
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_torchvision_rejects_other_channel_counts() -> None:
    with pytest.raises(ConfigError, match="3-channel input"):
        create_model("tv_resnet18", num_classes=10, in_channels=1)


def test_unknown_name_names_the_registry_and_suggests_the_close_match() -> None:
    with pytest.raises(RegistryError, match="models registry") as info:
        create_model("resnet2O", num_classes=10)
    assert re.search(r"Did you mean [^?]*'resnet20'", str(info.value))


def test_non_positive_sizes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("resnet20", num_classes=0)


@pytest.mark.parametrize(
    ("name", "width"),
    [
        ("resnet18", 512),
        ("resnet20", 64),
        ("resnet8x4", 256),
        ("resnet20_a", 64),
        ("wrn_16_2", 128),
        ("vgg8_bn", 512),
        ("mobilenetv2_half", 1280),
        ("shufflenetv2", 1024),
        ("lenet5", 120),
        ("lenet5_half", 60),
        ("tv_resnet18", 512),
    ],
)
def test_penultimate_module_receives_the_feature(name: str, width: int) -> None:
    channels = input_channels(name)
    size = 64 if name.startswith("tv_") else 32
    model = create_model(name, num_classes=10, in_channels=channels).eval()
    seen: list[torch.Tensor] = []
    penultimate_module(model).register_forward_hook(lambda module, args, output: seen.append(args[0]))
    with torch.no_grad():
        model(torch.randn(2, channels, size, size))
    assert [feature.shape for feature in seen] == [(2, width)]


def test_penultimate_module_falls_back_to_the_last_linear() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    assert penultimate_module(model) is model[3]
    with pytest.raises(ConfigError, match="no nn.Linear"):
        penultimate_module(nn.Sequential(nn.Conv2d(3, 4, 1)))


@pytest.mark.parametrize(
    ("name", "parameter", "std"),
    [
        # RepDistiller: He normal with fan-out = 32·3·3
        ("resnet20", "layer2.0.conv1.weight", math.sqrt(2 / (32 * 9))),
        ("wrn_16_2", "block2.layer.0.conv1.weight", math.sqrt(2 / (64 * 9))),
        ("vgg8_bn", "classifier.weight", 0.01),
        # akamaster: He normal with fan-in = 16·3·3
        ("resnet20_a", "layer2.0.conv1.weight", math.sqrt(2 / (16 * 9))),
        # DAFL/CMI: PyTorch's default, uniform with std 1 / sqrt(3·fan-in)
        ("resnet18", "layer2.0.conv1.weight", 1 / math.sqrt(3 * 64 * 9)),
    ],
)
def test_init_follows_the_reference(name: str, parameter: str, std: float) -> None:
    torch.manual_seed(0)
    weight = create_model(name, num_classes=100).get_parameter(parameter)
    assert weight.std().item() == pytest.approx(std, rel=0.05)
