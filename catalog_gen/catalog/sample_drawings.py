"""Procedural drawings of the jewelry catalogue's 19 instances (PIL only, pure).

`render_photo` draws one product photo from its parameters (class, instance, metal, a
seeded rng, size, framing) and returns images; it reads and writes no files. Catalogue
assembly (titles, SKUs, CSVs, odd files, writing) is sample_data.py.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw, ImageFilter

# (base, highlight, shade) per metal: three tones are enough to read as polished metal.
METAL_TONES = {
    "gold": ((212, 172, 60), (250, 228, 150), (140, 104, 30)),
    "silver": ((190, 192, 198), (246, 247, 250), (112, 116, 124)),
    "rose gold": ((200, 128, 112), (244, 196, 182), (132, 74, 64)),
}
_GEMS = ((36, 140, 92), (44, 72, 176), (176, 30, 56), (236, 240, 248), (120, 60, 160))

# Framings a photographer moves between (centre offset, zoom): consecutive photos of one
# product get different ones, so they differ as real shots do and not only by jitter.
_FRAMINGS = ((0.0, 0.0, 1.0), (-0.12, -0.09, 0.8), (0.12, 0.08, 0.85), (-0.09, 0.12, 0.75),
             (0.1, -0.1, 0.85), (0.0, 0.1, 0.95))


def render_photo(
    class_name: str, key: str, metal: str, rng: random.Random, size: int, framing: int = 0
) -> tuple[Image.Image, Image.Image]:
    """One product photo: (object with its shadow as RGBA, background as RGBA), both size x size."""
    big = size * 2  # drawn at twice the size, then shrunk: cheap anti-aliasing
    fx, fy, zoom = _FRAMINGS[framing % len(_FRAMINGS)]
    scale, aspect, angle = zoom * rng.uniform(0.95, 1.05), rng.uniform(0.8, 1.2), rng.uniform(-25, 25)
    shift = ((fx + rng.uniform(-0.03, 0.03)) * big, (fy + rng.uniform(-0.03, 0.03)) * big)
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    pen = _Pen(layer, unit=big * 0.5 * 0.95 * scale, aspect=aspect, metal=metal)
    if class_name == "hoops":
        for x in (-0.4, 0.4):
            _draw_hoop(pen, key, x)
    elif class_name == "necklace":
        _draw_necklace(pen, key, rng)
    elif class_name == "ring":
        _draw_ring(pen, key, rng)
    else:
        _draw_studs(pen, rng)
    # Rotate and shrink premultiplied, so transparent edges do not bleed black into the metal.
    layer = layer.convert("RGBa").rotate(angle, Image.Resampling.BILINEAR, translate=shift)
    layer = layer.reduce(2).convert("RGBA")
    # A soft shadow: the object's own outline, blurred, faint, a little down and to the right.
    alpha = layer.getchannel("A").point(lambda a: a * 0.35).filter(ImageFilter.GaussianBlur(size * 0.02))
    shifted = Image.new("L", (size, size), 0)
    shifted.paste(alpha, (round(size * 0.02), round(size * 0.03)))
    shadow = Image.new("RGBA", (size, size), (70, 60, 50, 0))
    shadow.putalpha(shifted)
    layer = Image.alpha_composite(shadow, layer)

    tint = [rng.randint(236, 252) for _ in range(3)]
    top = Image.new("RGBA", (size, size), (*(min(255, c + 6) for c in tint), 255))
    bottom = Image.new("RGBA", (size, size), (*(c - 6 for c in tint), 255))
    background = Image.composite(bottom, top, Image.linear_gradient("L").resize((size, size)))
    return layer, background


# ---------------------------------------------------------------- the pen and the pieces

class _Pen:
    """Draws in unit coordinates (object roughly within -1..1) onto a transparent layer."""

    def __init__(self, layer: Image.Image, unit: float, aspect: float, metal: str) -> None:
        self.draw = ImageDraw.Draw(layer)
        self.c = layer.width / 2
        self.u, self.uy = unit, unit * aspect  # aspect != 1: the camera a little higher or lower
        self.base, self.light, self.dark = METAL_TONES[metal]

    def pt(self, x: float, y: float) -> tuple[float, float]:
        return (self.c + x * self.u, self.c + y * self.uy)

    def box(self, x: float, y: float, rx: float, ry: float) -> list[float]:
        return [*self.pt(x - rx, y - ry), *self.pt(x + rx, y + ry)]

    def w(self, width: float) -> int:
        return max(1, round(width * self.u))

    def ring(self, x, y, rx, ry, width, colour=None) -> None:
        self.draw.ellipse(self.box(x, y, rx, ry), outline=colour or self.base, width=self.w(width))

    def disc(self, x, y, rx, ry=None, colour=None, outline=None) -> None:
        box = self.box(x, y, rx, rx if ry is None else ry)
        self.draw.ellipse(box, fill=colour or self.base, outline=outline, width=self.w(0.01))

    def cut(self, x, y, rx, ry) -> None:
        self.draw.ellipse(self.box(x, y, rx, ry), fill=(0, 0, 0, 0))  # ImageDraw replaces, so this erases

    def poly(self, points, colour=None) -> None:
        self.draw.polygon([self.pt(px, py) for px, py in points], fill=colour or self.base, outline=self.dark)


def _oval(x, y, rx, ry, tilt, n=16) -> list[tuple[float, float]]:
    c, s = math.cos(tilt), math.sin(tilt)
    pts = [(rx * math.cos(2 * math.pi * i / n), ry * math.sin(2 * math.pi * i / n)) for i in range(n)]
    return [(x + px * c - py * s, y + px * s + py * c) for px, py in pts]


def _star(x, y, r, points=5) -> list[tuple[float, float]]:
    return [
        (x + (r if i % 2 == 0 else r * 0.45) * math.sin(math.pi * i / points),
         y - (r if i % 2 == 0 else r * 0.45) * math.cos(math.pi * i / points))
        for i in range(2 * points)
    ]


def _draw_hoop(pen: _Pen, key: str, x: float) -> None:
    pen.draw.line([pen.pt(x, -0.42), pen.pt(x, -0.3)], fill=pen.dark, width=pen.w(0.02))  # the post
    if key == "beaded":
        for i in range(16):
            a = 2 * math.pi * i / 16
            bx, by = x + 0.28 * math.cos(a), 0.02 + 0.3 * math.sin(a)
            pen.disc(bx, by, 0.045, outline=pen.dark)
            pen.disc(bx - 0.012, by - 0.012, 0.014, colour=pen.light)
    elif key == "chunky":
        pen.ring(x, 0.02, 0.26, 0.33, 0.13, pen.dark)
        pen.ring(x, 0.02, 0.24, 0.31, 0.09)
        pen.ring(x, 0.02, 0.215, 0.285, 0.02, pen.light)
    elif key == "tube":
        pen.ring(x, 0.02, 0.3, 0.3, 0.08, pen.dark)
        pen.ring(x, 0.02, 0.28, 0.28, 0.04, pen.base)
        pen.ring(x, 0.02, 0.275, 0.275, 0.012, pen.light)
    elif key == "rectangle":
        box = pen.box(x, 0.02, 0.2, 0.32)
        pen.draw.rounded_rectangle(box, radius=pen.w(0.05), outline=pen.dark, width=pen.w(0.06))
        pen.draw.rounded_rectangle(box, radius=pen.w(0.05), outline=pen.base, width=pen.w(0.035))
    elif key == "croissant":
        for i in range(18):  # twisted segments, fat at the bottom, thin at the top like a croissant
            a = 2 * math.pi * i / 18
            fat = 0.045 + 0.035 * (1 + math.sin(a)) / 2
            pen.poly(_oval(x + 0.27 * math.cos(a), 0.02 + 0.27 * math.sin(a), fat, 0.03, a + 0.9),
                     pen.light if i % 2 else pen.base)
    elif key == "dome":
        pen.disc(x, 0.02, 0.31, 0.33, colour=pen.dark)
        pen.disc(x, 0.0, 0.29, 0.31)
        pen.draw.arc(pen.box(x, 0.02, 0.25, 0.27), 30, 150, fill=pen.light, width=pen.w(0.03))
        pen.cut(x, -0.06, 0.2, 0.22)
    elif key == "charlotte":
        pen.ring(x, 0.1, 0.17, 0.17, 0.05, pen.dark)
        pen.ring(x, 0.1, 0.165, 0.165, 0.03)
        for i in range(7):  # a row of small stones along the front
            a = math.pi * (0.15 + 0.7 * i / 6)
            pen.disc(x + 0.165 * math.cos(a), 0.1 + 0.165 * math.sin(a), 0.022, colour=(250, 250, 255),
                     outline=pen.dark)
    elif key == "easy_daily":
        pen.ring(x, 0.02, 0.32, 0.32, 0.028)
    elif key == "special":
        pen.ring(x, 0.04, 0.34, 0.36, 0.05, pen.base)
        for i in range(10):
            a = 2 * math.pi * i / 10
            pen.disc(x + 0.34 * math.cos(a), 0.04 + 0.36 * math.sin(a), 0.04, colour=_GEMS[i % 3],
                     outline=pen.light)
    else:
        pen.ring(x, 0.02, 0.3, 0.3, 0.05)


def _draw_necklace(pen: _Pen, key: str, rng: random.Random) -> None:
    curve = [(0.75 * t, -0.5 + 0.85 * (1 - t * t) ** 0.8) for t in (i / 30 - 1 for i in range(61))]
    if key == "chain":
        for i, (cx, cy) in enumerate(curve[::2]):
            rx, ry = (0.055, 0.03) if i % 2 else (0.03, 0.045)
            pen.ring(cx, cy, rx, ry, 0.02, pen.dark if i % 2 else pen.base)
        return
    pen.draw.line([pen.pt(*p) for p in curve], fill=pen.base, width=pen.w(0.014))
    if key == "charm":
        for n, t in enumerate((14, 22, 30, 38, 46)):
            cx, cy = curve[t]
            shape = (n + rng.randrange(5)) % 5
            cy += 0.1
            pen.draw.line([pen.pt(cx, cy - 0.1), pen.pt(cx, cy - 0.05)], fill=pen.dark, width=pen.w(0.01))
            if shape == 0:
                pen.poly(_star(cx, cy, 0.07))
            elif shape == 1:
                pen.disc(cx, cy, 0.05, outline=pen.dark)
            elif shape == 2:
                pen.poly([(cx - 0.06, cy - 0.02), (cx + 0.06, cy - 0.02), (cx, cy + 0.07)], pen.light)
            elif shape == 3:
                pen.disc(cx, cy, 0.055, colour=pen.dark)
                pen.cut(cx + 0.025, cy - 0.015, 0.045, 0.045)  # a crescent moon
            else:
                pen.disc(cx, cy, 0.045, colour=_GEMS[n % len(_GEMS)], outline=pen.dark)
    else:  # pendant: one drop at the lowest point
        cx, cy = curve[30]
        pen.poly([(cx, cy), (cx - 0.1, cy + 0.17), (cx + 0.1, cy + 0.17)], pen.base)
        pen.disc(cx, cy + 0.2, 0.1, outline=pen.dark)
        pen.disc(cx, cy + 0.2, 0.06, colour=_GEMS[1], outline=pen.light)


def _draw_band(pen: _Pen, y: float, height: float, thick: float, tone: tuple | None = None) -> None:
    """A ring seen from above at an angle: the wall from y to y+height, a hole cut in the top."""
    steps = max(2, round(height / 0.01))
    for i in range(steps + 1):
        colour = pen.dark if i == 0 else (tone or pen.base)  # the bottom edge darkest
        pen.disc(0, y + height * (1 - i / steps), 0.42, 0.24, colour=colour)
    front = pen.box(0, y + height * 0.5, 0.41, 0.23)
    pen.draw.arc(front, 35, 145, fill=pen.light, width=pen.w(height * 0.35))
    pen.cut(0, y, 0.42 - thick, 0.24 - thick * 0.6)


def _draw_ring(pen: _Pen, key: str, rng: random.Random) -> None:
    if key == "stacker":
        for i, y in enumerate((-0.12, 0.0, 0.12)):
            _draw_band(pen, y, 0.035, 0.035, (pen.base, pen.light, pen.base)[i])
        return
    height, thick = {"slim": (0.03, 0.025), "dome": (0.16, 0.09), "bold": (0.07, 0.05),
                     "signet": (0.08, 0.05)}.get(key, (0.09, 0.05))
    _draw_band(pen, 0.05, height, thick)
    if key == "bold":  # a big faceted stone held on top
        gem = _GEMS[rng.randrange(3)]
        pen.disc(0, -0.24, 0.17, 0.13, colour=pen.dark)
        pen.poly(_oval(0, -0.25, 0.15, 0.11, 0, n=8), gem)
        pen.poly(_oval(0, -0.26, 0.07, 0.05, 0, n=8), tuple(min(255, c + 70) for c in gem))
    elif key == "signet":  # a flat face on the front, with an engraved mark
        pen.disc(0, 0.3, 0.18, 0.12, colour=pen.dark)
        pen.disc(0, 0.29, 0.16, 0.1, colour=pen.light)
        pen.draw.line([pen.pt(-0.06, 0.27), pen.pt(0.06, 0.31)], fill=pen.dark, width=pen.w(0.015))


def _draw_studs(pen: _Pen, rng: random.Random) -> None:
    style, gem = rng.randrange(6), _GEMS[rng.randrange(len(_GEMS))]
    for x in (-0.3, 0.3):
        if style == 0:
            pen.disc(x, 0, 0.15, colour=pen.dark)
            pen.disc(x, 0, 0.11, colour=gem)
        elif style == 1:
            pen.poly(_star(x, 0, 0.19))
        elif style == 2:
            pen.draw.rectangle(pen.box(x, 0, 0.13, 0.13), fill=gem, outline=pen.base, width=pen.w(0.04))
        elif style == 3:
            for a in range(5):  # a flower of five petals
                pen.disc(x + 0.09 * math.cos(a * 1.2566), 0.09 * math.sin(a * 1.2566), 0.07, colour=pen.base,
                         outline=pen.dark)
            pen.disc(x, 0, 0.05, colour=gem)
        elif style == 4:
            pen.disc(x, 0, 0.14, colour=(244, 240, 228), outline=pen.dark)  # a pearl
            pen.disc(x - 0.04, -0.04, 0.04, colour=(255, 255, 255))
        else:
            pen.poly([(x, -0.16), (x + 0.16, 0.12), (x - 0.16, 0.12)], gem)
