"""A synthetic product catalogue that looks like e-commerce data for ECLIP.

Every product is one instance: a simple object (its category: cup, bottle, box, ...) with a body colour, a
pattern drawn in a second colour (or plain) and a small mark (star, heart, dot, check) drawn on it. Its text
describes exactly those attributes ("red and blue striped cup with a star mark", with a few phrasings), so
that products of one category differ only in details; about a third of the products are variants of an
earlier product with one attribute changed (the same item in another colour, ...), and no two products share
all their attributes while the attribute space lasts.

Each product gets ``images_per_product`` images from three sources, in the rotating order merchant, customer,
ad, merchant, ... (so every product with two images or more has at least two sources):

* ``merchant``: the product large and about centred on a plain light background, with a soft shadow;
* ``customer``: the product small, anywhere, among 2-4 distractor objects of other categories, on a
  cluttered textured background with pixel noise;
* ``ad``: in between, the product medium-sized on a gradient background with 0-2 distractors.

The manifest (:mod:`eclip.data.manifest`) records for each image the product's box and the distractors'
boxes: tight boxes ``[x0, y0, x1, y1]`` in pixels, ``x1``/``y1`` exclusive, so
``0 <= x0 < x1 <= size`` and ``0 <= y0 < y1 <= size``. Two files go next to it: ``attributes.jsonl`` (per
product: its attributes, its variant family, the product it is a variant of, and the category of every
distractor of every image; :func:`eclip.eval.zero_shot.read_product_info` reads it) and ``synth.json`` (the
arguments of the generation).

Options that make "the instance under clutter" testable (all off by default, which gives the catalogue of
the first version byte for byte):

* ``same_category_distractor`` (``--same-category-distractor P``): a share P of the customer photos get one
  more distractor of the product's OWN category (other attributes, the product's size), so that grounding
  the product needs its attributes, not only its category;
* ``family_size`` (``--family-size K``): products come in variant families of K, the same item in K values of
  one attribute (colour, pattern, pattern colour or mark); any two members differ in that attribute only.
  The evaluation reports retrieval within families;
* ``mark_min_px`` (``--mark-min-px R``): the mark's radius is at least R output pixels (at most about 0.4 of
  the object's short side). By default it is about 2-3 pixels on a customer photo at 64 px, too small to
  see through 16-pixel patches, although the texts name it;
* ``marks=False`` (``--no-marks``): no mark at all, neither drawn nor in the texts.

Output is deterministic: the attributes of product ``i`` are drawn from ``(seed, i)`` in the parent process
and its images from another stream of ``(seed, i)`` wherever they are rendered, so the same arguments give
byte-identical PNG files and manifest whatever the number of workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from .manifest import Product, ProductImage, write_manifest

MANIFEST_NAME = "catalogue.jsonl"
ATTRIBUTES_NAME = "attributes.jsonl"
SETTINGS_NAME = "synth.json"
SOURCES = ("merchant", "customer", "ad")

# Body colours: every name is a word of eclip/assets/vocab.txt.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 40, 40),
    "orange": (245, 135, 25),
    "yellow": (240, 215, 40),
    "green": (45, 160, 60),
    "blue": (35, 85, 215),
    "purple": (130, 55, 175),
    "pink": (240, 125, 180),
    "brown": (125, 75, 35),
    "black": (28, 28, 30),
    "white": (246, 246, 242),
    "gray": (128, 128, 128),
    "silver": (188, 190, 198),
    "gold": (205, 165, 45),
    "beige": (222, 200, 160),
    "navy": (22, 32, 98),
    "teal": (0, 125, 125),
    "cyan": (40, 205, 228),
}
PATTERNS = ("plain", "striped", "dotted", "checked", "zigzag", "wavy")
MARKS = ("star", "heart", "dot", "check")
PREFIXES = ("new", "classic", "modern")
MAX_FAMILY_SIZE = 6


@dataclasses.dataclass(frozen=True)
class SynthOptions:
    """The catalogue options beyond size and seed (see the module docstring); the defaults give the
    catalogue of the first version."""

    same_category_distractor: float = 0.0
    family_size: int = 1
    mark_min_px: float = 0.0
    marks: bool = True

    def check(self) -> None:
        if not 0.0 <= self.same_category_distractor <= 1.0:
            raise ValueError(f"same_category_distractor must be in [0, 1], got {self.same_category_distractor}")
        if not 1 <= self.family_size <= MAX_FAMILY_SIZE:
            raise ValueError(f"family_size must be in [1, {MAX_FAMILY_SIZE}], got {self.family_size}")
        if self.mark_min_px < 0:
            raise ValueError(f"mark_min_px must be >= 0, got {self.mark_min_px}")

# Supersampling factor: objects are drawn this many times larger, then box-filtered down.
_SS = 3


def _colour_distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return float(np.sqrt(sum((x - y) ** 2 for x, y in zip(a, b))))


# For each body colour, the pattern colours that stand out on it.
_PATTERN_COLOURS = {
    c: tuple(o for o in COLOURS if o != c and _colour_distance(COLOURS[c], COLOURS[o]) > 110) for c in COLOURS
}


# ---------------------------------------------------------------------------------------------------------
# Object shapes. Each is a list of primitives in unit coordinates of the object's box (x right, y down):
#   (kind, coords, role) with kind in ellipse / polygon / rectangle / rounded / pieslice / ring and role
#   "body" (coloured and patterned), "dark" (body colour darkened), "light" (body colour lightened),
#   "metal" (gray), "paper" (cream), "cut" (removed from the silhouette).
# plus the aspect ratio (width / height), the mark's centre and radius (unit of min(width, height)) and the
# surface the mark sits on ("body" or "paper").
# ---------------------------------------------------------------------------------------------------------

class _Shape:
    def __init__(self, aspect, parts, mark, mark_on="body", lines=()):
        self.aspect = aspect
        self.parts = parts
        self.mark = mark  # (cx, cy, r)
        self.mark_on = mark_on
        self.lines = lines  # dark detail lines: (points, width as a fraction of min(w, h))


SHAPES: dict[str, _Shape] = {
    "cup": _Shape(1.15, [
        ("ellipse", (0.56, 0.22, 1.0, 0.78), "body"),
        ("ellipse", (0.68, 0.36, 0.9, 0.64), "cut"),
        ("polygon", [(0.0, 0.06), (0.74, 0.06), (0.65, 1.0), (0.09, 1.0)], "body"),
        ("ellipse", (0.0, 0.0, 0.74, 0.13), "dark"),
    ], (0.37, 0.56, 0.24)),
    "bottle": _Shape(0.42, [
        ("rectangle", (0.34, 0.0, 0.66, 0.36), "body"),
        ("polygon", [(0.34, 0.26), (0.66, 0.26), (1.0, 0.42), (0.0, 0.42)], "body"),
        ("rounded", (0.0, 0.36, 1.0, 1.0, 0.25), "body"),
        ("rectangle", (0.3, 0.0, 0.7, 0.09), "dark"),
    ], (0.5, 0.68, 0.36)),
    "box": _Shape(1.0, [
        ("rectangle", (0.0, 0.3, 0.7, 1.0), "body"),
        ("polygon", [(0.0, 0.3), (0.3, 0.0), (1.0, 0.0), (0.7, 0.3)], "light"),
        ("polygon", [(0.7, 0.3), (1.0, 0.0), (1.0, 0.7), (0.7, 1.0)], "dark"),
    ], (0.35, 0.65, 0.2)),
    "ball": _Shape(1.0, [
        ("ellipse", (0.0, 0.0, 1.0, 1.0), "body"),
        ("ellipse", (0.2, 0.14, 0.38, 0.3), "light"),
    ], (0.56, 0.6, 0.2)),
    "lamp": _Shape(0.72, [
        ("polygon", [(0.24, 0.0), (0.76, 0.0), (1.0, 0.5), (0.0, 0.5)], "body"),
        ("rectangle", (0.44, 0.5, 0.56, 0.9), "metal"),
        ("ellipse", (0.14, 0.84, 0.86, 1.0), "metal"),
    ], (0.5, 0.28, 0.22)),
    "hat": _Shape(1.5, [
        ("ellipse", (0.0, 0.66, 1.0, 1.0), "body"),
        ("rounded", (0.2, 0.0, 0.8, 0.86, 0.3), "body"),
        ("rectangle", (0.2, 0.56, 0.8, 0.7), "dark"),
    ], (0.5, 0.3, 0.26)),
    "shoe": _Shape(1.7, [
        ("polygon", [(0.0, 0.6), (0.06, 0.38), (0.38, 0.3), (0.46, 0.0), (0.74, 0.0), (0.78, 0.42),
                     (1.0, 0.58), (1.0, 0.88), (0.0, 0.88)], "body"),
        ("rectangle", (0.0, 0.84, 1.0, 1.0), "dark"),
        ("polygon", [(0.48, 0.0), (0.72, 0.0), (0.7, 0.08), (0.5, 0.08)], "dark"),
    ], (0.64, 0.52, 0.24)),
    "bag": _Shape(1.0, [
        ("ring", (0.24, 0.0, 0.76, 0.66, 0.1), "dark"),
        ("rounded", (0.04, 0.34, 0.96, 1.0, 0.12), "body"),
    ], (0.5, 0.68, 0.2)),
    "book": _Shape(0.75, [
        ("rectangle", (0.0, 0.0, 1.0, 1.0), "body"),
        ("rectangle", (0.0, 0.0, 0.14, 1.0), "dark"),
        ("rectangle", (0.92, 0.02, 1.0, 0.98), "paper"),
    ], (0.55, 0.42, 0.26)),
    "clock": _Shape(1.0, [
        ("ellipse", (0.0, 0.0, 1.0, 1.0), "body"),
        ("ellipse", (0.16, 0.16, 0.84, 0.84), "paper"),
    ], (0.5, 0.7, 0.12), mark_on="paper",
        lines=[([(0.5, 0.5), (0.5, 0.24)], 0.05), ([(0.5, 0.5), (0.7, 0.5)], 0.05)]),
    "vase": _Shape(0.6, [
        ("ellipse", (0.0, 0.3, 1.0, 1.0), "body"),
        ("rectangle", (0.3, 0.06, 0.7, 0.5), "body"),
        ("ellipse", (0.18, 0.0, 0.82, 0.12), "body"),
        ("ellipse", (0.3, 0.02, 0.7, 0.09), "dark"),
    ], (0.5, 0.66, 0.3)),
    "bowl": _Shape(1.8, [
        ("pieslice", (0.0, -0.55, 1.0, 1.0), "body"),
        ("ellipse", (0.0, 0.08, 1.0, 0.32), "dark"),
    ], (0.5, 0.64, 0.26)),
}
CATEGORIES = tuple(SHAPES)

# Category prompts in the catalogue's own phrasing ("{}" = the category): the bare word, the marketing words
# that lead some texts, and the colour and pattern words that precede the category in the texts. Their
# embeddings, averaged, are the class embedding of the "templates" prompts of the zero-shot classification.
CLASS_TEMPLATES = ("{}",) + tuple(f"{w} {{}}" for w in PREFIXES) + tuple(f"{c} {{}}" for c in COLOURS) + \
    tuple(f"{p} {{}}" for p in PATTERNS)


def _scaled(coords, w: int, h: int):
    if isinstance(coords, list):
        return [(x * w, y * h) for x, y in coords]
    x0, y0, x1, y1 = coords[:4]
    return [x0 * w, y0 * h, x1 * w - 1, y1 * h - 1]


def _draw_part(draw: ImageDraw.ImageDraw, kind: str, coords, w: int, h: int, fill) -> None:
    if kind == "ellipse":
        draw.ellipse(_scaled(coords, w, h), fill=fill)
    elif kind == "rectangle":
        draw.rectangle(_scaled(coords, w, h), fill=fill)
    elif kind == "rounded":
        draw.rounded_rectangle(_scaled(coords, w, h), radius=coords[4] * min(w, h), fill=fill)
    elif kind == "polygon":
        draw.polygon(_scaled(coords, w, h), fill=fill)
    elif kind == "pieslice":
        draw.pieslice(_scaled(coords, w, h), 0, 180, fill=fill)
    elif kind == "ring":
        draw.arc(_scaled(coords, w, h), 180, 360, fill=fill, width=max(1, round(coords[4] * min(w, h))))
    else:  # pragma: no cover - the table above only uses the kinds handled here
        raise ValueError(kind)


def _shade(rgb, factor: float):
    """factor < 1 darkens, > 1 mixes towards white."""
    if factor <= 1:
        return tuple(int(c * factor) for c in rgb)
    t = factor - 1
    return tuple(int(c + (255 - c) * t) for c in rgb)


def _draw_pattern(draw: ImageDraw.ImageDraw, pattern: str, w: int, h: int, colour) -> None:
    period = max(3 * _SS, round(np.sqrt(w * h) / 4.5))
    if pattern == "striped":
        for y in range(0, h, period):
            draw.rectangle([0, y, w, y + period // 2 - 1], fill=colour)
    elif pattern == "dotted":
        r = max(1, period // 4)
        for row, y in enumerate(range(period // 2, h + period, period)):
            for x in range((period // 2) * (row % 2), w + period, period):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif pattern == "checked":
        half = max(1, period // 2)
        for j, y in enumerate(range(0, h, half)):
            for i, x in enumerate(range(0, w, half)):
                if (i + j) % 2 == 0:
                    draw.rectangle([x, y, x + half - 1, y + half - 1], fill=colour)
    elif pattern in ("zigzag", "wavy"):
        width = max(2, period // 4)
        amp = period / 3
        step = max(1, period // 2) if pattern == "zigzag" else max(1, period // 6)
        for y0 in range(period // 2, h + period, period):
            if pattern == "zigzag":
                pts = [(x, y0 + (amp if (x // step) % 2 else -amp)) for x in range(-step, w + 2 * step, step)]
            else:
                pts = [(x, y0 + amp * np.sin(2 * np.pi * x / period)) for x in range(-step, w + 2 * step, step)]
            draw.line(pts, fill=colour, width=width)


def _draw_mark(draw: ImageDraw.ImageDraw, mark: str, cx: float, cy: float, r: float, fill) -> None:
    if mark == "star":
        pts = []
        for k in range(10):
            a = -np.pi / 2 + k * np.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
        draw.polygon(pts, fill=fill)
    elif mark == "heart":
        q = r * 0.5
        draw.ellipse([cx - r, cy - r * 0.75, cx, cy + r * 0.25 - 1], fill=fill)
        draw.ellipse([cx, cy - r * 0.75, cx + r, cy + r * 0.25 - 1], fill=fill)
        draw.polygon([(cx - r * 0.97, cy - q * 0.1), (cx + r * 0.97, cy - q * 0.1), (cx, cy + r)], fill=fill)
    elif mark == "dot":
        draw.ellipse([cx - r * 0.75, cy - r * 0.75, cx + r * 0.75, cy + r * 0.75], fill=fill)
    elif mark == "check":
        draw.line([(cx - r * 0.8, cy), (cx - r * 0.2, cy + r * 0.65), (cx + r * 0.85, cy - r * 0.7)],
                  fill=fill, width=max(1, round(r * 0.45)), joint="curve")


def _luminance(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


_PAPER = (240, 234, 214)
_METAL = (150, 152, 158)
_INK_DARK = (25, 25, 28)
_INK_LIGHT = (250, 250, 250)


def render_object(spec: tuple, w: int, h: int, mark_min_px: float = 0.0) -> tuple[Image.Image, Image.Image]:
    """The object ``spec = (category, colour, pattern, pattern_colour, mark)`` drawn in a ``w`` x ``h``
    box: (RGB image, L mask). ``mark`` None draws no mark; ``mark_min_px`` > 0 makes the mark's radius at
    least that many output pixels (at most 0.42 of the object's short side)."""
    category, colour, pattern, pattern_colour, mark = spec
    shape = SHAPES[category]
    body = COLOURS[colour]
    W, H = w * _SS, h * _SS
    role_fill = {"dark": _shade(body, 0.55), "light": _shade(body, 1.35), "metal": _METAL, "paper": _PAPER}

    mask = Image.new("L", (W, H), 0)
    body_mask = Image.new("L", (W, H), 0)
    dm, db = ImageDraw.Draw(mask), ImageDraw.Draw(body_mask)
    for kind, coords, role in shape.parts:
        _draw_part(dm, kind, coords, W, H, 0 if role == "cut" else 255)
        _draw_part(db, kind, coords, W, H, 255 if role == "body" else 0)

    img = Image.new("RGB", (W, H), body)
    if pattern != "plain":
        _draw_pattern(ImageDraw.Draw(img), pattern, W, H, COLOURS[pattern_colour])
    # Non-body parts drawn over the pattern, in the table's order, clipped by the body mask afterwards.
    accents = Image.new("RGB", (W, H), body)
    da = ImageDraw.Draw(accents)
    for kind, coords, role in shape.parts:
        if role not in ("body", "cut"):
            _draw_part(da, kind, coords, W, H, role_fill[role])
    img = Image.composite(img, accents, body_mask)
    draw = ImageDraw.Draw(img)

    m = min(W, H)
    for points, width in shape.lines:
        draw.line(_scaled(points, W, H), fill=_INK_DARK, width=max(1, round(width * m)))
    surface = _PAPER if shape.mark_on == "paper" else body
    ink, halo = (_INK_DARK, _INK_LIGHT) if _luminance(surface) > 140 else (_INK_LIGHT, _INK_DARK)
    cx, cy, r = shape.mark
    cx, cy, r = cx * W, cy * H, max(0.7 * r * m, 1.8 * _SS)
    if mark_min_px > 0:
        r = max(r, min(mark_min_px * _SS, 0.42 * m))
    if mark is not None:
        _draw_mark(draw, mark, cx, cy, r * 1.3, halo)
        _draw_mark(draw, mark, cx, cy, r, ink)

    # A dark outline: the silhouette minus its erosion.
    outline = _shade(body, 0.45) if _luminance(body) > 60 else (90, 90, 96)
    edge = mask.point(lambda v: 255 if v else 0)
    ring = ImageChops.subtract(edge, edge.filter(ImageFilter.MinFilter(3)))
    img.paste(outline, mask=ring)

    return img.reduce(_SS), mask.reduce(_SS)


# ---------------------------------------------------------------------------------------------------------
# Product attributes and texts (drawn in the parent process).
# ---------------------------------------------------------------------------------------------------------

def _random_spec(rng: np.random.Generator, category: str | None = None, marks: bool = True) -> tuple:
    if category is None:
        category = CATEGORIES[rng.integers(len(CATEGORIES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    pattern_colour = None
    if pattern != "plain":
        options = _PATTERN_COLOURS[colour]
        pattern_colour = options[rng.integers(len(options))]
    mark = MARKS[rng.integers(len(MARKS))]
    return (category, colour, pattern, pattern_colour, mark if marks else None)


def _variant(rng: np.random.Generator, spec: tuple) -> tuple:
    """The same item with one detail changed (colour, pattern, pattern colour or mark)."""
    category, colour, pattern, pattern_colour, mark = spec
    field = rng.integers(4)
    if field == 3 and mark is None:  # a catalogue without marks changes the colour instead
        field = 0
    if field == 0:
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
    elif field == 1:
        pattern = PATTERNS[rng.integers(len(PATTERNS))]
    elif field == 2 and pattern != "plain":
        pattern_colour = None  # redrawn below
    elif mark is not None:
        mark = MARKS[rng.integers(len(MARKS))]
    if pattern == "plain":
        pattern_colour = None
    elif pattern_colour is None or pattern_colour not in _PATTERN_COLOURS[colour]:
        options = _PATTERN_COLOURS[colour]
        pattern_colour = options[rng.integers(len(options))]
    return (category, colour, pattern, pattern_colour, mark)


def _attribute_space(marks: bool = True) -> int:
    per_category = sum(1 + (len(PATTERNS) - 1) * len(_PATTERN_COLOURS[c]) for c in COLOURS) * \
        (len(MARKS) if marks else 1)
    return per_category * len(CATEGORIES)


def describe(rng: np.random.Generator, spec: tuple) -> str:
    """A catalogue text for ``spec`` (one of a few phrasings, sometimes with a marketing word in front)."""
    category, c, p, pc, m = spec
    if m is None:  # a catalogue without marks
        if p == "plain":
            templates = (f"plain {c} {category}", f"{c} plain {category}", f"plain {category} in {c}",
                         f"{c} {category}, plain")
        else:
            templates = (f"{c} {category} with a {pc} {p} pattern", f"{c} and {pc} {p} {category}",
                         f"{p} {category} in {c} and {pc}", f"{c} {category}, {pc} {p} pattern")
    elif p == "plain":
        templates = (f"plain {c} {category} with a {m} mark",
                     f"{c} plain {category} with a {m} mark",
                     f"plain {category} in {c}, {m} mark",
                     f"{c} {category}, plain, with a {m} mark")
    else:
        templates = (f"{c} {category} with a {pc} {p} pattern and a {m} mark",
                     f"{c} and {pc} {p} {category} with a {m} mark",
                     f"{p} {category} in {c} and {pc}, {m} mark",
                     f"{c} {category}, {pc} {p} pattern, {m} mark")
    text = templates[rng.integers(len(templates))]
    if rng.random() < 0.25:
        text = f"{PREFIXES[rng.integers(len(PREFIXES))]} {text}"
    return text


def _catalogue_specs(products: int, seed: int, family_size: int = 1, marks: bool = True) -> list[tuple[tuple, str]]:
    """(attributes, text) per product: drawn from (seed, index); distinct attributes while the space lasts.
    See :func:`_catalogue` for the families."""
    return [(spec, text) for spec, text, _, _ in _catalogue(products, seed, family_size, marks)]


def _catalogue(products: int, seed: int, family_size: int = 1, marks: bool = True) -> list[tuple]:
    """(attributes, text, family, variant_of) per product.

    ``family_size`` 1: product i is drawn from (seed, i); about a third are variants of an earlier product
    with one attribute changed (``variant_of`` = its index); each product is its own family.
    ``family_size`` K > 1: products i = f K .. f K + K - 1 form family f, drawn from (seed, f): a base item and
    K - 1 others that differ from it in one attribute, the same attribute for the whole family, each with its
    own value (``variant_of`` = the family's first product)."""
    if family_size > 1:
        return _family_catalogue(products, seed, family_size, marks)
    space = _attribute_space(marks)
    used: set[tuple] = set()
    specs: list[tuple] = []
    out = []
    for i in range(products):
        rng = np.random.default_rng([seed, i, 0])
        spec, variant_of = None, None
        for _ in range(200):
            if specs and rng.random() < 0.35:
                parent = int(rng.integers(len(specs)))
                candidate, variant_of = _variant(rng, specs[parent]), parent
            else:
                candidate, variant_of = _random_spec(rng, marks=marks), None
            spec = candidate
            if candidate not in used or len(used) >= space:
                break
        used.add(spec)
        specs.append(spec)
        out.append((spec, describe(rng, spec), i, variant_of))
    return out


def _family_values(spec: tuple, marks: bool) -> dict[str, list]:
    """For each attribute, the other values a family member may take (one attribute changed, all else equal)."""
    category, colour, pattern, pattern_colour, mark = spec
    values = {"colour": [c for c in COLOURS if c != colour and (pattern == "plain" or pattern_colour in
                                                                 _PATTERN_COLOURS[c])],
              "pattern": [p for p in PATTERNS if p != pattern]}
    if pattern != "plain":
        values["pattern_colour"] = [o for o in _PATTERN_COLOURS[colour] if o != pattern_colour]
    if marks:
        values["mark"] = [m for m in MARKS if m != mark]
    return values


def _family_member(spec: tuple, field: str, value, pattern_colour_for_new_pattern) -> tuple:
    category, colour, pattern, pattern_colour, mark = spec
    if field == "colour":
        colour = value
    elif field == "pattern":
        pattern = value
        pattern_colour = None if value == "plain" else (pattern_colour or pattern_colour_for_new_pattern)
    elif field == "pattern_colour":
        pattern_colour = value
    else:
        mark = value
    return (category, colour, pattern, pattern_colour, mark)


def _family_catalogue(products: int, seed: int, family_size: int, marks: bool) -> list[tuple]:
    used: set[tuple] = set()
    out = []
    for family in range(-(-products // family_size)):
        rng = np.random.default_rng([seed, family, 2])
        members = None
        for _ in range(200):
            base = _random_spec(rng, marks=marks)
            options = {f: v for f, v in _family_values(base, marks).items() if len(v) >= family_size - 1}
            if not options:
                continue
            field = sorted(options)[int(rng.integers(len(options)))]
            values = options[field]
            picks = rng.permutation(len(values))[:family_size - 1]
            spare = _PATTERN_COLOURS[base[1]]
            new_pattern_colour = spare[int(rng.integers(len(spare)))]
            members = [base] + [_family_member(base, field, values[int(j)], new_pattern_colour) for j in picks]
            if not any(m in used for m in members):
                break
        used.update(members)
        first = family * family_size
        for j, spec in enumerate(members):
            index = first + j
            if index < products:
                text_rng = np.random.default_rng([seed, index, 0])
                out.append((spec, describe(text_rng, spec), family, None if j == 0 else first))
    return out


# ---------------------------------------------------------------------------------------------------------
# Scenes.
# ---------------------------------------------------------------------------------------------------------

def _object_size(rng: np.random.Generator, category: str, long_side: float) -> tuple[int, int]:
    aspect = SHAPES[category].aspect * float(rng.uniform(0.92, 1.08))
    if aspect >= 1:
        w, h = long_side, long_side / aspect
    else:
        w, h = long_side * aspect, long_side
    return max(4, round(w)), max(4, round(h))


def _paste(canvas: Image.Image, spec: tuple, x: int, y: int, w: int, h: int, mark_min_px: float = 0.0) -> list[int]:
    img, mask = render_object(spec, w, h, mark_min_px)
    canvas.paste(img, (x, y), mask)
    bbox = mask.getbbox() or (0, 0, w, h)
    return [x + bbox[0], y + bbox[1], x + bbox[2], y + bbox[3]]


def _overlap(a, b) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def _find_place(rng, size, prect, others, w, h):
    """A position (x, y) for a w x h object that covers little of the product's rect ``prect`` (at most ~20%
    where possible; the product is drawn last, on top) and of the objects ``others`` (x, y, w, h)."""
    pw, ph = prect[2] - prect[0], prect[3] - prect[1]
    best = None
    for _ in range(25):
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        rect = (x, y, x + w, y + h)
        on_product = _overlap(prect, rect)
        on_others = sum(_overlap((ox, oy, ox + ow, oy + oh), rect) for ox, oy, ow, oh in others)
        score = 3 * on_product + on_others
        if best is None or score < best[0]:
            best = (score, x, y)
        if on_product <= 0.2 * pw * ph and on_others <= 0.3 * w * h:
            break
    return best[1], best[2]


def _place_distractors(rng, size, product_rect, n, frac_range, category, marks=True):
    """Rects (x, y, w, h) and specs of n distractors of other categories, placed to cover little of the
    product's rect and of each other (:func:`_find_place`)."""
    out = []
    px, py, pw, ph = product_rect
    prect = (px, py, px + pw, py + ph)
    others = [c for c in CATEGORIES if c != category]
    for _ in range(n):
        spec = _random_spec(rng, others[rng.integers(len(others))], marks=marks)
        w, h = _object_size(rng, spec[0], size * float(rng.uniform(*frac_range)))
        w, h = min(w, size), min(h, size)
        x, y = _find_place(rng, size, prect, [rect for _, *rect in out], w, h)
        out.append((spec, x, y, w, h))
    return out


def _same_category_distractor(rng, size, spec, product_rect, placed, frac_range, marks):
    """One more distractor of the product's own category with other attributes, of the product's size."""
    other = spec
    for _ in range(50):
        other = _random_spec(rng, spec[0], marks=marks)
        if other != spec:
            break
    w, h = _object_size(rng, spec[0], size * float(rng.uniform(*frac_range)))
    w, h = min(w, size), min(h, size)
    px, py, pw, ph = product_rect
    x, y = _find_place(rng, size, (px, py, px + pw, py + ph), [rect for _, *rect in placed], w, h)
    return (other, x, y, w, h)


def _merchant_background(rng, size):
    base = rng.integers(228, 253)
    tint = rng.integers(-5, 6, size=3)
    return Image.new("RGB", (size, size), tuple(int(np.clip(base + t, 0, 255)) for t in tint))


def _ad_background(rng, size):
    a = rng.integers(60, 250, size=3).astype(np.float32)
    b = rng.integers(60, 250, size=3).astype(np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    vertical = rng.random() < 0.5
    ramp = np.broadcast_to(t[:, None] if vertical else t[None, :], (size, size))
    arr = a[None, None, :] * (1 - ramp[..., None]) + b[None, None, :] * ramp[..., None]
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 3))):
        cx, cy, r = rng.integers(0, size, size=2).tolist() + [int(rng.integers(size // 6, size // 2))]
        colour = tuple(int(v) for v in rng.integers(80, 256, size=3))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    if rng.random() < 0.5:  # a banner strip
        y = int(rng.integers(0, size - size // 6))
        draw.rectangle([0, y, size, y + size // 8], fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
    return img


def _customer_background(rng, size):
    base = rng.integers(50, 200, size=3)
    coarse = rng.integers(-45, 46, size=(6, 6, 3)).astype(np.int16) + base.astype(np.int16)
    img = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8), "RGB").resize((size, size), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 13))):
        x0, y0 = rng.integers(-size // 4, size, size=2).tolist()
        dx, dy = rng.integers(size // 10, size // 2, size=2).tolist()
        colour = tuple(int(v) for v in rng.integers(20, 236, size=3))
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle([x0, y0, x0 + dx, y0 + dy], fill=colour)
        elif kind == 1:
            draw.ellipse([x0, y0, x0 + dx, y0 + dy], fill=colour)
        else:
            draw.line([(x0, y0), (x0 + dx, y0 + dy)], fill=colour, width=max(1, size // 32))
    return img


def _add_noise(rng, img, sigma):
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0.0, sigma, size=(img.height, img.width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def render_scene(rng: np.random.Generator, spec: tuple, source: str, size: int,
                 options: SynthOptions = SynthOptions()):
    """(image, product box, distractor boxes) of one image of the product ``spec`` from ``source``."""
    img, box, distractors, _ = _render_scene(rng, spec, source, size, options)
    return img, box, distractors


def _render_scene(rng, spec, source, size, options):
    """:func:`render_scene`, plus the category of each distractor."""
    category = spec[0]
    mark_px = options.mark_min_px
    if source == "merchant":
        img = _merchant_background(rng, size)
        w, h = _object_size(rng, category, size * float(rng.uniform(0.68, 0.88)))
        w, h = min(w, size), min(h, size)
        jitter = max(1, size // 16)
        x = int(np.clip((size - w) // 2 + rng.integers(-jitter, jitter + 1), 0, size - w))
        y = int(np.clip((size - h) // 2 + rng.integers(-jitter, jitter + 1), 0, size - h))
        bg = img.getpixel((0, 0))
        shadow = tuple(int(c * 0.86) for c in bg)
        sy = min(size - 1, y + h)
        ImageDraw.Draw(img).ellipse([x + w * 0.1, sy - max(2, h * 0.06), x + w * 0.9, sy + max(1, h * 0.04)],
                                    fill=shadow)
        box = _paste(img, spec, x, y, w, h, mark_px)
        return img, box, [], []

    if source == "customer":
        img = _customer_background(rng, size)
        product_range = (0.24, 0.4)
        w, h = _object_size(rng, category, size * float(rng.uniform(*product_range)))
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        placed = _place_distractors(rng, size, (x, y, w, h), int(rng.integers(2, 5)), (0.22, 0.45), category,
                                    options.marks)
        sigma = float(rng.uniform(5.0, 14.0))
        if options.same_category_distractor > 0 and rng.random() < options.same_category_distractor:
            placed.append(_same_category_distractor(rng, size, spec, (x, y, w, h), placed, product_range,
                                                    options.marks))
    else:  # ad
        img = _ad_background(rng, size)
        w, h = _object_size(rng, category, size * float(rng.uniform(0.46, 0.64)))
        w, h = min(w, size), min(h, size)
        spread = size // 5
        x = int(np.clip((size - w) // 2 + rng.integers(-spread, spread + 1), 0, size - w))
        y = int(np.clip((size - h) // 2 + rng.integers(-spread, spread + 1), 0, size - h))
        placed = _place_distractors(rng, size, (x, y, w, h), int(rng.integers(0, 3)), (0.2, 0.34), category,
                                    options.marks)
        sigma = 0.0
    distractors = [_paste(img, d_spec, dx, dy, dw, dh, mark_px) for d_spec, dx, dy, dw, dh in placed]
    box = _paste(img, spec, x, y, w, h, mark_px)
    if sigma:
        img = _add_noise(rng, img, sigma)
    return img, box, distractors, [d_spec[0] for d_spec, *_ in placed]


# ---------------------------------------------------------------------------------------------------------
# The catalogue.
# ---------------------------------------------------------------------------------------------------------

def _product_id(index: int) -> str:
    return f"p{index:06d}"


def _make_product(job) -> tuple[Product, list[list[str]]]:
    out_dir, index, spec, text, images_per_product, size, seed, options = job
    rng = np.random.default_rng([seed, index, 1])
    pid = _product_id(index)
    images, distractor_categories = [], []
    for k in range(images_per_product):
        source = SOURCES[k % len(SOURCES)]
        img, box, distractors, categories = _render_scene(rng, spec, source, size, options)
        rel = f"images/{pid}_{k}.png"
        img.save(os.path.join(out_dir, rel), format="PNG", compress_level=1)
        images.append(ProductImage(rel, source, box, distractors))
        distractor_categories.append(categories)
    return Product(pid, text, spec[0], images), distractor_categories


def _write_atomic(path: str, write) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        write(f)
    os.replace(tmp, path)


def generate_catalogue(out_dir: str, products: int, images_per_product: int = 3, size: int = 64,
                       seed: int = 0, workers: int | None = None, *, same_category_distractor: float = 0.0,
                       family_size: int = 1, mark_min_px: float = 0.0, marks: bool = True) -> str:
    """Write ``out_dir/catalogue.jsonl``, ``out_dir/images/*.png``, ``out_dir/attributes.jsonl`` and
    ``out_dir/synth.json`` for ``products`` synthetic products with ``images_per_product`` images of ``size``
    x ``size`` pixels each; returns the manifest's path. The keyword options are described in the module
    docstring (:class:`SynthOptions`).

    ``workers`` processes render the images (default ``os.cpu_count()``; 1 renders in this process). The
    output depends only on the arguments other than ``workers``.
    """
    if products < 0:
        raise ValueError(f"products must be >= 0, got {products}")
    if images_per_product < 1:
        raise ValueError(f"images_per_product must be >= 1, got {images_per_product}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    options = SynthOptions(float(same_category_distractor), int(family_size), float(mark_min_px), bool(marks))
    options.check()
    if workers is None:
        workers = os.cpu_count() or 1
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)

    catalogue = _catalogue(products, seed, options.family_size, options.marks)
    jobs = [(out_dir, i, spec, text, images_per_product, size, seed, options)
            for i, (spec, text, _, _) in enumerate(catalogue)]
    workers = max(1, min(int(workers), len(jobs)))
    if workers == 1:
        result = [_make_product(job) for job in jobs]
    else:
        # forkserver: workers start from a clean process, not a fork of a caller that may run threads.
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        chunksize = max(1, min(64, len(jobs) // (workers * 8)))
        with multiprocessing.get_context(method).Pool(workers) as pool:
            result = list(pool.imap(_make_product, jobs, chunksize=chunksize))

    fields = ("category", "colour", "pattern", "pattern_colour", "mark")

    def write_attributes(f):
        for (product, categories), (spec, _, family, variant_of) in zip(result, catalogue):
            row = {"product_id": product.product_id, "family": family,
                   "variant_of": None if variant_of is None else _product_id(variant_of),
                   "attributes": dict(zip(fields, spec)), "distractor_categories": categories}
            f.write(json.dumps(row, separators=(",", ":")) + "\n")

    _write_atomic(os.path.join(out_dir, ATTRIBUTES_NAME), write_attributes)
    settings = {"products": products, "images_per_product": images_per_product, "size": size, "seed": seed,
                **dataclasses.asdict(options)}
    _write_atomic(os.path.join(out_dir, SETTINGS_NAME), lambda f: f.write(json.dumps(settings, indent=1) + "\n"))
    path = os.path.join(out_dir, MANIFEST_NAME)
    tmp = path + ".tmp"
    write_manifest(tmp, [product for product, _ in result])
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    """``eclip-data synth``: generate a synthetic catalogue and print a one-line summary."""
    parser = argparse.ArgumentParser(prog="eclip-data synth", description="Generate a synthetic product catalogue "
                                     "(catalogue.jsonl + images/*.png) for ECLIP.")
    parser.add_argument("--products", type=int, default=1000, help="number of products (default 1000)")
    parser.add_argument("--images-per-product", type=int, default=3, help="images per product (default 3)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all CPUs)")
    parser.add_argument("--same-category-distractor", type=float, default=0.0, metavar="P",
                        help="share of customer photos with one more distractor of the product's own category "
                             "(default 0)")
    parser.add_argument("--family-size", type=int, default=1, metavar="K",
                        help=f"variant families of K products that differ in one attribute (2..{MAX_FAMILY_SIZE}; "
                             "default 1: no families)")
    parser.add_argument("--mark-min-px", type=float, default=0.0, metavar="R",
                        help="smallest radius of the mark in output pixels (default 0: about 2-3 px on customer "
                             "photos at 64 px)")
    parser.add_argument("--no-marks", action="store_true", help="no mark: neither drawn nor in the texts")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        path = generate_catalogue(args.out, args.products, args.images_per_product, args.size, args.seed,
                                  args.workers, same_category_distractor=args.same_category_distractor,
                                  family_size=args.family_size, mark_min_px=args.mark_min_px,
                                  marks=not args.no_marks)
    except ValueError as exc:
        parser.error(str(exc))
    elapsed = time.perf_counter() - start
    print(f"wrote {args.products} products, {args.products * args.images_per_product} images "
          f"({args.size}x{args.size}) to {path} in {elapsed:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
