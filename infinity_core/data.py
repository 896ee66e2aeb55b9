"""Training data: the official jsonl layout grouped by aspect-ratio template, and a deterministic
synthetic "shapes" source with plain-English captions (the data of the bundled tiny model).

Official jsonl layout (spec 6.3): files named `<h_div_w_template>_<num>.jsonl`, one JSON object per
line with `image_path`, `h_div_w`, `long_caption`, `long_caption_type`, `text` (short caption).
Caption choice per sample: the short one with probability `short_cap_prob`, else a prefix of at
least one sentence of the long caption; anything after `--` is dropped. Images are resized to cover
the template's pixel size and centre-cropped (vae.preprocess_image). A batch never mixes templates.

Synthetic shapes: a scene is a background colour and one or two objects, each an upright circle,
square, triangle or star of a palette colour, a size and a position; scene i of a seed is a pure
function of (seed, i), so the data needs no files and is identical everywhere. Captions:

    "a small red circle on the left, blue background"
    "a large green star at the top and a small white square at the bottom, black background"
    "two small yellow triangles, left and right, purple background"

Held-out split: an object is held out when its (shape, colour, background) triple satisfies
`(shape + 2 colour + 3 background) % 7 == 3` (indices into SHAPES / COLOURS). Training scenes never
contain a held-out object; evaluation scenes contain only held-out objects, so every evaluation
prompt is a combination the model never saw, while every pair of its attributes was seen.
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import schedules as S

# ------------------------------------------------------------------------------------------------
# vocabulary

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOUR_NAMES = list(COLOURS)
SHAPES = ["circle", "square", "triangle", "star"]
POSITIONS = ["left", "right", "top", "bottom", "centre"]
SIZES = ["small", "large"]
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
                   "bottom": "at the bottom", "centre": "in the centre"}
POSITION_CENTRE = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
                   "centre": (0.5, 0.5)}  # (x, y) as fractions of (width, height)
PAIR_LAYOUTS = [("left", "right"), ("top", "bottom")]
SIZE_RADIUS = {"small": 0.105, "large": 0.17}  # base radius r as a fraction of min(height, width)
POS_JITTER = 0.03          # +- fraction of the image size
RADIUS_JITTER = 0.08       # +- relative
COLOUR_JITTER = 8          # +- per channel (uniform integers)
CAPTION_WORDS = sorted({w for p in POSITION_PHRASE.values() for w in p.split()} | set(COLOURS) | set(SHAPES)
                       | {s + "s" for s in SHAPES} | set(SIZES) | set(POSITIONS)
                       | {"a", "and", "two", "background", ","})


def is_held_out(shape: str, colour: str, background: str) -> bool:
    """The held-out rule on (shape, object colour, background colour) triples (~1/7 of them)."""
    return (SHAPES.index(shape) + 2 * COLOUR_NAMES.index(colour) + 3 * COLOUR_NAMES.index(background)) % 7 == 3


# ------------------------------------------------------------------------------------------------
# scenes

@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple           # of ShapeObject, 1 or 2
    identical_pair: bool = False  # two identical objects, captioned "two small red circles, ..."

    def caption(self) -> str:
        bg = f"{self.background} background"
        if self.identical_pair:
            o1, o2 = self.objects
            return f"two {o1.size} {o1.colour} {o1.shape}s, {o1.position} and {o2.position}, {bg}"
        parts = [f"a {o.size} {o.colour} {o.shape} {POSITION_PHRASE[o.position]}" for o in self.objects]
        return f"{' and '.join(parts)}, {bg}"

    def held_out_objects(self) -> list[bool]:
        return [is_held_out(o.shape, o.colour, self.background) for o in self.objects]

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects],
                "identical_pair": self.identical_pair, "caption": self.caption()}

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        return Scene(d["background"], tuple(ShapeObject(**o) for o in d["objects"]), bool(d.get("identical_pair")))


def sample_scene(rng: random.Random, split: str = "train", p_two: float = 0.3, p_identical: float = 0.3) -> Scene:
    """A random scene of a split: 'train' (no held-out object), 'heldout' (only held-out objects) or
    'any'. Rejection sampling; deterministic given the rng state."""
    if split not in ("train", "heldout", "any"):
        raise ValueError(f"split {split!r}: expected 'train', 'heldout' or 'any'")
    while True:
        bg = rng.choice(COLOUR_NAMES)
        colours = [c for c in COLOUR_NAMES if c != bg]
        if rng.random() < p_two:
            layout = rng.choice(PAIR_LAYOUTS)
            if rng.random() < p_identical:
                shape, colour, size = rng.choice(SHAPES), rng.choice(colours), rng.choice(SIZES)
                objs = tuple(ShapeObject(shape, colour, size, p) for p in layout)
                scene = Scene(bg, objs, identical_pair=True)
            else:
                objs = tuple(ShapeObject(rng.choice(SHAPES), rng.choice(colours), rng.choice(SIZES), p)
                             for p in layout)
                if objs[0].shape == objs[1].shape and objs[0].colour == objs[1].colour \
                        and objs[0].size == objs[1].size:
                    continue  # would read better as "two ..."; keep captions unambiguous
                scene = Scene(bg, objs)
        else:
            scene = Scene(bg, (ShapeObject(rng.choice(SHAPES), rng.choice(colours), rng.choice(SIZES),
                                           rng.choice(POSITIONS)),))
        held = scene.held_out_objects()
        if split == "any" or (split == "train" and not any(held)) or (split == "heldout" and all(held)):
            return scene


# ------------------------------------------------------------------------------------------------
# geometry and rendering (shared with the analyzer in shapes_eval)

def shape_outline(shape: str, n: int = 0) -> list[tuple[float, float]] | None:
    """The shape's outline in its unit bounding box [0,1]^2 (upright), or None for the circle
    (an ellipse filling the box). Used both to draw and to recognise shapes."""
    if shape == "circle":
        return None
    if shape == "square":
        return [(0, 0), (1, 0), (1, 1), (0, 1)]
    if shape == "triangle":
        pts = [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in (-90, 30, 150)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.45
            a = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return [((x - x0) / (x1 - x0), (y - y0) / (y1 - y0)) for x, y in pts]


# bounding-box half extents (x, y) of each shape in units of its base radius r: the shapes are
# scaled so their areas are comparable (square half-side 0.9 r, triangle/star circumradius 1.25 r).
def _half_extent(shape: str) -> tuple[float, float]:
    if shape == "circle":
        return 1.0, 1.0
    if shape == "square":
        return 0.9, 0.9
    R = 1.25
    if shape == "triangle":
        return R * math.sqrt(3) / 2, R * 0.75
    if shape == "star":
        return R * math.sin(math.radians(72)), R * (1 + math.cos(math.radians(36))) / 2
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    """Draw a filled shape fitting box (x0, y0, x1, y1) in pixel coordinates."""
    x0, y0, x1, y1 = box
    outline = shape_outline(shape)
    if outline is None:
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    else:
        draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in outline], fill=fill)


def object_box(obj: ShapeObject, height: int, width: int, rng: random.Random | None = None):
    """Pixel bounding box (x0, y0, x1, y1) of an object, with the scene's jitter drawn from rng."""
    jx = jy = jr = 0.0
    if rng is not None:
        jx, jy = rng.uniform(-POS_JITTER, POS_JITTER), rng.uniform(-POS_JITTER, POS_JITTER)
        jr = rng.uniform(-RADIUS_JITTER, RADIUS_JITTER)
    fx, fy = POSITION_CENTRE[obj.position]
    cx, cy = (fx + jx) * width, (fy + jy) * height
    r = SIZE_RADIUS[obj.size] * (1 + jr) * min(height, width)
    hx, hy = _half_extent(obj.shape)
    return cx - hx * r, cy - hy * r, cx + hx * r, cy + hy * r


def _jitter_colour(rgb, rng: random.Random | None):
    if rng is None:
        return tuple(rgb)
    return tuple(int(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER)))) for c in rgb)


def render_scene(scene: Scene, height: int = 256, width: int = 256, rng: random.Random | None = None,
                 supersample: int = 2) -> np.ndarray:
    """Scene -> RGB uint8 [height, width, 3]. Drawn at `supersample`x and box-filtered down
    (anti-aliased edges). rng adds the position/size/colour jitter (None: nominal scene)."""
    s = supersample
    img = Image.new("RGB", (width * s, height * s), _jitter_colour(COLOURS[scene.background], rng))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        x0, y0, x1, y1 = object_box(obj, height, width, rng)
        draw_shape(draw, obj.shape, (x0 * s, y0 * s, x1 * s, y1 * s), _jitter_colour(COLOURS[obj.colour], rng))
    if s > 1:
        img = img.reduce(s)
    return np.asarray(img, dtype=np.uint8)


def to_model_image(rgb_u8: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] fp32 in [-1, 1] (the official normalisation)."""
    x = torch.from_numpy(np.array(rgb_u8, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div(255)
    return x + x - 1


# ------------------------------------------------------------------------------------------------
# the synthetic source

class SyntheticShapes:
    """Deterministic, infinite captioned shapes: item i of a seed is always the same scene, jitter
    and picture. `templates`: h/w templates to draw from (1:1 by default); `tier`: pixel size tier.
    Item i uses template templates[i % len(templates)], so batches can be grouped by template."""

    def __init__(self, seed: int = 0, split: str = "train", tier: str = "0.06M", templates: Sequence[float] = (1.0,),
                 p_two: float = 0.3, p_identical: float = 0.3):
        self.seed, self.split, self.tier = int(seed), split, tier
        self.templates = [S.nearest_template(t) for t in templates]
        self.p_two, self.p_identical = p_two, p_identical
        self.schedules = {t: S.get_schedule(t, tier) for t in self.templates}

    def _rng(self, i: int) -> random.Random:
        return random.Random(f"shapes/{self.seed}/{self.split}/{int(i)}")

    def template_of(self, i: int) -> float:
        return self.templates[i % len(self.templates)]

    def scene(self, i: int) -> Scene:
        return sample_scene(self._rng(i), self.split, self.p_two, self.p_identical)

    def item(self, i: int) -> dict:
        rng = self._rng(i)
        scene = sample_scene(rng, self.split, self.p_two, self.p_identical)
        H, W = S.image_size(self.schedules[self.template_of(i)])
        rgb = render_scene(scene, H, W, rng)
        return {"image": to_model_image(rgb), "caption": scene.caption(), "scene": scene,
                "template": self.template_of(i)}

    def batch(self, indices: Sequence[int]) -> dict:
        """Items of one template -> {'image': [B,3,H,W], 'caption': [str], 'scene': [Scene]}."""
        items = [self.item(i) for i in indices]
        if len({it["template"] for it in items}) != 1:
            raise ValueError("a batch must hold one template; use indices with the same i % len(templates)")
        return {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items],
                "scene": [it["scene"] for it in items], "template": items[0]["template"]}

    def captions(self, n: int) -> list[str]:
        return [self.scene(i).caption() for i in range(n)]


def caption_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Captions of every split (for training the tokenizer on the whole caption vocabulary)."""
    rng = random.Random(f"corpus/{seed}")
    return [sample_scene(rng, "any").caption() for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# the official jsonl layout

_TEMPLATE_FILE = re.compile(r"^(\d+(?:\.\d+)?)_\d+\.jsonl$")


def choose_caption(record: dict, rng: random.Random, short_cap_prob: float = 0.5) -> str:
    """The official caption choice: short `text` with probability short_cap_prob (or if there is no
    long caption), else a prefix of >= 1 sentence of `long_caption`; text after '--' is dropped."""
    short = str(record.get("text") or "").strip()
    long = str(record.get("long_caption") or "").strip()
    if long and (not short or rng.random() >= short_cap_prob):
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", long) if s]
        k = rng.randint(1, len(sentences)) if len(sentences) > 1 else 1
        cap = " ".join(sentences[:k])
    else:
        cap = short
    return cap.split("--")[0].strip()


class JsonlImageText:
    """Images + captions in the official jsonl layout, grouped by aspect-ratio template.

    `root`: a folder of `<template>_<num>.jsonl` files (or a list of jsonl files). A record's template
    is the file name's (if it is a template) else the template nearest to its `h_div_w`. Relative
    image paths are resolved against `image_root` (default: the jsonl file's folder)."""

    def __init__(self, root, tier: str = "0.06M", image_root=None, short_cap_prob: float = 0.5,
                 templates: Sequence[float] | None = None):
        files = sorted(Path(root).glob("*.jsonl")) if Path(root).is_dir() else [Path(p) for p in
                                                                               ([root] if isinstance(root, (str, Path)) else root)]
        if not files:
            raise FileNotFoundError(f"{root}: no .jsonl files")
        self.tier, self.short_cap_prob = tier, short_cap_prob
        self.records: list[dict] = []
        self.groups: dict[float, list[int]] = {}
        for f in files:
            m = _TEMPLATE_FILE.match(f.name)
            file_template = S.nearest_template(float(m.group(1))) if m else None
            base = Path(image_root) if image_root is not None else f.parent
            with open(f, encoding="utf-8") as fh:
                for ln, line in enumerate(fh, 1):
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{f}:{ln}: not JSON ({e})") from None
                    if "image_path" not in rec:
                        raise ValueError(f"{f}:{ln}: record without 'image_path'")
                    t = file_template if file_template is not None else S.nearest_template(float(rec.get("h_div_w", 1.0)))
                    if templates is not None and t not in templates:
                        continue
                    p = Path(rec["image_path"])
                    rec = dict(rec, image_path=str(p if p.is_absolute() else base / p), template=t)
                    self.groups.setdefault(t, []).append(len(self.records))
                    self.records.append(rec)
        if not self.records:
            raise ValueError(f"{root}: no records")

    def __len__(self) -> int:
        return len(self.records)

    def item(self, i: int, rng: random.Random) -> dict:
        from .vae import preprocess_image
        rec = self.records[i]
        H, W = S.image_size(S.get_schedule(rec["template"], self.tier))
        with Image.open(rec["image_path"]) as im:
            img = preprocess_image(im, H, W)[0]
        return {"image": img, "caption": choose_caption(rec, rng, self.short_cap_prob), "template": rec["template"]}

    def batch(self, indices: Sequence[int], rng: random.Random) -> dict:
        items = [self.item(i, rng) for i in indices]
        if len({it["template"] for it in items}) != 1:
            raise ValueError("a batch must hold one template")
        return {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items],
                "template": items[0]["template"]}


class TemplateBatchSampler:
    """Batches of one template each, reshuffled every epoch, sharded over `world_size` ranks
    (rank r takes every world_size-th batch). Deterministic in (seed, epoch); resumable by step."""

    def __init__(self, groups: dict, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True):
        self.groups = {t: list(ix) for t, ix in groups.items() if ix}
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.drop_last = drop_last

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"batches/{self.seed}/{epoch}")
        batches = []
        for t in sorted(self.groups):
            ix = list(self.groups[t])
            rng.shuffle(ix)
            for a in range(0, len(ix), self.batch_size):
                b = ix[a:a + self.batch_size]
                if len(b) == self.batch_size or (b and not self.drop_last):
                    batches.append(b)
        rng.shuffle(batches)
        n = len(batches) - len(batches) % self.world_size
        return batches[self.rank:n:self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        epoch = 0
        while True:
            bs = self.epoch_batches(epoch)
            if not bs:
                raise ValueError("not enough samples for one batch per rank")
            yield from bs
            epoch += 1

    def batch_at(self, step: int) -> tuple[int, list[int]]:
        """(epoch, indices) of this rank's batch number `step` (for resuming). Every epoch has the
        same number of batches, so this is O(1) epochs of work."""
        if not hasattr(self, "_per_epoch"):
            self._per_epoch = len(self.epoch_batches(0))
        per_epoch = self._per_epoch
        if per_epoch == 0:
            raise ValueError("not enough samples for one batch per rank")
        epoch = step // per_epoch
        if getattr(self, "_cached", (None,))[0] != epoch:
            self._cached = (epoch, self.epoch_batches(epoch))
        return epoch, self._cached[1][step % per_epoch]
