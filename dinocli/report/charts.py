"""Small, clean line charts drawn with PIL alone (no plotting library): axes, ticks, grid, legend."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

PALETTE = ("#1f6fb4", "#e8710a", "#2a9d44", "#c0392b", "#7b4fb0", "#8c6d31")
SCALE = 2  # drawn at twice the size, then downsampled: smooth lines without anti-aliasing support


@dataclass
class Series:
    """One line: ``ys[i]`` at ``xs[i]``; ``None`` values leave a gap."""

    label: str
    xs: list[float]
    ys: list[float | None]
    color: str | None = None
    markers: bool = False


@dataclass
class Chart:
    """A chart's content: title, axis labels, lines and optional vertical event markers."""

    title: str
    series: list[Series]
    x_label: str = "iteration"
    y_label: str = ""
    events: list[tuple[float, str]] = field(default_factory=list)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("tick range must be finite")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * 0.999)
    start = math.floor(lo / step + 1e-9) * step
    ticks, value = [], start
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < hi - step * 1e-9:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def tick_label(value: float) -> str:
    """A short label: ``0``, ``0.25``, ``1200``, ``1.5e-5``."""
    if value == 0:
        return "0"
    text = f"{value:.3g}" if abs(value) < 1 else f"{value:.6g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0]


def render_chart(chart: Chart, width: int = 640, height: int = 360) -> Image.Image:
    """The chart as an RGB image of ``width`` x ``height`` pixels."""
    s = SCALE
    img = Image.new("RGB", (width * s, height * s), "white")
    draw = ImageDraw.Draw(img)
    font, small, bold = _font(12 * s), _font(11 * s), _font(14 * s)
    left, right, top, bottom = 64 * s, 16 * s, 36 * s, 44 * s
    x0, y0, x1, y1 = left, top, width * s - right, height * s - bottom

    points = [(x, y) for se in chart.series for x, y in zip(se.xs, se.ys)
              if y is not None and math.isfinite(y) and math.isfinite(x)]
    draw.text((left, 10 * s), chart.title, fill="#222222", font=bold)
    if not points:
        draw.text((x0 + 10 * s, (y0 + y1) // 2), "no data", fill="#888888", font=font)
        return img.resize((width, height), Image.LANCZOS)
    xmin, xmax = min(p[0] for p in points), max(p[0] for p in points)
    if xmin == xmax:
        xmin, xmax = xmin - 0.5, xmax + 0.5
    xt = [t for t in nice_ticks(xmin, xmax) if xmin <= t <= xmax]  # the x axis spans the data
    yt = nice_ticks(min(p[1] for p in points), max(p[1] for p in points))
    ymin, ymax = yt[0], yt[-1]

    def px(x: float) -> float:
        return x0 + (x - xmin) / (xmax - xmin) * (x1 - x0)

    def py(y: float) -> float:
        return y1 - (y - ymin) / (ymax - ymin) * (y1 - y0)

    for t in yt:
        draw.line([(x0, py(t)), (x1, py(t))], fill="#e6e6e6", width=s)
        label = tick_label(t)
        draw.text((x0 - 6 * s - _text_width(draw, label, small), py(t) - 7 * s), label, fill="#444444", font=small)
    for t in xt:
        draw.line([(px(t), y0), (px(t), y1)], fill="#f0f0f0", width=s)
        label = tick_label(t)
        draw.text((px(t) - _text_width(draw, label, small) / 2, y1 + 5 * s), label, fill="#444444", font=small)
    draw.rectangle([x0, y0, x1, y1], outline="#888888", width=s)
    for x, label in chart.events:
        if xmin <= x <= xmax:
            for y in range(int(y0), int(y1), 8 * s):  # dashed
                draw.line([(px(x), y), (px(x), min(y + 4 * s, y1))], fill="#d62728", width=s)
    for i, se in enumerate(chart.series):
        color = se.color or PALETTE[i % len(PALETTE)]
        run: list[tuple[float, float]] = []
        segments = []
        for x, y in zip(se.xs, se.ys):
            if y is None or not math.isfinite(y):
                segments.append(run)
                run = []
            else:
                run.append((px(x), py(y)))
        segments.append(run)
        for seg in segments:
            if len(seg) > 1:
                draw.line(seg, fill=color, width=2 * s, joint="curve")
            if seg and (se.markers or len(seg) == 1):
                for cx, cy in seg:
                    r = 3 * s
                    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    if len(chart.series) > 1 or chart.events:
        entries = [(se.label, se.color or PALETTE[i % len(PALETTE)]) for i, se in enumerate(chart.series)]
        entries += [(label, "#d62728") for _, label in chart.events[:1]]
        lx = x1
        for label, color in reversed(entries):
            lx -= _text_width(draw, label, small) + 24 * s
            draw.line([(lx, 18 * s), (lx + 14 * s, 18 * s)], fill=color, width=3 * s)
            draw.text((lx + 18 * s, 11 * s), label, fill="#333333", font=small)
    draw.text(((x0 + x1) / 2 - _text_width(draw, chart.x_label, font) / 2, y1 + 22 * s),
              chart.x_label, fill="#333333", font=font)
    if chart.y_label:
        label_img = Image.new("RGB", (_text_width(draw, chart.y_label, font) + 4 * s, 16 * s), "white")
        ImageDraw.Draw(label_img).text((2 * s, 0), chart.y_label, fill="#333333", font=font)
        rotated = label_img.rotate(90, expand=True)
        img.paste(rotated, (4 * s, int((y0 + y1) / 2 - rotated.height / 2)))
    return img.resize((width, height), Image.LANCZOS)


__all__ = ["Chart", "Series", "nice_ticks", "render_chart", "tick_label"]
