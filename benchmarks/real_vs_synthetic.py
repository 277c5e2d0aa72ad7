"""A finished data-free run's synthetic images beside real test images of its dataset, as one PNG.

The left panel is the first ``rows × 8`` images of the run's test split, the right panel the top ``rows``
rows of the run's last synthetic grid (``<run>/synthetic.png``, 8 images per row), both at the same
scale, so a reader sees what the generator made next to what the teacher was trained on. The README's
quickstart figure is made this way.

Launch: python benchmarks/real_vs_synthetic.py runs/quickstart docs/results/quickstart/real_vs_synthetic.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms.functional import to_pil_image

from dfkd.data import build_dataset
from dfkd.data.transforms import to_unit
from dfkd.tracking import GRID_PADDING, GRID_PER_ROW, image_grid


def real_grid(run: Path, rows: int) -> Image.Image:
    """The first ``rows × 8`` test images of the run's dataset, in the engine's grid layout."""
    cfg = OmegaConf.load(run / "config.yaml")
    _, test = build_dataset(
        cfg.data.name, cfg.data.root, "test", image_size=cfg.data.get("image_size"),
        num_samples=cfg.data.get("test_samples"), seed=cfg.get("seed", 0),
    )
    if len(test) < rows * GRID_PER_ROW:
        raise SystemExit(f"{run}: the test split has {len(test)} images, fewer than the {rows * GRID_PER_ROW} asked for")
    images = torch.stack([to_unit(test[i][0]) for i in range(rows * GRID_PER_ROW)])
    return to_pil_image(image_grid(images))


def synthetic_rows(run: Path, rows: int, side: int) -> Image.Image:
    """The top ``rows`` rows of the run's last synthetic grid, whose cells are ``side`` pixels."""
    grid = Image.open(run / "synthetic.png").convert("RGB")
    return grid.crop((0, 0, grid.width, GRID_PADDING + rows * (side + GRID_PADDING)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run folder with config.yaml and synthetic.png")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--rows", type=int, default=4, help="rows of 8 images in each panel (default 4)")
    parser.add_argument("--scale", type=int, default=2, help="pixel zoom of the figure (default 2)")
    args = parser.parse_args(argv)

    real = real_grid(args.run, args.rows)
    side = (real.width - GRID_PADDING) // GRID_PER_ROW - GRID_PADDING
    synthetic = synthetic_rows(args.run, args.rows, side)
    gap = 4 * GRID_PADDING * 4
    figure = Image.new("RGB", (real.width + gap + synthetic.width, max(real.height, synthetic.height)), "white")
    figure.paste(real, (0, 0))
    figure.paste(synthetic, (real.width + gap, 0))
    figure = figure.resize((figure.width * args.scale, figure.height * args.scale), Image.NEAREST)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.out)
    print(f"wrote {args.out}: left, real test images of {args.run}'s dataset; right, its synthetic images")


if __name__ == "__main__":
    main()
