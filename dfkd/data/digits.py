"""A built-in digits dataset: the ten digits rendered from fonts that ship with the dependencies.

The quickstart needs a dataset that works offline, is built in seconds and
whose classes a person can name from a grid of images. This one renders the
digits 0-9 in white on black, like MNIST, from the fonts that come with the
project's dependencies: matplotlib's DejaVu Sans, Sans Mono and Serif in their
regular, bold and oblique (italic) styles, and Pillow's built-in scalable
font. Every glyph is drawn once per font and stroke width (a template), and
each image is one template under its own random

- affine map: rotation (±15°), scale (0.75 to 1.15), shear (±0.3) and shift (±3 pixels at 28×28);
- blur: a Gaussian of sigma 0 to 1.2 pixels (at 28×28);
- noise: Gaussian pixel noise of std 0 to 0.12;

rendered at twice the side and averaged down, so the strokes are antialiased.
Like torchvision's MNIST here, the images are 28×28 digits served at 32×32
(the LeNet-5 input), so the digit fills about the same part of the frame.

The split is a pure function of ``(num_images, image_size, seed)``; nothing is
written to disk. The train and test splits use different seeds, so they share
fonts but no image.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DIGIT_CLASSES", "DIGIT_FONTS", "render_digits"]

DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
DIGIT_FONTS: tuple[str, ...] = (  # matplotlib's bundled DejaVu faces; "" is Pillow's built-in font
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf", "",
)
_STROKES = (0, 1, 2)  # extra stroke width in template pixels: thin, regular and heavy digits
_TEMPLATE = 64  # side of a glyph template
_BOX = 20 / 28  # the larger side of a digit's box, as a fraction of the frame (MNIST's 20 of 28 pixels)
_GLYPH_PX = 40  # font size of the templates
_ROTATION, _SCALE, _SHEAR, _SHIFT = 15.0, (0.75, 1.15), 0.3, 3 / 28  # shift as a fraction of the side
_BLUR, _NOISE = 1.2 / 28, 0.12  # blur sigma as a fraction of the side; noise std


def _font(name: str):
    from PIL import ImageFont

    if not name:
        return ImageFont.load_default(size=_GLYPH_PX)
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), _GLYPH_PX)


@functools.cache
def _templates() -> tuple[Tensor, Tensor]:
    """``[T, 10, S, S]`` float glyphs in ``[0, 1]``, one row per (font, stroke), each digit centred by its box,
    and ``[T, 10]`` the larger side of each glyph's box as a fraction of the template's side."""
    from PIL import Image, ImageDraw

    rows = []
    for name in DIGIT_FONTS:
        font = _font(name)
        for stroke in _STROKES:
            glyphs = []
            for digit in DIGIT_CLASSES:
                image = Image.new("L", (_TEMPLATE, _TEMPLATE), 0)
                draw = ImageDraw.Draw(image)
                left, top, right, bottom = draw.textbbox((0, 0), digit, font=font, stroke_width=stroke)
                origin = ((_TEMPLATE - (right - left)) / 2 - left, (_TEMPLATE - (bottom - top)) / 2 - top)
                draw.text(origin, digit, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
                glyphs.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(_TEMPLATE, _TEMPLATE))
            rows.append(torch.stack(glyphs))
    templates = torch.stack(rows).float().div_(255)
    ink = templates > 0.5
    rows_inked, cols_inked = ink.any(dim=3), ink.any(dim=2)  # [T, 10, S] each
    positions = torch.arange(_TEMPLATE)

    def extent(mask: Tensor) -> Tensor:
        first = torch.where(mask, positions, _TEMPLATE).amin(dim=-1)
        last = torch.where(mask, positions, -1).amax(dim=-1)
        return (last - first + 1).float()

    return templates, torch.maximum(extent(rows_inked), extent(cols_inked)) / _TEMPLATE


def render_digits(num_images: int, image_size: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``num_images`` digits as uint8 ``[N, 1, image_size, image_size]`` and their labels ``[N]`` (int64).

    The classes are balanced (each appears ``N // 10`` or one more times) and shuffled.
    """
    if num_images < 1 or image_size < 8:
        raise ValueError(f"need at least one image of side 8 or more, got {num_images} of side {image_size}")
    g = torch.Generator().manual_seed(seed)
    templates, box = _templates()
    targets = torch.arange(num_images) % 10
    targets = targets[torch.randperm(num_images, generator=g)]
    style = torch.randint(len(templates), (num_images,), generator=g)
    glyphs = templates[style, targets].unsqueeze(1)  # [N, 1, T, T]

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(num_images, generator=g)

    angle = torch.deg2rad(uniform(-_ROTATION, _ROTATION))
    scale = uniform(*_SCALE)
    shear = uniform(-_SHEAR, _SHEAR)
    shift = uniform(-_SHIFT, _SHIFT), uniform(-_SHIFT, _SHIFT)
    # Output -> template coordinates (affine_grid's convention): the inverse of scale · rotation · shear.
    # At scale 1 the glyph's box fills 20/28 of the frame, as MNIST's size-normalised digits do.
    zoom = box[style, targets] / (_BOX * scale)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(num_images, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = zoom * cos, zoom * (-sin + shear * cos)
    theta[:, 1, 0], theta[:, 1, 1] = zoom * sin, zoom * (cos + shear * sin)
    theta[:, 0, 2], theta[:, 1, 2] = 2 * shift[0], 2 * shift[1]
    side = 2 * image_size  # render at twice the side, then average down: antialiased strokes
    grid = F.affine_grid(theta, [num_images, 1, side, side], align_corners=False)
    images = F.avg_pool2d(F.grid_sample(glyphs, grid, align_corners=False, padding_mode="zeros"), 2)
    sigma = (uniform(0.0, _BLUR) * image_size).clamp_min(1e-3)
    kernel = 2 * math.ceil(3 * _BLUR * image_size) + 1
    images = kornia.filters.gaussian_blur2d(images, (kernel, kernel), torch.stack([sigma, sigma], dim=1))
    images = images + uniform(0.0, _NOISE).view(-1, 1, 1, 1) * torch.randn(images.shape, generator=g)
    return images.clamp_(0, 1).mul_(255).round_().to(torch.uint8), targets
