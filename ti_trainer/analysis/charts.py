"""Charts as plain PIL images, so they show the same in Gradio 3, Gradio 4 and a file browser.

No plotting library: a line chart with a shaded reference band and a few vertical markers is all the results
panel needs, and PIL is already a dependency of every host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
# Gradio lays its label over an image's top-left corner: the chart starts below it.
TOP_MARGIN = 26
INK = (40, 40, 40)
GRID = (228, 228, 228)
BAND = (222, 240, 222)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


@dataclass
class Series:
    label: str
    steps: list[int]
    values: list[float]
    colour: tuple[int, int, int] = PALETTE[0]
    width: int = 2
    dots: bool = False


@dataclass
class Marker:
    step: int
    label: str
    colour: tuple[int, int, int] = (44, 160, 44)


@dataclass
class Chart:
    title: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    band: tuple[float, float, str] | None = None  # low, high, label
    markers: list[Marker] = field(default_factory=list)
    empty_text: str = "No data yet."


def font(size: int) -> ImageFont.ImageFont:
    """A scalable font where Pillow has one (10.1+ ships it), else the bitmap default (Pillow 9.5 in A1111)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError):
        pass
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def text_width(draw: ImageDraw.ImageDraw, text: str, typeface) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=typeface)
    return right - left


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (1, 2, 5 x 10^k steps)."""
    if not math.isfinite(low) or not math.isfinite(high):
        return []
    if high <= low:
        high = low + (abs(low) * 0.1 or 1.0)
    raw = (high - low) / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = [round(first, 12)]
    while ticks[-1] < high:  # the last tick at or above the highest value, so nothing is drawn off the chart
        ticks.append(round(first + len(ticks) * step, 12))
    return ticks


def tick_label(value: float) -> str:
    return f"{value:.4g}"


def render(chart: Chart, size: tuple[int, int] = (760, 320)) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    title_font, small = font(15), font(11)
    draw.text((12, TOP_MARGIN), chart.title, fill=INK, font=title_font)
    points = [
        (s, v) for series in chart.series for s, v in zip(series.steps, series.values) if math.isfinite(v)
    ]
    if not points:
        draw.text((12, height // 2), chart.empty_text, fill=(120, 120, 120), font=small)
        return image

    steps = [s for s, _ in points] + [m.step for m in chart.markers]
    values = [v for _, v in points] + (list(chart.band[:2]) if chart.band else [])
    x_min, x_max = min(steps), max(steps)
    if x_max == x_min:
        x_max = x_min + 1
    y_ticks = nice_ticks(min(values), max(values))
    y_min, y_max = y_ticks[0], y_ticks[-1]
    if y_max == y_min:
        y_max = y_min + 1.0
    left = 16 + max(text_width(draw, tick_label(t), small) for t in y_ticks)
    top, right, bottom = TOP_MARGIN + 58, width - 16, height - 34

    def x_of(step: float) -> float:
        return left + (step - x_min) / (x_max - x_min) * (right - left)

    def y_of(value: float) -> float:
        return bottom - (value - y_min) / (y_max - y_min) * (bottom - top)

    if chart.band:
        low, high, label = chart.band
        draw.rectangle((left, y_of(high), right, y_of(low)), fill=BAND)
        draw.text((left + 6, y_of(high) + 2), label, fill=(60, 120, 60), font=small)
    for tick in y_ticks:
        y = y_of(tick)
        draw.line((left, y, right, y), fill=GRID)
        draw.text(
            (left - 6 - text_width(draw, tick_label(tick), small), y - 6),
            tick_label(tick),
            fill=INK,
            font=small,
        )
    for tick in nice_ticks(x_min, x_max, 8):
        if x_min <= tick <= x_max:
            x = x_of(tick)
            draw.line((x, bottom, x, bottom + 4), fill=INK)
            label = tick_label(tick)
            draw.text((x - text_width(draw, label, small) / 2, bottom + 6), label, fill=INK, font=small)
    draw.text(
        (right - text_width(draw, "step", small), bottom + 20), "step", fill=(110, 110, 110), font=small
    )
    draw.text(
        (max(4, left - 6 - text_width(draw, chart.y_label, small)), top - 18),
        chart.y_label,
        fill=(110, 110, 110),
        font=small,
    )
    draw.rectangle((left, top, right, bottom), outline=(180, 180, 180))

    for marker in chart.markers:
        x = x_of(marker.step)
        for y in range(top, bottom, 8):  # dashed, so it reads as a marker and not as data
            draw.line((x, y, x, min(y + 4, bottom)), fill=marker.colour, width=2)
        draw.text((x + 4, top + 2), marker.label, fill=marker.colour, font=small)

    legend_x = 12
    for series in chart.series:
        line = [(x_of(s), y_of(v)) for s, v in zip(series.steps, series.values) if math.isfinite(v)]
        if len(line) > 1:
            draw.line(line, fill=series.colour, width=series.width, joint="curve")
        if series.dots or len(line) == 1:
            for x, y in line:
                draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=series.colour)
        draw.rectangle((legend_x, TOP_MARGIN + 26, legend_x + 14, TOP_MARGIN + 32), fill=series.colour)
        draw.text((legend_x + 18, TOP_MARGIN + 22), series.label, fill=INK, font=small)
        legend_x += 30 + text_width(draw, series.label, small)
    return image


def stack(images: list[Image.Image]) -> Image.Image:
    """Images one above the other, on white."""
    width = max(image.width for image in images)
    out = Image.new("RGB", (width, sum(image.height for image in images)), BACKGROUND)
    y = 0
    for image in images:
        out.paste(image, (0, y))
        y += image.height
    return out


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` values (shorter at the start), to see the trend in a noisy loss."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out
