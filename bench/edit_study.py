"""Recolouring and masked-edit study of Infinity Edit with the bundled shapes model (issue 6).

    python bench/edit_study.py [--model-dir bundled/infinity_tiny_shapes] [--sources 50] [--seed 0]
                               [--report edit_study.json] [--save-images DIR]

1. Sources: single-object scenes ("a large red circle on the left, blue background") generated with
   the model's defaults, kept when the shapes analyzer reads exactly one object of the prompted colour
   and the prompted background (so the study edits pictures that are right to begin with; the number
   of rejected draws is printed).
2. Recolouring: the same caption with another object colour (never the background colour), edited
   with keep_scales k for every k, without a mask. Per k: how often the analyzer finds the new colour
   (and the background unchanged), and the IoU of the object's pixel mask with the source's.
   The recommended k is the largest k that reaches both targets (new colour >= 80%, IoU >= 0.7).
3. Masked edit: the source object's bounding box grown by 16 px is the mask, keep_scales MASK_K (the
   4x4 and coarser scales kept everywhere, so the re-drawn band around the mask is one 6x6 cell).
   Mean absolute difference in grey levels (0..255) to the source's VAE reconstruction, outside the
   mask beyond the border band (edit.border_band_px) and inside the mask.

Prints a table and writes the JSON report. Deterministic: source j uses seed `seed + j`, its edits
seed `seed + 1000 + j`.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infinity_core import data as D  # noqa: E402
from infinity_core import edit as EDIT  # noqa: E402
from infinity_core import schedules as S  # noqa: E402
from infinity_core import shapes_eval as E  # noqa: E402

TARGET_COLOUR, TARGET_IOU = 0.80, 0.70
MASK_MARGIN_PX = 16
DECODER_REACH_PX = (0, 16, 32)  # extra band widths measured (0 first: the reported band itself); the decoder spreads a change
MASK_K = 3


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def draw_sources(pipe, n: int, seed: int, settings: dict, max_tries: int):
    """n (scene, target colour, picture uint8 [H,W,3], seed) of single-object scenes drawn right."""
    rng = random.Random(f"edit-study/{seed}")
    out, tries = [], 0
    while len(out) < n:
        if tries >= max_tries:
            raise SystemExit(f"only {len(out)} of {n} sources drawn right in {tries} tries: train the model longer")
        sc = D.sample_scene(rng, "any", p_two=0.0)
        obj = sc.objects[0]
        target = rng.choice([c for c in D.COLOUR_NAMES if c not in (obj.colour, sc.background)])
        s = seed + tries
        tries += 1
        gen = pipe.generate(sc.caption(), h_div_w=1.0, tier="0.06M", seed=s, **settings)
        img = E.to_uint8(gen.images)[0]
        an = E.analyze(img)
        if an.count == 1 and an.objects[0].colour == obj.colour and an.background == sc.background:
            out.append((sc, target, img, s))
    return out, tries


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default=str(E.DEFAULT_MODEL_DIR))
    p.add_argument("--sources", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=None)
    p.add_argument("--save-images", default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--ks", default="", help="keep_scales values to try, e.g. '1,2,3' (default: every k)")
    p.add_argument("--montage", default=None,
                   help="with --save-images: write this PNG, one row per source 0-3: the source, its edits at "
                        "the first and the last of --ks, and the masked edit (README's docs/images/edit_examples.png)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    pipe = E.load_pipeline(args.model_dir)
    defaults = E.load_defaults(args.model_dir)
    settings = E.sampling_settings(defaults)
    schedule = S.get_schedule(1.0, "0.06M")
    K = len(schedule)
    vae_sched = S.vae_schedule(schedule, pipe.transformer.cfg.patchify)
    sources, tries = draw_sources(pipe, args.sources, args.seed, settings, 10 * args.sources)
    print(f"{len(sources)} sources drawn right in {tries} draws ({settings})")
    save = Path(args.save_images) if args.save_images else None
    if save:
        save.mkdir(parents=True, exist_ok=True)

    ks = [int(k) for k in args.ks.split(",")] if args.ks else list(range(K + 1))
    per_k = {k: {"new_colour": 0, "iou": []} for k in ks}
    masked = {"inside_mad": [], "band_px": [], "outside_mad_by_extra": {e: [] for e in DECODER_REACH_PX}}
    rows = []
    for j, (sc, target, img, s) in enumerate(sources):
        obj = sc.objects[0]
        new_scene = D.Scene(sc.background, (D.ShapeObject(obj.shape, target, obj.size, obj.position),))
        src = EDIT.encode_source(pipe.vae, torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1,
                                 schedule, pipe.transformer.cfg.patchify)
        recon = E.to_uint8(pipe.decode(src.summed_codes))[0]
        src_mask = E.object_masks(img)[0]
        cond = pipe.encode_prompts([new_scene.caption()])
        row = {"source": sc.caption(), "edit": new_scene.caption(), "seed": s, "per_k": {}}
        for k in ks:
            res = EDIT.edit(pipe.transformer, src, cond.kv_compact, cond.cu_seqlens, k, seed=1000 + args.seed + j,
                            **settings)
            out = E.to_uint8(pipe.decode(res.summed_codes))[0]
            an = E.analyze(out)
            ok = bool(an.objects) and an.objects[0].colour == target and an.background == sc.background
            masks = E.object_masks(out)
            o = iou(src_mask, masks[0]) if masks else 0.0
            per_k[k]["new_colour"] += ok
            per_k[k]["iou"].append(o)
            row["per_k"][k] = {"new_colour": ok, "iou": round(o, 3)}
            if save and j < 8:
                Image.fromarray(out).save(save / f"{j:02d}_k{k}.png")
        # masked edit: the object's box grown by MASK_MARGIN_PX may change, from scale MASK_K on
        ys, xs = np.nonzero(src_mask)
        H, W = img.shape[:2]
        m = torch.zeros(H, W)
        m[max(0, ys.min() - MASK_MARGIN_PX):ys.max() + 1 + MASK_MARGIN_PX,
          max(0, xs.min() - MASK_MARGIN_PX):xs.max() + 1 + MASK_MARGIN_PX] = 1
        res = EDIT.edit(pipe.transformer, src, cond.kv_compact, cond.cu_seqlens, MASK_K, mask=m,
                        seed=1000 + args.seed + j, **settings)
        out = E.to_uint8(pipe.decode(res.summed_codes))[0]
        band = EDIT.border_band_px(m, vae_sched, (H, W), MASK_K)
        diff = np.abs(out.astype(np.float64) - recon.astype(np.float64)).mean(-1)
        masked["inside_mad"].append(float(diff[m.bool().numpy()].mean()))
        masked["band_px"].append(band)
        for e in DECODER_REACH_PX:  # outside the mask and its band, the band widened by e px (the decoder's reach)
            g = EDIT.grow_mask(m, band + e).numpy()
            masked["outside_mad_by_extra"][e].append(float(diff[~g].mean()) if (~g).any() else 0.0)
        row["masked"] = {"outside_mad": masked["outside_mad_by_extra"][0][-1], "inside_mad": masked["inside_mad"][-1],
                         "band_px": band}
        rows.append(row)
        if save and j < 8:
            Image.fromarray(img).save(save / f"{j:02d}_source.png")
            Image.fromarray(out).save(save / f"{j:02d}_masked.png")
        print(f"  {j + 1}/{len(sources)} sources, {time.time() - t0:.0f}s", flush=True)

    n = len(sources)
    table = []
    print(f"\nrecolouring over {n} sources (targets: new colour >= {TARGET_COLOUR:.0%}, IoU >= {TARGET_IOU})")
    print(" k | new colour | mean IoU | IoU >= 0.7")
    for k in ks:
        frac = per_k[k]["new_colour"] / n
        ious = np.array(per_k[k]["iou"])
        entry = {"k": k, "new_colour": frac, "mean_iou": float(ious.mean()), "iou_ge_0.7": float((ious >= 0.7).mean())}
        table.append(entry)
        print(f"{k:2d} | {frac:9.0%} | {ious.mean():8.3f} | {entry['iou_ge_0.7']:9.0%}")
    good = [e["k"] for e in table if e["new_colour"] >= TARGET_COLOUR and e["mean_iou"] >= TARGET_IOU]
    recommended = max(good) if good else None
    print(f"recommended k for recolouring: {recommended}")
    out_mad, in_mad = np.array(masked["outside_mad_by_extra"][0]), np.array(masked["inside_mad"])
    band_max = int(np.max(masked["band_px"]))
    print(f"masked edit (k {MASK_K}, box + {MASK_MARGIN_PX} px): mean |diff| to the reconstruction outside the mask "
          f"beyond the {band_max} px band {out_mad.mean():.2f} grey levels "
          f"(max {out_mad.max():.2f}), inside {in_mad.mean():.1f}")
    by_extra = {}
    for e, vals in masked["outside_mad_by_extra"].items():
        v = np.array(vals)
        by_extra[e] = {"band_px": band_max + e, "mean": float(v.mean()), "max": float(v.max()),
                       "sources_within_1": int((v <= 1.0).sum())}
        print(f"  band {by_extra[e]['band_px']} px: outside mean {v.mean():.2f}, max {v.max():.2f}, "
              f"{by_extra[e]['sources_within_1']}/{n} sources within 1 grey level")
    report = {"sources": n, "draws": tries, "settings": settings, "recolouring": table,
              "recommended_k": recommended, "masked": {"outside_mad_mean": float(out_mad.mean()),
                                                       "outside_mad_max": float(out_mad.max()),
                                                       "inside_mad_mean": float(in_mad.mean()),
                                                       "band_px_max": band_max,
                                                       "by_band": by_extra},
              "rows": rows, "seconds": time.time() - t0}
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1))
    if args.montage and save:
        write_montage(save, Path(args.montage), [ks[0], ks[-1]], rows=min(4, n))
    return 0


def write_montage(images: Path, path: Path, ks: list[int], rows: int = 4, size: int = 256) -> None:
    """One row per source: source, edit at ks[0], edit at ks[1], masked edit (files of --save-images)."""
    names = ["source"] + [f"k{k}" for k in ks] + ["masked"]
    sheet = Image.new("RGB", (size * len(names), size * rows), "white")
    for r in range(rows):
        for c, name in enumerate(names):
            sheet.paste(Image.open(images / f"{r:02d}_{name}.png").convert("RGB").resize((size, size)),
                        (c * size, r * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
