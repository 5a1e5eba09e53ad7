"""Held-out questions on images drawn by other code than synthetic.py: numpy masks instead of PIL's drawing, pure
saturated colours, isosceles triangles, other canvas sizes and placements. It checks that the tiny Owl learned
colours, shapes, counts and positions, not synthetic.py's way of drawing them. Shapes sit anywhere (corners, centre,
between), at sizes of their own; a shape's place is named by the thirds of the width and height its centre is in
("top left", "top", ..., "center", ..., "bottom right"), and no centre lies within 4% of a third's edge.

    python tests/foreign_heldout.py --out data/foreign
    python tiny.py score --checkpoint runs/owl-tiny/stage2 --heldout data/foreign/heldout.jsonl
"""
import argparse
import json
import os
import random

import numpy as np
from PIL import Image

COLORS = {"red": (255, 0, 0), "green": (0, 170, 0), "blue": (0, 0, 255), "yellow": (255, 215, 0)}
ROWS, COLUMNS = ("top", "", "bottom"), ("left", "", "right")
QUESTIONS = {"color": "What color is the shape?", "shape": "What shape is it?", "count": "How many shapes are there?",
             "position": "Where is the {color} {shape}?", "describe": "Describe the image."}


def mask(shape, w, h, cx, cy, r):
    y, x = np.mgrid[0:h, 0:w]
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        return (abs(x - cx) <= r * 0.85) & (abs(y - cy) <= r * 0.85)
    # isosceles triangle, apex up: inside when below the two slanted edges and above the base
    top, base = cy - r, cy + r * 0.8
    half_width = (y - top) / (base - top) * r
    return (y >= top) & (y <= base) & (abs(x - cx) <= half_width)


def place_name(fx, fy):
    words = [ROWS[int(fy * 3)], COLUMNS[int(fx * 3)]]
    return " ".join(w for w in words if w) or "center"


def clear_of_edges(f):
    return all(abs(f - edge) > 0.04 for edge in (1 / 3, 2 / 3))


def scene_image(rng):
    w, h = rng.choice([(100, 100), (160, 120), (200, 200), (240, 180), (300, 300), (128, 160)])
    n = rng.randint(1, 4)
    pairs = rng.sample([(c, s) for c in COLORS for s in ("circle", "square", "triangle")], n)
    bg = rng.choice([(255, 255, 255), (245, 245, 245), (250, 245, 235), (235, 240, 250)])
    img = np.zeros((h, w, 3), dtype=np.uint8) + np.array(bg, dtype=np.uint8)
    shapes, placed = [], []
    for color, shape in pairs:
        while True:  # rejection sampling: anywhere, apart from the others, its place clear and its own
            r = min(w, h) * (rng.uniform(0.08, 0.22) if n == 1 else rng.uniform(0.07, 0.13))
            cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
            spot = place_name(cx / w, cy / h)
            if (clear_of_edges(cx / w) and clear_of_edges(cy / h) and spot not in {s["position"] for s in shapes}
                    and all(max(abs(cx - x), abs(cy - y)) > r + q + 2 for x, y, q in placed)):
                break
        img[mask(shape, w, h, cx, cy, r)] = COLORS[color]
        placed.append((cx, cy, r))
        shapes.append({"color": color, "shape": shape, "position": spot})
    return Image.fromarray(img), shapes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for images/ and heldout.jsonl")
    p.add_argument("--n", type=int, default=500, help="number of questions (balanced over the five kinds)")
    p.add_argument("--seed", type=int, default=2024, help="random seed")
    args = p.parse_args()
    rng = random.Random(args.seed)
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    rows = []
    for i in range(args.n):
        kind = ("color", "shape", "count", "position", "describe")[i % 5]
        while True:
            img, shapes = scene_image(rng)
            if kind not in ("color", "shape") or len(shapes) == 1:
                break
        name = f"images/f_{i:05d}.png"
        img.save(os.path.join(args.out, name))
        target = {"count": len(shapes), "shapes": shapes}
        if kind in ("color", "shape"):
            target.update(color=shapes[0]["color"], shape=shapes[0]["shape"])
        if kind == "position":
            s = rng.choice(shapes)
            target.update(color=s["color"], shape=s["shape"], position=s["position"])
        question = QUESTIONS[kind].format(color=target.get("color"), shape=target.get("shape"))
        rows.append({"image": [name], "question": question, "kind": kind, "target": target})
    with open(os.path.join(args.out, "heldout.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {len(rows)} questions to {args.out}")


if __name__ == "__main__":
    main()
