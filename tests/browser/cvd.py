"""Colour-vision-deficiency simulation and colour difference, for the console palette tests.

* sRGB (IEC 61966-2-1) <-> linear RGB, linear RGB -> CIE XYZ (D65) -> CIELAB.
* Dichromacy simulated with the severity-1.0 matrices of Machado, Oliveira and Fernandes
  (2009, "A Physiologically-based Model for Simulation of Color Vision Deficiency"), applied in
  linear RGB, the result clipped to the sRGB gamut.
* Achromatopsia as Chromium emulates it (every channel the linear-light luminance, Rec. 709
  weights) and greyscale as CSS ``filter: grayscale(1)`` computes it (the same weights on the
  gamma-encoded values).
* Colour difference CIEDE2000 (Sharma, Wu and Dalal, 2005), checked against their test data in
  ``test_palette.py``; CIE76 for comparison.
* A minimal PNG reader (8-bit RGB/RGBA, not interlaced: what Chromium's screenshots are), so the
  browser tests can read rendered pixels without an imaging library.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections import Counter
from enum import Enum

Matrix = tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]]
RGB = tuple[float, float, float]
Lab = tuple[float, float, float]


class Deficiency(Enum):
    PROTANOPIA = "protanopia"
    DEUTERANOPIA = "deuteranopia"
    TRITANOPIA = "tritanopia"
    ACHROMATOPSIA = "achromatopsia"


MACHADO: dict[Deficiency, Matrix] = {
    Deficiency.PROTANOPIA: (
        (0.152286, 1.052583, -0.204868),
        (0.114503, 0.786281, 0.099216),
        (-0.003882, -0.048116, 1.051998),
    ),
    Deficiency.DEUTERANOPIA: (
        (0.367322, 0.860646, -0.227968),
        (0.280085, 0.672501, 0.047413),
        (-0.011820, 0.042940, 0.968881),
    ),
    Deficiency.TRITANOPIA: (
        (1.255528, -0.076749, -0.178779),
        (-0.078411, 0.930809, 0.147602),
        (0.004733, 0.691367, 0.303900),
    ),
    Deficiency.ACHROMATOPSIA: (
        (0.2126, 0.7152, 0.0722),
        (0.2126, 0.7152, 0.0722),
        (0.2126, 0.7152, 0.0722),
    ),
}

# linear sRGB -> XYZ, D65 white
SRGB_TO_XYZ: Matrix = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
WHITE_D65 = (0.95047, 1.0, 1.08883)


def parse_hex(text: str) -> RGB:
    t = text.strip().lstrip("#")
    if len(t) == 3:
        t = "".join(c * 2 for c in t)
    if len(t) != 6:
        raise ValueError(f"not a #rrggbb colour: {text!r}")
    return (int(t[0:2], 16) / 255, int(t[2:4], 16) / 255, int(t[4:6], 16) / 255)


def to_linear(c: float) -> float:
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def from_linear(c: float) -> float:
    c = min(1.0, max(0.0, c))
    return 12.92 * c if c <= 0.0031308 else 1.055 * c ** (1 / 2.4) - 0.055


def _apply(m: Matrix, v: RGB) -> RGB:
    return (
        m[0][0] * v[0] + m[0][1] * v[1] + m[0][2] * v[2],
        m[1][0] * v[0] + m[1][1] * v[1] + m[1][2] * v[2],
        m[2][0] * v[0] + m[2][1] * v[1] + m[2][2] * v[2],
    )


def simulate(rgb: RGB, deficiency: Deficiency) -> RGB:
    """The sRGB colour a dichromat of this type perceives as ``rgb`` (gamma-encoded in and out)."""
    lin = (to_linear(rgb[0]), to_linear(rgb[1]), to_linear(rgb[2]))
    out = _apply(MACHADO[deficiency], lin)
    return (from_linear(out[0]), from_linear(out[1]), from_linear(out[2]))


def greyscale(rgb: RGB) -> RGB:
    """CSS ``filter: grayscale(1)``: Rec. 709 weights applied to the gamma-encoded channels."""
    g = min(1.0, max(0.0, 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]))
    return (g, g, g)


def relative_luminance(rgb: RGB) -> float:
    r, g, b = (to_linear(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a: RGB, b: RGB) -> float:
    la, lb = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def to_lab(rgb: RGB) -> Lab:
    lin = (to_linear(rgb[0]), to_linear(rgb[1]), to_linear(rgb[2]))
    x, y, z = _apply(SRGB_TO_XYZ, lin)

    def f(t: float) -> float:
        return t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29

    fx, fy, fz = f(x / WHITE_D65[0]), f(y / WHITE_D65[1]), f(z / WHITE_D65[2])
    return (116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz))


def delta_e76(a: Lab, b: Lab) -> float:
    return math.dist(a, b)


def delta_e2000(lab1: Lab, lab2: Lab) -> float:
    """CIEDE2000 with kL = kC = kH = 1."""
    l1, a1, b1 = lab1
    l2, a2, b2 = lab2
    c1 = math.hypot(a1, b1)
    c2 = math.hypot(a2, b2)
    c_bar7 = ((c1 + c2) / 2) ** 7
    g = 0.5 * (1 - math.sqrt(c_bar7 / (c_bar7 + 25**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = math.hypot(a1p, b1), math.hypot(a2p, b2)

    def hue(ap: float, b: float) -> float:
        if ap == 0 and b == 0:
            return 0.0
        return math.degrees(math.atan2(b, ap)) % 360

    h1p, h2p = hue(a1p, b1), hue(a2p, b2)
    d_lp = l2 - l1
    d_cp = c2p - c1p
    if c1p * c2p == 0:
        d_hp = 0.0
    elif abs(h2p - h1p) <= 180:
        d_hp = h2p - h1p
    elif h2p - h1p > 180:
        d_hp = h2p - h1p - 360
    else:
        d_hp = h2p - h1p + 360
    d_big_hp = 2 * math.sqrt(c1p * c2p) * math.sin(math.radians(d_hp / 2))

    l_bar = (l1 + l2) / 2
    c_bar_p = (c1p + c2p) / 2
    if c1p * c2p == 0:
        h_bar = h1p + h2p
    elif abs(h1p - h2p) <= 180:
        h_bar = (h1p + h2p) / 2
    elif h1p + h2p < 360:
        h_bar = (h1p + h2p + 360) / 2
    else:
        h_bar = (h1p + h2p - 360) / 2
    t = (
        1
        - 0.17 * math.cos(math.radians(h_bar - 30))
        + 0.24 * math.cos(math.radians(2 * h_bar))
        + 0.32 * math.cos(math.radians(3 * h_bar + 6))
        - 0.20 * math.cos(math.radians(4 * h_bar - 63))
    )
    d_theta = 30 * math.exp(-(((h_bar - 275) / 25) ** 2))
    c_bar_p7 = c_bar_p**7
    r_c = 2 * math.sqrt(c_bar_p7 / (c_bar_p7 + 25**7))
    s_l = 1 + 0.015 * (l_bar - 50) ** 2 / math.sqrt(20 + (l_bar - 50) ** 2)
    s_c = 1 + 0.045 * c_bar_p
    s_h = 1 + 0.015 * c_bar_p * t
    r_t = -math.sin(math.radians(2 * d_theta)) * r_c
    return math.sqrt(
        (d_lp / s_l) ** 2 + (d_cp / s_c) ** 2 + (d_big_hp / s_h) ** 2 + r_t * (d_cp / s_c) * (d_big_hp / s_h)
    )


def perceived_difference(a: RGB, b: RGB, deficiency: Deficiency | None) -> float:
    """CIEDE2000 between two colours as seen with ``deficiency`` (``None``: typical vision)."""
    if deficiency is not None:
        a, b = simulate(a, deficiency), simulate(b, deficiency)
    return delta_e2000(to_lab(a), to_lab(b))


def perceived_difference_in_greyscale(a: RGB, b: RGB) -> float:
    """CIEDE2000 between two colours printed (or shown) in greyscale."""
    return delta_e2000(to_lab(greyscale(a)), to_lab(greyscale(b)))


# ---- reading rendered pixels ---------------------------------------------------------------------

Pixel = tuple[int, int, int]


class Image:
    """Decoded pixels, row-major, 8-bit RGB (alpha dropped)."""

    def __init__(self, width: int, height: int, pixels: list[Pixel]) -> None:
        self.width, self.height, self.pixels = width, height, pixels

    def at(self, x: int, y: int) -> Pixel:
        return self.pixels[y * self.width + x]

    def region(self, x0: int, y0: int, x1: int, y1: int) -> list[Pixel]:
        x0, y0 = max(0, x0), max(0, y0)
        x1, y1 = min(self.width, x1), min(self.height, y1)
        return [self.pixels[y * self.width + x] for y in range(y0, y1) for x in range(x0, x1)]


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def decode_png(data: bytes) -> Image:
    """Decode an 8-bit, non-interlaced RGB or RGBA PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _c, _f, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or colour not in (2, 6) or interlace:
                raise ValueError(f"unsupported PNG: depth {depth}, colour type {colour}, interlace {interlace}")
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    raw = zlib.decompress(idat)
    stride = width * channels
    prev = bytearray(stride)
    pixels: list[Pixel] = []
    for y in range(height):
        start = y * (stride + 1)
        ftype, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = prev[i]
            upleft = prev[i - channels] if i >= channels else 0
            if ftype == 1:
                line[i] = (line[i] + left) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + up) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + ((left + up) >> 1)) & 0xFF
            elif ftype == 4:
                line[i] = (line[i] + _paeth(left, up, upleft)) & 0xFF
        pixels.extend((line[i], line[i + 1], line[i + 2]) for i in range(0, stride, channels))
        prev = line
    return Image(width, height, pixels)


def as_rgb(p: Pixel) -> RGB:
    return (p[0] / 255, p[1] / 255, p[2] / 255)


def dominant_colour(inner: list[Pixel], ring: list[Pixel], min_distance: float = 6.0) -> Pixel:
    """The most frequent colour of ``inner`` that is not the background.

    The background is the most frequent colour of ``ring`` (the pixels around the element); colours
    within ``min_distance`` (CIE76) of it are ignored, so a thin line or an icon on a page yields its
    own colour, whatever the anti-aliasing at its edges.
    """
    background = Counter(ring).most_common(1)[0][0]
    bg_lab = to_lab(as_rgb(background))
    for colour, _n in Counter(inner).most_common():
        if delta_e76(to_lab(as_rgb(colour)), bg_lab) >= min_distance:
            return colour
    raise ValueError(f"nothing but the background colour {background} in the element")
