"""Charts as plain PIL images, so they show the same in Gradio 3, Gradio 4 and a file browser.

No plotting library: a line chart with a shaded reference band and a few vertical markers is all the results
panel needs, and PIL is already a dependency of every host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
# Room kept clear on every side, so no text touches the image's edge (or is cut off there when scaled).
EDGE = 8
# The panels show charts without Gradio's label, which would cover the title (the title says what the chart
# is), so the title needs no more than the edge's room above it.
TOP_MARGIN = EDGE
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


@dataclass
class TextBox:
    text: str
    box: tuple[float, float, float, float]  # left, top, right, bottom in pixels


class Canvas:
    """An ImageDraw that remembers where each text went, so the layout can be checked (tests do)."""

    def __init__(self, image: Image.Image):
        self.draw = ImageDraw.Draw(image)
        self.texts: list[TextBox] = []

    def text(self, xy: tuple[float, float], text: str, fill, typeface) -> None:
        self.draw.text(xy, text, fill=fill, font=typeface)
        self.texts.append(TextBox(text, self.draw.textbbox(xy, text, font=typeface)))

    def width(self, text: str, typeface) -> int:
        return text_width(self.draw, text, typeface)

    def height(self, typeface) -> int:
        """How far below its anchor a line of this font reaches (descenders included)."""
        return self.draw.textbbox((0, 0), "Ag", font=typeface)[3]


def wrap(canvas: Canvas, text: str, typeface, width: float) -> list[str]:
    """`text` in lines no wider than `width` (a single word wider than that stays whole on its line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and canvas.width(f"{lines[-1]} {word}", typeface) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def render(chart: Chart, size: tuple[int, int] = (760, 320)) -> Image.Image:
    return render_with_layout(chart, size)[0]


def render_with_layout(chart: Chart, size: tuple[int, int] = (760, 320)) -> tuple[Image.Image, list[TextBox]]:
    """The chart, and where each of its texts lies. Every text is placed by its measured size: the title and
    the legend wrap to the width, labels near an edge turn inwards, and the plot gets the room that is left."""
    width, height = size
    image = Image.new("RGB", size, BACKGROUND)
    canvas = Canvas(image)
    title_font, small = font(15), font(11)
    title_height, small_height = canvas.height(title_font) + 3, canvas.height(small)
    y = TOP_MARGIN
    for line in wrap(canvas, chart.title, title_font, width - 2 * EDGE):
        canvas.text((EDGE, y), line, INK, title_font)
        y += title_height
    points = [
        (s, v) for series in chart.series for s, v in zip(series.steps, series.values) if math.isfinite(v)
    ]
    if not points:
        for line in wrap(canvas, chart.empty_text, small, width - 2 * EDGE):
            canvas.text((EDGE, max(y + 4, height // 2)), line, (120, 120, 120), small)
            y = max(y + 4, height // 2) + small_height
        return image, canvas.texts

    y = _legend(canvas, chart.series, small, y + 4, width)
    steps = [s for s, _ in points] + [m.step for m in chart.markers]
    values = [v for _, v in points] + (list(chart.band[:2]) if chart.band else [])
    x_min, x_max = min(steps), max(steps)
    if x_max == x_min:
        x_max = x_min + 1
    y_ticks = nice_ticks(min(values), max(values))
    y_min, y_max = y_ticks[0], y_ticks[-1]
    if y_max == y_min:
        y_max = y_min + 1.0
    left = EDGE + 8 + max(canvas.width(tick_label(t), small) for t in y_ticks)
    # Above the plot: the y axis' name. Below it: tick marks, their labels, then "step".
    top = y + small_height + 8
    right = width - EDGE - max(8, canvas.width(tick_label(x_max), small) // 2)
    bottom = height - EDGE - 2 * small_height - 14
    if bottom - top < 40:  # a long title on a small chart: keep a plot worth reading
        top = bottom - 40

    def x_of(step: float) -> float:
        return left + (step - x_min) / (x_max - x_min) * (right - left)

    def y_of(value: float) -> float:
        return bottom - (value - y_min) / (y_max - y_min) * (bottom - top)

    if chart.band:
        low, high, label = chart.band
        canvas.draw.rectangle((left, y_of(high), right, y_of(low)), fill=BAND)
        canvas.text((left + 6, y_of(high) + 2), label, (60, 120, 60), small)
    for tick in y_ticks:
        y_tick = y_of(tick)
        canvas.draw.line((left, y_tick, right, y_tick), fill=GRID)
        label = tick_label(tick)
        canvas.text((left - 6 - canvas.width(label, small), y_tick - small_height / 2), label, INK, small)
    for tick in nice_ticks(x_min, x_max, 8):
        if x_min <= tick <= x_max:
            x = x_of(tick)
            canvas.draw.line((x, bottom, x, bottom + 4), fill=INK)
            label = tick_label(tick)
            label_x = _within(x - canvas.width(label, small) / 2, canvas.width(label, small), width)
            canvas.text((label_x, bottom + 6), label, INK, small)
    canvas.text(
        (right - canvas.width("step", small), bottom + 10 + small_height), "step", (110, 110, 110), small
    )
    canvas.text(
        (_within(left - 6 - canvas.width(chart.y_label, small), canvas.width(chart.y_label, small), width),
         top - small_height - 5),
        chart.y_label,
        (110, 110, 110),
        small,
    )  # fmt: skip
    canvas.draw.rectangle((left, top, right, bottom), outline=(180, 180, 180))

    for marker in chart.markers:
        x = x_of(marker.step)
        for y_dash in range(int(top), int(bottom), 8):  # dashed, so it reads as a marker and not as data
            canvas.draw.line((x, y_dash, x, min(y_dash + 4, bottom)), fill=marker.colour, width=2)
        label_width = canvas.width(marker.label, small)
        # Right of the line where it fits, else on its left: a marker near the end keeps its label whole.
        label_x = x + 4 if x + 4 + label_width <= width - EDGE else x - 4 - label_width
        canvas.text((_within(label_x, label_width, width), top + 2), marker.label, marker.colour, small)

    for series in chart.series:
        line = [(x_of(s), y_of(v)) for s, v in zip(series.steps, series.values) if math.isfinite(v)]
        if len(line) > 1:
            canvas.draw.line(line, fill=series.colour, width=series.width, joint="curve")
        if series.dots or len(line) == 1:
            for x, y_dot in line:
                canvas.draw.ellipse((x - 2.5, y_dot - 2.5, x + 2.5, y_dot + 2.5), fill=series.colour)
    return image, canvas.texts


def _legend(canvas: Canvas, series: list[Series], typeface, y: float, width: int) -> float:
    """A swatch and a label per named series, in rows that wrap at the edge; returns the y below them."""
    row_height = canvas.height(typeface) + 4
    x = EDGE
    for item in series:
        if not item.label:
            continue
        entry = 18 + canvas.width(item.label, typeface)
        if x > EDGE and x + entry > width - EDGE:
            x, y = EDGE, y + row_height
        swatch_y = y + row_height / 2 - 3
        canvas.draw.rectangle((x, swatch_y, x + 14, swatch_y + 6), fill=item.colour)
        canvas.text((x + 18, y), item.label, INK, typeface)
        x += entry + 12
    return y + row_height


def _within(x: float, extent: float, width: int) -> float:
    """A text's left edge moved so that the text (`extent` wide) lies inside the image, EDGE clear of both
    sides."""
    return min(max(EDGE, x), width - EDGE - extent)


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
