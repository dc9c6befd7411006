"""A generated multi-label dataset for the tests: coloured shapes, 1-3 of 5 per image, as a path,labels CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# each shape has its own colour: a random-init test backbone sees colour at once, shape only with training
SHAPES = {"circle": (230, 40, 40), "square": (40, 200, 40), "triangle": (40, 80, 240),
          "cross": (240, 220, 30), "bar": (220, 40, 220)}


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    colour = SHAPES[shape]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == "cross":
        w = max(2, (x1 - x0) // 4)
        draw.rectangle((x0, (y0 + y1) // 2 - w, x1, (y0 + y1) // 2 + w), fill=colour)
        draw.rectangle(((x0 + x1) // 2 - w, y0, (x0 + x1) // 2 + w, y1), fill=colour)
    else:
        draw.rectangle((x0, (y0 + y1) // 2 - 3, x1, (y0 + y1) // 2 + 3), fill=colour)


def make_shapes_csv(root: Path, n: int = 120, size: int = 40, seed: int = 0, sep: str = ";",
                    split_column: bool = False, name: str = "labels.csv") -> Path:
    """`n` images under root/images, each holding 1-3 distinct shapes in the cells of a 2x2 grid; a CSV
    root/`name` lists them (path,labels[,split]: 60/20/20 % train/val/test when `split_column`)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = list(SHAPES)
    rows = []
    half = size // 2
    for i in range(n):
        k = int(rng.integers(1, 4))
        chosen = sorted(rng.choice(len(names), size=k, replace=False).tolist())
        cells = rng.permutation(4)[:k]
        background = tuple(int(v) for v in rng.integers(0, 60, size=3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        for shape, cell in zip(chosen, cells):
            cx, cy = (cell % 2) * half, (cell // 2) * half
            pad = int(rng.integers(1, 4))
            _draw(draw, names[shape], (cx + pad, cy + pad, cx + half - pad, cy + half - pad))
        path = root / "images" / f"{i:04d}.png"
        image.save(path)
        row = [f"images/{path.name}", sep.join(names[s] for s in chosen)]
        if split_column:
            row.append("train" if i % 5 < 3 else ("val" if i % 5 == 3 else "test"))
        rows.append(row)
    csv_path = root / name
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "labels", *(["split"] if split_column else [])])
        writer.writerows(rows)
    return csv_path
