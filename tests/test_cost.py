"""Multiply-adds per image, against counts worked out by hand from the layer shapes."""

from __future__ import annotations

import pytest
import torch

from dfkd.cost import multiply_adds
from dfkd.models import create_model
from generators.networks import DAFLGenerator


def test_lenet5_costs_what_its_layers_add_up_to():
    conv1 = 6 * 28 * 28 * (1 * 5 * 5)  # 32x32 input, 5x5 kernels, no padding
    conv2 = 16 * 10 * 10 * (6 * 5 * 5)  # after 2x2 pooling
    fully_connected = 400 * 120 + 120 * 84 + 84 * 10
    assert multiply_adds(create_model("lenet5", num_classes=10, in_channels=1), (1, 32, 32)) == conv1 + conv2 + fully_connected


@pytest.mark.parametrize("width", [16, 128])
def test_the_dafl_generator_costs_its_projection_and_three_convolutions(width):
    project = 100 * width * 8 * 8  # nz 100 to a width x 8 x 8 seed
    stage1 = width * 16 * 16 * (width * 3 * 3)
    stage2 = (width // 2) * 32 * 32 * (width * 3 * 3)
    to_image = 1 * 32 * 32 * ((width // 2) * 3 * 3)
    generator = DAFLGenerator(image_size=32, channels=1, nz=100, width=width).train()
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    assert multiply_adds(generator, (100,)) == project + stage1 + stage2 + to_image
    assert generator.training, "the mode is restored"
    assert all(torch.equal(v, before[k]) for k, v in generator.state_dict().items()), "no statistic moved"
