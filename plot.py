"""loss.png, drawn with Pillow after each training run (train.py, tiny.py): every stage's training loss in its colour,
a gap where a step was skipped, the validation points as diamonds, on axes with round ticks and labels."""
import json
import math
from pathlib import Path

# loss.png: each stage's training loss (a gap where a step was skipped) and its validation points, on round ticks
PLOT_SIZE = (720, 420)  # the picture, in pixels
PLOT_BOX = (72, 40, 700, 364)  # the frame (left, top, right, bottom): tick labels left of it and below it
STAGE_COLOURS = [(31, 90, 200), (40, 150, 60), (150, 60, 180), (140, 90, 40)]  # per stage, in order of appearance
VAL_COLOUR = (245, 130, 0)  # a validation point: an orange diamond ringed in its stage's colour


def loss_series(metrics: Path) -> dict:
    """metrics.jsonl read back: {stage: {"train": [(step, loss or None)], "val": [(step, val_loss)]}}, the stages in
    the order they first appear. A skipped step (loss null, or not finite) keeps its place as None."""
    series = {}
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # an empty line, or one cut short
            continue
        s = series.setdefault(row.get("stage") or "training", {"train": [], "val": []})
        kind, value = ("val", row["val_loss"]) if "val_loss" in row else ("train", row.get("loss"))
        value = value if isinstance(value, (int, float)) and math.isfinite(value) else None
        if value is not None or kind == "train":
            s[kind].append((row["step"], value))
    return series


def nice_ticks(lo: float, hi: float, n: int = 5) -> list:
    """About n round values, 1, 2 or 5 times a power of ten apart, from at or below lo to at or above hi."""
    if hi - lo < 1e-9:  # one value: a small range around it
        lo, hi = lo - max(abs(lo) * 0.05, 0.01), hi + max(abs(hi) * 0.05, 0.01)
    raw = (hi - lo) / n
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 10) for i in range(first, last + 1)]


def loss_axes(series: dict, box=PLOT_BOX):
    """The frame's scales: (to_px(step, loss) -> (x, y) pixel, x ticks, y ticks); steps from 0, losses zoomed to
    the values drawn."""
    points = [p for s in series.values() for p in s["train"] + s["val"]]
    losses = [v for _, v in points if v is not None]
    xt, yt = nice_ticks(0, max([step for step, _ in points] + [1])), nice_ticks(min(losses), max(losses))
    left, top, right, bottom = box

    def to_px(step, loss):
        return (left + (step - xt[0]) / (xt[-1] - xt[0]) * (right - left),
                bottom - (loss - yt[0]) / (yt[-1] - yt[0]) * (bottom - top))
    return to_px, xt, yt


def plot_losses(metrics: Path, png: Path) -> None:
    """loss.png from metrics.jsonl, drawn with Pillow (no plotting library at run time): each stage's training loss
    in its own colour, its validation losses as diamonds, steps on x and loss on y with round ticks, a legend."""
    from PIL import Image, ImageDraw

    series = loss_series(metrics)
    if not any(v is not None for s in series.values() for _, v in s["train"] + s["val"]):
        return  # nothing to draw yet
    img = Image.new("RGB", PLOT_SIZE, "white")
    draw, font = ImageDraw.Draw(img), _plot_font(12)
    to_px, xt, yt = loss_axes(series)
    _draw_frame(img, draw, font, to_px, xt, yt)
    for colour, s in zip(_stage_colours(len(series)), series.values()):
        _draw_curve(draw, [to_px(*p) if p[1] is not None else None for p in s["train"]], colour)
        for step, value in s["val"]:
            _draw_diamond(draw, to_px(step, value), colour)
    _draw_legend(draw, font, series)
    title = f"Loss of {', '.join(series)}  ({png.parent.name}/{metrics.name})"
    draw.text((PLOT_SIZE[0] / 2, 12), title, fill="black", font=_plot_font(15), anchor="mt")
    img.save(png)


def _plot_font(size: int):
    """Pillow's own font at that size (Pillow before 10.1 has only its small bitmap font)."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _stage_colours(n: int) -> list:
    return [STAGE_COLOURS[i % len(STAGE_COLOURS)] for i in range(n)]


def _draw_frame(img, draw, font, to_px, xt, yt) -> None:
    """Grid lines at the ticks, the frame, tick numbers left of and below it, and the axis names."""
    from PIL import Image, ImageDraw
    left, top, right, bottom = PLOT_BOX
    for t in xt:
        x = to_px(t, yt[0])[0]
        draw.line([(x, top), (x, bottom + 4)], fill=(225, 225, 225))
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x, bottom + 7), f"{t:g}", fill="black", font=font, anchor="mt")
    for t in yt:
        y = to_px(xt[0], t)[1]
        draw.line([(left - 4, y), (right, y)], fill=(225, 225, 225))
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((left - 7, y), f"{t:g}", fill="black", font=font, anchor="rm")
    draw.rectangle(PLOT_BOX, outline="black")
    draw.text(((left + right) / 2, bottom + 26), "step", fill="black", font=font, anchor="mt")
    label = Image.new("RGB", (40, 16), "white")  # "loss", written then turned to read upwards
    ImageDraw.Draw(label).text((20, 8), "loss", fill="black", font=font, anchor="mm")
    img.paste(label.rotate(90, expand=True), (6, (top + bottom) // 2 - 20))


def _draw_curve(draw, points: list, colour) -> None:
    """The points joined in order; None (a skipped step) leaves a gap, and a point alone between gaps is a dot."""
    run = []
    for p in points + [None]:
        if p is not None:
            run.append(p)
            continue
        if len(run) > 1:
            draw.line(run, fill=colour, width=2, joint="curve")
        elif run:
            draw.ellipse([run[0][0] - 2, run[0][1] - 2, run[0][0] + 2, run[0][1] + 2], fill=colour)
        run = []


def _draw_diamond(draw, xy, ring, r: int = 6) -> None:
    x, y = xy
    draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=VAL_COLOUR, outline=ring, width=2)


def _draw_legend(draw, font, series: dict) -> None:
    """A box in the frame's top right corner: a line sample per stage (first -> last loss), then the diamond."""
    entries = []
    for colour, (name, s) in zip(_stage_colours(len(series)), series.items()):
        values = [v for _, v in s["train"] if v is not None]
        entries.append((f"{name}: {values[0]:.3f} -> {values[-1]:.3f}" if values else name, colour, "line"))
    if any(s["val"] for s in series.values()):
        entries.append(("validation", (90, 90, 90), "diamond"))
    width = 40 + max(draw.textlength(text, font=font) for text, _, _ in entries)
    x0, y0 = PLOT_BOX[2] - 8 - width, PLOT_BOX[1] + 8
    draw.rectangle([x0, y0, x0 + width, y0 + 8 + 18 * len(entries)], fill="white", outline=(160, 160, 160))
    for i, (text, colour, mark) in enumerate(entries):
        y = y0 + 13 + 18 * i
        if mark == "line":
            draw.line([(x0 + 8, y), (x0 + 30, y)], fill=colour, width=2)
        else:
            _draw_diamond(draw, (x0 + 19, y), colour)
        draw.text((x0 + 36, y), text, fill="black", font=font, anchor="lm")
