"""Where f_K's learnable queries look in an image (`python owl.py ... --show-attention OUT.png`): the attention
weights of the abstractor's last layer over f_V's patches, drawn as heat maps over the image on a PNG sheet. Only
inference code is imported here (the tests check the maps against softmax(q k^T / sqrt(d)) written out by hand)."""
from typing import List

import numpy as np
import torch
import torch.nn.functional as F

from owl import UserError
from vit import ImageTransform

PANEL, CAPTION, COLUMNS = 224, 16, 3  # pixels of a panel's picture and of its caption strip; panels per row
SINGLE_QUERIES = 4  # single queries with a panel of their own, evenly spaced over all queries


def attention_maps(model, pixels: torch.Tensor) -> tuple:
    """Where the abstractor's queries look in the first image of pixels (N, 3, S, S), for an owl.Owl model: the
    attention weights of f_K's LAST layer over the image's patches, averaged over that layer's heads, as (grid, grid)
    maps. That attention's keys are the queries themselves, then f_V's CLS token, then the patches in row-major
    order; only the patches are kept, so a map sums to the share of attention the patches get, not to 1. Returns the
    maps, the mean over all queries first and then SINGLE_QUERIES single queries, (1 + SINGLE_QUERIES, grid, grid),
    and their labels."""
    Q, grid = model.cfg.abstractor.num_queries, model.cfg.vision.image_size // model.cfg.vision.patch_size
    with torch.no_grad():
        _, weights = model.encode_images(pixels[:1], return_weights=True)
    w = weights[-1][0].float().mean(0)  # (Q, Q + 1 + grid * grid), averaged over the heads
    patches = w[:, Q + 1:].reshape(Q, grid, grid).cpu()
    queries = sorted(set(torch.linspace(0, Q - 1, SINGLE_QUERIES).round().long().tolist()))
    maps = torch.cat([patches.mean(0, keepdim=True), patches[queries]])  # (1 + SINGLE_QUERIES, grid, grid)
    return maps, ["all queries"] + [f"query {j}" for j in queries]


def heat_overlay(picture, amap: torch.Tensor):
    """A (grid, grid) map over a PANEL x PANEL picture: stretched to [0, 1] between its least and its most, one
    square cell per patch, coloured from blue (the least attention) through green to red (the most), and blended
    half and half with the picture."""
    from PIL import Image

    v = (amap.float() - amap.min()) / (amap.max() - amap.min()).clamp(min=1e-12)
    v = F.interpolate(v[None, None], size=(PANEL, PANEL))[0, 0]  # nearest: each patch one cell
    heat = torch.stack([(1.5 - (4 * v - c).abs()).clamp(0, 1) for c in (3, 2, 1)], dim=-1)  # (PANEL, PANEL, RGB)
    blend = 0.5 * torch.from_numpy(np.asarray(picture, dtype=np.float32)) + 0.5 * 255 * heat
    return Image.fromarray(blend.round().byte().numpy())


def draw_attention(pixels: torch.Tensor, transform: ImageTransform, maps: torch.Tensor, labels: List[str]):
    """A sheet of captioned panels, COLUMNS to a row: the first image as f_V sees it (pixels un-normalised), then
    one heat map over it per map."""
    from PIL import Image, ImageDraw

    std, mean = torch.tensor(transform.std)[:, None, None], torch.tensor(transform.mean)[:, None, None]
    rgb = pixels[0].float().cpu() * std + mean  # (3, S, S) in [0, 1]
    picture = Image.fromarray((rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    picture = picture.resize((PANEL, PANEL), Image.BICUBIC)
    panels = [(picture, "image")] + [(heat_overlay(picture, m), label) for m, label in zip(maps, labels)]
    rows = -(-len(panels) // COLUMNS)
    sheet = Image.new("RGB", (COLUMNS * PANEL, rows * (CAPTION + PANEL)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (panel, label) in enumerate(panels):
        x, y = k % COLUMNS * PANEL, k // COLUMNS * (CAPTION + PANEL)
        draw.text((x + 4, y + 2), label, fill="black")
        sheet.paste(panel, (x, y + CAPTION))
    return sheet


def save_attention(model, pixels: torch.Tensor, path: str) -> None:
    """--show-attention: the sheet of the first image of pixels, written to path as a PNG."""
    sheet = draw_attention(pixels, model.image_transform, *attention_maps(model, pixels[:1].to(model.device)))
    try:
        sheet.save(path, format="PNG")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot write {path} ({type(e).__name__})") from None
