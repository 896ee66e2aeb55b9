"""Infinity Scale Schedule: choose one of Infinity's 60 valid output sizes (15 aspect-ratio templates
x 4 pixel-budget tiers) and hand its scale schedule to the sampler.

This module only translates between ComfyUI values and infinity_core.schedules; every rule about
templates, tiers and snapping lives there.
"""
from __future__ import annotations

from fractions import Fraction

from comfy_api.latest import io

from ..infinity_core import schedules

# The custom socket type carrying a scale schedule between Infinity nodes. Its value is a dict:
#   {"schedule": [(1, h, w), ...] coarse to fine, "template": h/w template (float),
#    "tier": "0.06M" | "0.25M" | "0.60M" | "1M", "height": px, "width": px}
SCALE_SCHEDULE_TYPE = "INFINITY_SCALE_SCHEDULE"
ScaleSchedule = io.Custom(SCALE_SCHEDULE_TYPE)

MODE_ASPECT = "aspect ratio"
MODE_SIZE = "width/height"
MODES = [MODE_ASPECT, MODE_SIZE]
TIERS = list(schedules.TIERS)  # 0.06M, 0.25M, 0.60M, 1M
DEFAULT_TIER = "1M"


def ratio_label(template: float) -> str:
    """'W:H' in small integers for an h/w template: 0.571 -> '7:4', 1.333 -> '3:4'."""
    h_div_w = Fraction(template).limit_denominator(10)
    return f"{h_div_w.denominator}:{h_div_w.numerator}"


def aspect_label(template: float) -> str:
    """Combo label of a template: its W:H ratio and its pixel size at the largest (1M) tier."""
    height, width = schedules.image_size(schedules.get_schedule(template, DEFAULT_TIER))
    return f"{ratio_label(template)} ({width}x{height})"


# Combo label -> template, in the official template order (1:1 first, then each portrait ratio
# followed by its landscape transpose). The labels are stored in saved workflows: keep them stable.
ASPECT_LABELS: dict[str, float] = {aspect_label(t): t for t in schedules.H_DIV_W_TEMPLATES}
DEFAULT_ASPECT = aspect_label(1.0)


def schedule_value(schedule: list, template: float, tier: str) -> dict:
    """The INFINITY_SCALE_SCHEDULE value for a schedule from infinity_core."""
    height, width = schedules.image_size(schedule)
    return {"schedule": [tuple(int(v) for v in s) for s in schedule], "template": template, "tier": tier,
            "height": height, "width": width}


def _check_choice(name: str, value, options) -> None:
    # ComfyUI 0.3.75 does not check V3 combo values against their options at POST /prompt (only V1
    # list-typed combos are checked), so an API client can send anything: refuse it clearly here.
    if value not in options:
        raise ValueError(f"Infinity Scale Schedule: {name} {value!r} is not one of {list(options)}")


# 'width/height' requests are snapped to the nearest of the 60 sizes. A request so far from all of them
# that the snapped image would not resemble it is refused instead ("absurd"): an aspect ratio beyond
# 1:MAX_RATIO or MAX_RATIO:1 (twice the widest/tallest template, 1:3 and 3:1), or a pixel count more
# than MAX_AREA_FACTOR times off the snapped size (each side off by more than 4x: below 64x64 or above
# 4096x4096 for 1:1). web/schedule_math.js applies the same rule.
MAX_RATIO = 6.0
MAX_AREA_FACTOR = 16.0


def absurd_size_error(width: int, height: int) -> str | None:
    """Why width x height cannot be snapped to a valid size, or None when it can."""
    if width <= 0 or height <= 0:
        return f"width and height must be positive, got {width}x{height}"
    if max(width / height, height / width) > MAX_RATIO:
        return (f"{width}x{height} has an aspect ratio (width:height) of {_ratio_text(width, height)}; Infinity "
                f"draws ratios from 1:3 to 3:1, and a request beyond 1:{MAX_RATIO:g} or {MAX_RATIO:g}:1 is refused "
                f"rather than distorted. Ask for a ratio in that range (it is snapped to the nearest template)")
    schedule, template, tier = schedules.schedule_for_size(width, height)
    sh, sw = schedules.image_size(schedule)
    factor = max(sh * sw / (width * height), width * height / (sh * sw))
    if factor > MAX_AREA_FACTOR:
        side = "smallest" if sh * sw > width * height else "largest"
        return (f"{width}x{height} ({width * height:,} pixels) is far from every size Infinity draws: the {side} "
                f"size at this ratio is {sw}x{sh} ({sh * sw:,} pixels, {factor:.0f}x "
                f"{'more' if side == 'smallest' else 'fewer'}). Sizes are snapped only within a factor "
                f"{MAX_AREA_FACTOR:g} of the pixel count: ask for between about "
                f"{_tier_bound(template, '0.06M', 1 / MAX_AREA_FACTOR)} and "
                f"{_tier_bound(template, '1M', MAX_AREA_FACTOR)}, or use 'aspect ratio' mode")
    return None


def _ratio_text(width: int, height: int) -> str:
    r = max(width, height) / min(width, height)
    r_text = f"{r:.0f}" if r >= 10 else f"{r:.2f}".rstrip("0").rstrip(".")
    return f"{r_text}:1" if width >= height else f"1:{r_text}"


def _tier_bound(template: float, tier: str, area_factor: float) -> str:
    h, w = schedules.image_size(schedules.get_schedule(template, tier))
    k = area_factor ** 0.5
    return f"{round(w * k)}x{round(h * k)}"


def resolve(mode: str, aspect_ratio: str, tier: str, width: int, height: int) -> dict:
    """Translate the node's widget values into an INFINITY_SCALE_SCHEDULE value."""
    _check_choice("mode", mode, MODES)
    _check_choice("aspect_ratio", aspect_ratio, ASPECT_LABELS)
    _check_choice("tier", tier, TIERS)
    if mode == MODE_ASPECT:
        template = ASPECT_LABELS[aspect_ratio]
        return schedule_value(schedules.get_schedule(template, tier), template, tier)
    problem = absurd_size_error(int(width), int(height))
    if problem:
        raise ValueError(f"Infinity Scale Schedule: {problem}")
    # Nearest template to height/width, and the tier whose pixel area is nearest width*height.
    schedule, template, picked_tier = schedules.schedule_for_size(int(width), int(height))
    return schedule_value(schedule, template, picked_tier)


class InfinityScaleSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfinityScaleSchedule",
            display_name="Infinity Scale Schedule",
            category="Infinity",
            description=(
                "Chooses the output size of an Infinity image and its scale schedule: the coarse-to-fine "
                "token grids the model draws, from 1x1 up to the final grid (16 pixels per token). "
                "Infinity can only draw 60 sizes: 15 aspect-ratio templates at 4 pixel budgets "
                "(0.06M, 0.25M, 0.60M, 1M pixels; 7, 10, 12 or 13 scales). Pick a ratio and a tier, or "
                "type a width and height and get the nearest valid size (a request more than 4x off in "
                "each side, or beyond a 1:6..6:1 ratio, is refused). Connect scale_schedule to the "
                "Infinity sampler; width and height report the size that will really be drawn."),
            inputs=[
                io.Combo.Input(
                    "mode", options=MODES, default=MODE_ASPECT,
                    tooltip=("'aspect ratio': use the aspect_ratio and tier widgets. 'width/height': snap "
                             "width x height to the nearest valid size (nearest ratio, then the tier "
                             "whose pixel count is nearest); aspect_ratio and tier are then ignored.")),
                io.Combo.Input(
                    "aspect_ratio", options=list(ASPECT_LABELS), default=DEFAULT_ASPECT,
                    tooltip=("One of Infinity's 15 aspect-ratio templates, as width:height. The size in "
                             "brackets is the 1M-tier size; smaller tiers keep the ratio. 7:4 is the "
                             "template nearest 16:9, 5:2 the one nearest 21:9. Used in 'aspect ratio' mode.")),
                io.Combo.Input(
                    "tier", options=TIERS, default=DEFAULT_TIER,
                    tooltip=("Pixel budget: 0.06M (about 256x256, 7 scales), 0.25M (about 512x512, 10 "
                             "scales), 0.60M (about 768x768, 12 scales) or 1M (about 1024x1024, 13 scales). "
                             "The 2B and 8B models are trained at 1M; 8B-512 at 0.25M. Used in 'aspect "
                             "ratio' mode.")),
                io.Int.Input(
                    "width", default=1024, min=16, max=16384, step=8,
                    tooltip=("Wanted image width in pixels. Used in 'width/height' mode, where it is "
                             "snapped to the nearest of the 60 valid sizes (see the width output).")),
                io.Int.Input(
                    "height", default=1024, min=16, max=16384, step=8,
                    tooltip=("Wanted image height in pixels. Used in 'width/height' mode, where it is "
                             "snapped to the nearest of the 60 valid sizes (see the height output).")),
            ],
            outputs=[
                ScaleSchedule.Output(
                    "scale_schedule", display_name="scale_schedule",
                    tooltip=("The scale schedule (template, tier and per-scale token grids) for the "
                             "Infinity sampler.")),
                io.Int.Output("out_width", display_name="width",  # V3: ids unique across inputs+outputs
                              tooltip="Width in pixels of the image this schedule draws."),
                io.Int.Output("out_height", display_name="height",
                              tooltip="Height in pixels of the image this schedule draws."),
            ],
        )

    @classmethod
    def execute(cls, mode: str, aspect_ratio: str, tier: str, width: int, height: int) -> io.NodeOutput:
        value = resolve(mode, aspect_ratio, tier, width, height)
        return io.NodeOutput(value, value["width"], value["height"])


NODES: list[type[io.ComfyNode]] = [InfinityScaleSchedule]
