"""A dependency-free line plot (Pillow only): images/s against batch size, one line per series."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw

_COLOURS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip

WIDTH, HEIGHT = 900, 560
LEFT, RIGHT, TOP, BOTTOM = 80, 260, 50, 60


def _nice_ceiling(value: float) -> float:
    """The smallest 1/2/5 x 10^k at or above `value` (for the y-axis top)."""
    if value <= 0:
        return 1.0
    scale = 10.0 ** math.floor(math.log10(value))
    return next(step * scale for step in (1, 2, 5, 10) if step * scale >= value)


def line_plot(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str,
    *,
    title: str,
    x_label: str = "per-device batch size",
    y_label: str = "images / s",
) -> None:
    """Writes a PNG: each series' `(x, y)` points joined in x order.

    X positions are the distinct x values, evenly spaced (batch sizes are usually
    powers of two); the y axis starts at 0.
    """
    if not series or not any(series.values()):
        raise ValueError("line_plot needs at least one series with a point.")
    xs = sorted({x for points in series.values() for x, _ in points})
    y_top = _nice_ceiling(max(y for points in series.values() for _, y in points))
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def to_px(x: float, y: float) -> tuple[float, float]:
        i = xs.index(x)
        px = LEFT + (plot_w * (i + 0.5) / len(xs))
        return px, TOP + plot_h * (1.0 - y / y_top)

    draw.text((LEFT, 15), title, fill="black")
    draw.rectangle((LEFT, TOP, LEFT + plot_w, TOP + plot_h), outline="black")
    for k in range(6):  # horizontal grid and y ticks
        y = y_top * k / 5
        _, py = to_px(xs[0], y)
        draw.line((LEFT, py, LEFT + plot_w, py), fill=(225, 225, 225))
        draw.text((8, py - 6), f"{y:.4g}", fill="black")
    for x in xs:
        px, _ = to_px(x, 0)
        draw.text((px - 6, TOP + plot_h + 8), f"{x:g}", fill="black")
    draw.text((LEFT + plot_w // 2 - 50, HEIGHT - 25), x_label, fill="black")
    draw.text((8, TOP - 20), y_label, fill="black")
    for n, (name, points) in enumerate(series.items()):
        colour = _COLOURS[n % len(_COLOURS)]
        pixels = [to_px(x, y) for x, y in sorted(points)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        legend_y = TOP + 18 * n
        draw.line((WIDTH - RIGHT + 15, legend_y + 6, WIDTH - RIGHT + 35, legend_y + 6),
                  fill=colour, width=3)
        draw.text((WIDTH - RIGHT + 40, legend_y), name, fill="black")
    image.save(path, format="PNG")
