"""Scale schedules: the official aspect-ratio templates and their next-scale token grids.

A scale schedule is a list of `(1, h, w)` tuples of Python ints, coarse to fine. The image is
`16*h_last x 16*w_last` pixels. Tiers keep a prefix of the 1M schedule of a template.
Only these 60 schedules are valid (the RoPE table is keyed by them).
"""
from __future__ import annotations

# h/w template -> the 13 (h, w) token grids of its 1M schedule (infinity/utils/dynamic_resolution.py).
_BASE = {
    1.0: [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)],
    1.25: [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)],
    1.333: [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)],
    1.5: [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)],
    1.75: [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)],
    2.0: [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)],
    2.5: [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)],
    3.0: [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)],
}

TIERS = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


def _build_templates() -> dict[float, list[tuple[int, int]]]:
    out: dict[float, list[tuple[int, int]]] = {}
    for ratio, grids in _BASE.items():
        out[ratio] = grids
        if ratio != 1.0:
            # Transposed ratios are keyed by int(1000/ratio)/1000: truncated, as upstream (0.666, 0.571, 0.333).
            out[int(1000 / ratio) / 1000] = [(w, h) for h, w in grids]
    return out


TEMPLATES: dict[float, list[tuple[int, int]]] = _build_templates()
# Official order: 1.0, 1.25, 0.8, 1.333, 0.75, ... (each ratio followed by its transpose).
H_DIV_W_TEMPLATES: list[float] = list(TEMPLATES)

Schedule = list  # list[tuple[int, int, int]]


def nearest_template(h_div_w: float) -> float:
    """The template nearest to a height/width ratio; the first one wins ties (numpy argmin)."""
    if not (h_div_w > 0 and h_div_w != float("inf")):
        raise ValueError(f"aspect ratio h/w must be a positive finite number, got {h_div_w!r}")
    return min(H_DIV_W_TEMPLATES, key=lambda t: abs(t - h_div_w))


def _check_tier(tier: str) -> None:
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {list(TIERS)}")


def get_schedule(h_div_w: float, tier: str = "1M") -> Schedule:
    """The `(1,h,w)` schedule of the template nearest to `h_div_w` at a tier."""
    _check_tier(tier)
    grids = TEMPLATES[nearest_template(h_div_w)]
    return [(1, h, w) for h, w in grids[: TIERS[tier]]]


def schedule_for_size(width: int, height: int, tier: str | None = None) -> tuple[Schedule, float, str]:
    """Snap a width/height to the nearest template and (if no tier is given) the tier whose pixel
    area is nearest. Returns (schedule, template, tier)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    template = nearest_template(height / width)
    if tier is None:
        area = width * height
        tier = min(TIERS, key=lambda t: abs(_pixels_of(template, t)[0] * _pixels_of(template, t)[1] - area))
    return get_schedule(template, tier), template, tier


def _pixels_of(template: float, tier: str) -> tuple[int, int]:
    h, w = TEMPLATES[template][TIERS[tier] - 1]
    return 16 * h, 16 * w


def image_size(schedule: Schedule) -> tuple[int, int]:
    """(height, width) in pixels of the image a schedule draws (stride 16 per token)."""
    _, h, w = schedule[-1]
    return 16 * h, 16 * w


def token_count(schedule: Schedule) -> int:
    return sum(t * h * w for t, h, w in schedule)


def template_of(schedule: Schedule) -> float:
    """The template whose table holds this schedule; raises ValueError if it is not a valid schedule."""
    key = [(int(h), int(w)) for _, h, w in schedule]
    for ratio, grids in TEMPLATES.items():
        if len(key) in TIERS.values() and grids[: len(key)] == key:
            return ratio
    raise ValueError(
        f"scale schedule {[tuple(s) for s in schedule]} is not one of the official 60 schedules "
        f"(15 aspect templates x tiers {list(TIERS)}); use get_schedule(h_div_w, tier)")


def tier_of(schedule: Schedule) -> str:
    template_of(schedule)
    return {n: t for t, n in TIERS.items()}[len(schedule)]


def vae_schedule(schedule: Schedule, patchify: bool) -> Schedule:
    """The VAE latent grid of each scale: 2x the token grid when 2x2 patchify is on (8B)."""
    f = 2 if patchify else 1
    return [(t, f * h, f * w) for t, h, w in schedule]
