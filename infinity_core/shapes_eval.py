"""A small GenEval for the shapes model: held-out prompts, a deterministic pixel analyzer, metrics.

`python -m infinity_core eval-shapes [--model-dir bundled/infinity_tiny_shapes] [--num-prompts 200]
[--prompt-seed 0] [--cfg ...] [--tau ...] [--report report.json] [--save-images DIR]`

Prompt set: `heldout_scenes(n, seed)`, n distinct captions drawn from scenes whose every object is a
held-out (shape, colour, background) combination (data.is_held_out), i.e. never seen in training.
60% one object, 40% two objects (a third of those "two <same objects>").

Analyzer (pure numpy/PIL, no learned parts, same answer on every machine):
  1. background = the median colour of a 3-pixel frame around the picture, named by the nearest palette
     colour (data.COLOURS, Euclidean RGB);
  2. foreground = pixels farther than FG_THRESHOLD from that median colour; 8-connected components of at
     least MIN_AREA_FRAC of the picture are the objects (count = how many);
  3. per object: colour = nearest palette colour of the median of its pixels after a 2-pixel erosion
     (anti-aliased rims excluded); shape = the shape whose ideal upright outline, scaled to the
     object's area and centred on its centroid, has the highest IoU with the object's mask;
     position = centre if the box centre lies within CENTRE_BOX of the middle on both axes, else
     left/right/top/bottom by the larger offset;
     size = small/large by the box size relative to the nominal radii.
Scoring: objects of the prompt are matched to the largest components (two objects: the assignment
with the smaller total distance to the prompted positions). Per prompt: colour = every object colour
and the background right; shape / position = per prompted object; counting = number of components
equals the number of prompted objects; overall = everything right.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import random
import time
from dataclasses import dataclass, field, asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import data as D

FG_THRESHOLD = 40.0       # RGB distance from the background colour
MIN_AREA_FRAC = 0.004     # components smaller than this fraction of the picture are noise (~260 px at 256^2)
CENTRE_BOX = 0.125        # |offset| / size below this on both axes -> centre
FRAME = 3                 # pixels of the border used for the background colour
TARGETS = {"colour": 0.90, "shape": 0.80, "position": 0.80}
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "bundled" / "infinity_tiny_shapes"

_PALETTE_NAMES = list(D.COLOURS)
_PALETTE = np.array([D.COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# prompt set

def heldout_scenes(n: int = 200, seed: int = 0, p_two: float = 0.4) -> list[D.Scene]:
    """n scenes with distinct captions, every object a held-out combination. Deterministic in seed."""
    rng = random.Random(f"eval-shapes/{seed}")
    scenes, seen = [], set()
    tries = 0
    while len(scenes) < n:
        two = rng.random() < p_two  # decided first: held-out pairs are rarer than held-out singles
        sc = D.sample_scene(rng, "heldout", p_two=1.0 if two else 0.0)
        tries += 1
        if tries > 200 * n:
            raise ValueError(f"could not draw {n} distinct held-out prompts")
        if sc.caption() in seen:
            continue
        seen.add(sc.caption())
        scenes.append(sc)
    return scenes


# ------------------------------------------------------------------------------------------------
# analyzer

def nearest_colour(rgb) -> str:
    d = ((_PALETTE - np.asarray(rgb, dtype=np.float64)[None]) ** 2).sum(-1)
    return _PALETTE_NAMES[int(d.argmin())]


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected component labels of a bool mask [H, W] -> (labels int32 [H, W], count); 0 = none.
    Run-length union-find (fast in Python: work is proportional to the number of runs)."""
    H, W = mask.shape
    parent: list[int] = [0]

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    runs_prev: list[tuple[int, int, int]] = []
    all_runs: list[tuple[int, int, int, int]] = []  # (row, start, end_exclusive, label)
    m = mask.astype(np.int8)
    for y in range(H):
        row = m[y]
        d = np.diff(np.concatenate(([0], row, [0])))
        starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
        runs = []
        for s, e in zip(starts.tolist(), ends.tolist()):
            lab = 0
            for ps, pe, pl in runs_prev:
                if ps <= e and pe >= s:  # overlaps incl. diagonal neighbours (8-connectivity)
                    if lab == 0:
                        lab = find(pl)
                    else:
                        a, b = find(lab), find(pl)
                        if a != b:
                            parent[max(a, b)] = min(a, b)
                            lab = min(a, b)
            if lab == 0:
                parent.append(len(parent))
                lab = len(parent) - 1
            runs.append((s, e, lab))
            all_runs.append((y, s, e, lab))
        runs_prev = runs
    labels = np.zeros((H, W), dtype=np.int32)
    roots: dict[int, int] = {}
    for y, s, e, lab in all_runs:
        r = find(lab)
        if r not in roots:
            roots[r] = len(roots) + 1
        labels[y, s:e] = roots[r]
    return labels, len(roots)


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    m = mask.copy()
    for _ in range(steps):
        p = np.pad(m, 1, constant_values=False)
        m = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m


@functools.lru_cache(maxsize=None)
def _unit_shape(shape: str) -> tuple[float, float, float]:
    """(fill, ux, uy): the fraction of its bounding box the shape covers, and its centroid in the box
    (triangles and stars are not centred in their box), measured on a 400 px drawing."""
    s = 400
    img = Image.new("L", (s, s), 0)
    D.draw_shape(ImageDraw.Draw(img), shape, (0, 0, s, s), 255)
    ys, xs = np.nonzero(np.asarray(img) >= 128)
    return len(xs) / s ** 2, (xs.mean() + 0.5) / s, (ys.mean() + 0.5) / s


def _fitted_template(shape: str, hw: tuple[int, int], area: int, cx: float, cy: float) -> np.ndarray:
    """The shape's ideal upright outline of the given area (pixels), centred on (cx, cy): a bool mask
    of size hw, drawn at 4x and box-filtered like the renderer."""
    H, W = hw
    fill, ux, uy = _unit_shape(shape)
    hx, hy = D._half_extent(shape)
    r = math.sqrt(area / (fill * 4 * hx * hy))          # base radius giving that area
    w, h = 2 * hx * r, 2 * hy * r
    x0, y0 = cx + 0.5 - ux * w, cy + 0.5 - uy * h
    ss = 4
    img = Image.new("L", (W * ss, H * ss), 0)
    D.draw_shape(ImageDraw.Draw(img), shape, (x0 * ss, y0 * ss, (x0 + w) * ss, (y0 + h) * ss), 255)
    return np.asarray(img.reduce(ss)) >= 128


def classify_shape(mask: np.ndarray) -> tuple[str, dict]:
    """The shape whose ideal outline of the mask's area, centred on its centroid, best overlaps (IoU)
    the mask. Fitting area and centroid rather than the bounding box keeps soft-edged drawings readable:
    a star whose points came out rounded has a smaller box than its ideal outline, and a template
    squeezed into that box loses to the circle (tests/test_bundled_model.py::
    test_analyzer_reads_the_vae_reconstructions_of_held_out_scenes: 43 of 48 right, box fit 36)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    pad = max(y1 - y0, x1 - x0)                         # room for a template larger than the box
    Y0, X0 = max(0, y0 - pad), max(0, x0 - pad)
    crop = mask[Y0:y1 + pad, X0:x1 + pad]
    area, cx, cy = len(xs), xs.mean() - X0, ys.mean() - Y0  # the fit, once for every shape (crop coordinates)
    scores = {}
    for shape in D.SHAPES:
        t = _fitted_template(shape, crop.shape, area, cx, cy)
        inter, union = np.logical_and(t, crop).sum(), np.logical_or(t, crop).sum()
        scores[shape] = float(inter / union) if union else 0.0
    return max(scores, key=scores.get), scores


def classify_position(cx: float, cy: float, H: int, W: int) -> str:
    dx, dy = cx / W - 0.5, cy / H - 0.5
    if abs(dx) < CENTRE_BOX and abs(dy) < CENTRE_BOX:
        return "centre"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def classify_size(shape: str, w: int, h: int, H: int, W: int) -> str:
    hx, hy = D._half_extent(shape)
    r = 0.5 * (w / (2 * hx) + h / (2 * hy)) / min(H, W)
    return "small" if r < 0.5 * (D.SIZE_RADIUS["small"] + D.SIZE_RADIUS["large"]) else "large"


@dataclass
class DetectedObject:
    colour: str
    shape: str
    position: str
    size: str
    area: int
    box: tuple            # x0, y0, x1, y1 (x1, y1 exclusive)
    centre: tuple         # box centre (x, y)
    rgb: tuple
    shape_scores: dict = field(default_factory=dict)


@dataclass
class Analysis:
    background: str
    background_rgb: tuple
    objects: list         # DetectedObject, largest first

    @property
    def count(self) -> int:
        return len(self.objects)


def to_uint8(images) -> np.ndarray:
    """Pictures as uint8: uint8 stays, floats in [0, 1] (numpy or torch, any shape) are clipped and rounded."""
    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    return arr if arr.dtype == np.uint8 else (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)


def _components(rgb: np.ndarray):
    """Steps 1-2 of the analyzer: (pixels float [H, W, 3], background median RGB, object masks of at
    least MIN_AREA_FRAC of the picture, in label order)."""
    img = to_uint8(rgb)
    H, W, _ = img.shape
    f = img.astype(np.float64)
    frame = np.concatenate([f[:FRAME].reshape(-1, 3), f[-FRAME:].reshape(-1, 3),
                            f[:, :FRAME].reshape(-1, 3), f[:, -FRAME:].reshape(-1, 3)])
    bg_rgb = np.median(frame, axis=0)
    fg = np.sqrt(((f - bg_rgb) ** 2).sum(-1)) > FG_THRESHOLD
    labels, n = label_components(fg)
    masks = [labels == k for k in range(1, n + 1)]
    return f, bg_rgb, [m for m in masks if m.sum() >= MIN_AREA_FRAC * H * W]


def object_masks(rgb: np.ndarray) -> list[np.ndarray]:
    """Pixel masks (bool [H, W]) of the objects the analyzer finds, largest first."""
    return sorted(_components(rgb)[2], key=lambda m: -int(m.sum()))


def analyze(rgb: np.ndarray) -> Analysis:
    """Deterministic reading of a picture [H, W, 3] uint8 (or float in [0,1])."""
    f, bg_rgb, masks = _components(rgb)
    H, W, _ = f.shape
    objects = []
    for m in masks:
        area = int(m.sum())
        ys, xs = np.nonzero(m)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        core = _erode(m, 2)
        pix = f[core] if core.sum() >= 20 else f[m]
        col_rgb = np.median(pix, axis=0)
        shape, scores = classify_shape(m)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        objects.append(DetectedObject(
            colour=nearest_colour(col_rgb), shape=shape, position=classify_position(cx, cy, H, W),
            size=classify_size(shape, x1 - x0, y1 - y0, H, W), area=area, box=(x0, y0, x1, y1),
            centre=(cx, cy), rgb=tuple(round(float(c), 1) for c in col_rgb), shape_scores=scores))
    objects.sort(key=lambda o: -o.area)
    return Analysis(nearest_colour(bg_rgb), tuple(round(float(c), 1) for c in bg_rgb), objects)


# ------------------------------------------------------------------------------------------------
# scoring

def score(scene: D.Scene, analysis: Analysis, H: int = 256, W: int = 256) -> dict:
    """Per-prompt checks of a scene against what the analyzer read."""
    expected = list(scene.objects)
    found = analysis.objects[:len(expected)]
    assign: list = [None] * len(expected)
    if len(expected) == 1:
        assign[0] = found[0] if found else None
    else:
        def dist(o, e):
            fx, fy = D.POSITION_CENTRE[e.position]
            return math.hypot(o.centre[0] / W - fx, o.centre[1] / H - fy)
        if len(found) >= 2:
            a = dist(found[0], expected[0]) + dist(found[1], expected[1])
            b = dist(found[1], expected[0]) + dist(found[0], expected[1])
            assign = [found[0], found[1]] if a <= b else [found[1], found[0]]
        elif len(found) == 1:
            j = 0 if dist(found[0], expected[0]) <= dist(found[0], expected[1]) else 1
            assign[j] = found[0]
    objs = []
    for e, o in zip(expected, assign):
        objs.append({"colour": o is not None and o.colour == e.colour,
                     "shape": o is not None and o.shape == e.shape,
                     "position": o is not None and o.position == e.position,
                     "size": o is not None and o.size == e.size})
    bg_ok = analysis.background == scene.background
    out = {
        "background": bg_ok,
        "object_colour": all(x["colour"] for x in objs),
        "colour": bg_ok and all(x["colour"] for x in objs),
        "shape": [x["shape"] for x in objs],
        "position": [x["position"] for x in objs],
        "size": [x["size"] for x in objs],
        "counting": analysis.count == len(expected),
    }
    out["overall"] = out["colour"] and all(out["shape"]) and all(out["position"]) and out["counting"]
    return out


def aggregate(scores: list[dict]) -> dict:
    """Accuracies over prompts (colour, background, object_colour, counting, overall) and over
    prompted objects (shape, position, size)."""
    n = len(scores)
    per_prompt = ("colour", "background", "object_colour", "counting", "overall")
    out = {k: sum(bool(s[k]) for s in scores) / n for k in per_prompt}
    for k in ("shape", "position", "size"):
        vals = [v for s in scores for v in s[k]]
        out[k] = sum(vals) / len(vals)
    out["prompts"] = n
    out["objects"] = sum(len(s["shape"]) for s in scores)
    return out


def meets_targets(metrics: dict) -> dict:
    return {k: metrics[k] >= v for k, v in TARGETS.items()}


# ------------------------------------------------------------------------------------------------
# generation + evaluation

def load_defaults(model_dir) -> dict:
    p = Path(model_dir) / "defaults.json"
    return json.loads(p.read_text()) if p.is_file() else {}


SAMPLING_FALLBACK = {"cfg": 3.0, "tau": 1.0, "top_k": 900, "top_p": 0.97}


def sampling_settings(defaults: dict, **overrides) -> dict:
    """cfg / tau / top_k / top_p: an override that is not None, else the model's defaults.json value,
    else the sampler's own default."""
    return {k: overrides[k] if overrides.get(k) is not None else defaults.get(k, v)
            for k, v in SAMPLING_FALLBACK.items()}


def load_pipeline(model_dir=None, transformer=None, vae=None, text_encoder=None, device="cpu"):
    from .pipeline import InfinityPipeline
    model_dir = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
    transformer = transformer or model_dir / "transformer.safetensors"
    vae = vae or model_dir / "vae.safetensors"
    text_encoder = text_encoder or model_dir / "text_encoder"
    return InfinityPipeline.from_files(transformer, vae, text_encoder, dtype="fp32", device=device,
                                       ca_precision="fp32")


def evaluate(pipe, scenes: list[D.Scene], *, cfg=3.0, tau=1.0, top_k: int = 900, top_p: float = 0.97, seed: int = 0,
             batch_size: int = 8, tier: str = "0.06M", h_div_w: float = 1.0, save_images=None,
             progress: bool = False) -> dict:
    """Generate one picture per scene (prompt j uses seed `seed + j`, whatever the batching), analyze,
    score. Returns {'metrics', 'per_prompt', 'seconds'}."""
    t0 = time.time()
    rows = []
    for a in range(0, len(scenes), batch_size):
        chunk = scenes[a:a + batch_size]
        gen = pipe.generate([s.caption() for s in chunk], h_div_w=h_div_w, tier=tier, cfg=cfg, tau=tau, top_k=top_k,
                            top_p=top_p, seed=seed + a, seed_mode="per_image")
        imgs = to_uint8(gen.images)
        for j, (sc, im) in enumerate(zip(chunk, imgs)):
            an = analyze(im)
            sco = score(sc, an, *im.shape[:2])
            rows.append({"index": a + j, "caption": sc.caption(), "scene": sc.to_dict(), "score": sco,
                         "read": {"background": an.background, "objects": [asdict(o) for o in an.objects]}})
            if save_images is not None:
                Path(save_images).mkdir(parents=True, exist_ok=True)
                tag = "ok" if sco["overall"] else "fail"
                Image.fromarray(im).save(Path(save_images) / f"{a + j:03d}_{tag}.png")
        if progress:
            print(f"  {min(a + batch_size, len(scenes))}/{len(scenes)} prompts, {time.time() - t0:.0f}s", flush=True)
    metrics = aggregate([r["score"] for r in rows])
    return {"metrics": metrics, "per_prompt": rows, "seconds": time.time() - t0}


def format_metrics(m: dict) -> str:
    keys = ("colour", "background", "object_colour", "shape", "position", "counting", "size", "overall")
    return "  ".join(f"{k} {100 * m[k]:.1f}%" for k in keys)


# ------------------------------------------------------------------------------------------------
# command line

HELP = "evaluate the shapes model on held-out prompts with a deterministic pixel analyzer (a small GenEval)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR),
                   help="folder with transformer.safetensors, vae.safetensors, text_encoder/, defaults.json")
    p.add_argument("--transformer", default=None)
    p.add_argument("--vae", default=None)
    p.add_argument("--text-encoder", default=None)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the held-out prompt set")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of prompt 0 (prompt j uses seed+j)")
    p.add_argument("--cfg", type=float, default=None, help="default: the model's defaults.json")
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    p.add_argument("--report", default=None, help="write metrics and per-prompt results as JSON here")
    p.add_argument("--save-images", default=None, help="save every generated picture into this folder")
    p.add_argument("--sweep-cfg", default=None, help="comma list: evaluate every cfg x tau pair, report the best")
    p.add_argument("--sweep-tau", default=None, help="comma list (with --sweep-cfg)")
    p.add_argument("--write-defaults", default=None,
                   help="with a sweep: write the best settings as defaults.json here")
    p.add_argument("--check-targets", action="store_true",
                   help=f"exit 1 unless colour/shape/position meet {TARGETS}")


def selection_score(m: dict) -> float:
    """What the default settings maximise: the mean of the three targeted accuracies and counting."""
    return (m["colour"] + m["shape"] + m["position"] + m["counting"]) / 4


def _sweep(args, pipe, scenes, base: dict) -> int:
    cfgs = [float(x) for x in (args.sweep_cfg or str(base["cfg"])).split(",")]
    taus = [float(x) for x in (args.sweep_tau or str(base["tau"])).split(",")]
    rows = []
    for c in cfgs:
        for t in taus:
            st = dict(base, cfg=c, tau=t)
            res = evaluate(pipe, scenes, seed=args.seed, batch_size=args.batch_size, **st)
            rows.append({"settings": st, "metrics": res["metrics"], "score": selection_score(res["metrics"])})
            print(f"cfg {c:g} tau {t:g}: {format_metrics(res['metrics'])} score {rows[-1]['score']:.3f} "
                  f"({res['seconds']:.0f}s)", flush=True)
    best = max(rows, key=lambda r: r["score"])
    print(f"best: {best['settings']} score {best['score']:.3f}")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps({"prompt_seed": args.prompt_seed, "seed": args.seed,
                                                 "prompts": len(scenes), "rows": rows, "best": best}, indent=1))
    if args.write_defaults:
        d = {**best["settings"], "h_div_w": 1.0, "tier": "0.06M", "seed": 0,
             "selected_on": f"{len(scenes)} held-out prompts, prompt seed {args.prompt_seed}"}
        Path(args.write_defaults).write_text(json.dumps(d, indent=1) + "\n")
    return 0


def run(args) -> int:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = load_defaults(args.model_dir)
    settings = sampling_settings(defaults, cfg=args.cfg, tau=args.tau, top_k=args.top_k, top_p=args.top_p)
    pipe = load_pipeline(args.model_dir, args.transformer, args.vae, args.text_encoder, args.device)
    scenes = heldout_scenes(args.num_prompts, args.prompt_seed)
    if args.sweep_cfg or args.sweep_tau:
        return _sweep(args, pipe, scenes, settings)
    print(f"{len(scenes)} held-out prompts (prompt seed {args.prompt_seed}), settings {settings}", flush=True)
    res = evaluate(pipe, scenes, seed=args.seed, batch_size=args.batch_size, save_images=args.save_images,
                   progress=True, **settings)
    m = res["metrics"]
    print(format_metrics(m))
    ok = meets_targets(m)
    print("targets: " + ", ".join(f"{k} >= {100 * v:.0f}%: {'PASS' if ok[k] else 'FAIL'}" for k, v in TARGETS.items()))
    print(f"{res['seconds']:.1f}s for {len(scenes)} pictures")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps({"settings": settings, "prompt_seed": args.prompt_seed,
                                                 "seed": args.seed, **res}, indent=1))
    return 0 if (all(ok.values()) or not args.check_targets) else 1


if __name__ == "__main__":
    from .train import command_main
    raise SystemExit(command_main(HELP, add_arguments, run))
