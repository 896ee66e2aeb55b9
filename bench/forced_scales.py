"""Where a shapes model loses the shapes: held-out one-object pictures, the first k scales taken from
the picture's own bits (VAE encode) and the rest drawn by the transformer, scored by the shapes analyzer.

    python bench/forced_scales.py [--model-dir bundled/infinity_tiny_shapes] [--ks 0,3,5,6,7]
                                  [--scenes 16] [--tau 0.05]

k = all scales is the VAE's reconstruction (the VAE's own ceiling); k = 0 is plain generation. The
shape accuracy falling between k and k-1 is what the transformer's predictions at scale k-1 lose.
Uses the model's defaults.json sampling settings; --tau overrides the temperature (small: near-greedy).

--shape-words: does the last scale read the shape word? For a large yellow object of each shape in
the centre of a blue picture, all scales but the last are taken from the picture and the last is
drawn under the caption naming each of the four shapes; printed: the fraction of the last scale's
bits equal to the picture's own, per picture (row) and caption shape (column). A model that reads
the word scores best on the diagonal.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infinity_core import data as D  # noqa: E402
from infinity_core import edit as EDIT  # noqa: E402
from infinity_core import schedules as S  # noqa: E402
from infinity_core import shapes_eval as E  # noqa: E402


def encode_scene(pipe, scene, schedule) -> EDIT.SourceEncoding:
    """The nominal picture of `scene` (no jitter) and its bits of every scale."""
    img = D.to_model_image(D.render_scene(scene))[None]                     # [1, 3, 256, 256]
    return EDIT.encode_source(pipe.vae, img, schedule, pipe.transformer.cfg.patchify)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default=str(E.DEFAULT_MODEL_DIR))
    p.add_argument("--ks", default="0,3,5,6,7", help="numbers of scales taken from the picture")
    p.add_argument("--scenes", type=int, default=16, help="one-object held-out scenes (prompt seed 1)")
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--shape-words", action="store_true", help="also print the caption-swap table")
    args = p.parse_args(argv)

    pipe = E.load_pipeline(args.model_dir)
    overrides = {} if args.tau is None else {"tau": args.tau}
    settings = E.sampling_settings(E.load_defaults(args.model_dir), **overrides)
    schedule = S.get_schedule(1.0, "0.06M")
    scenes = [s for s in E.heldout_scenes(4 * args.scenes, seed=1) if len(s.objects) == 1][:args.scenes]
    print(f"{len(scenes)} one-object held-out scenes, {len(schedule)} scales, settings {settings}")
    for k in (int(x) for x in args.ks.split(",")):
        t0, rows = time.time(), []
        for i, scene in enumerate(scenes):
            src = encode_scene(pipe, scene, schedule)
            cond = pipe.encode_prompts([scene.caption()])
            res = EDIT.edit(pipe.transformer, src, cond.kv_compact, cond.cu_seqlens, k, seed=i, **settings)
            rows.append(E.score(scene, E.analyze(E.to_uint8(pipe.decode(res.summed_codes)[0]))))
        m = E.aggregate(rows)
        print(f"scales kept {k}: shape {m['shape']:.2f}  colour {m['colour']:.2f}  size {m['size']:.2f}  "
              f"({time.time() - t0:.0f}s)", flush=True)
    if args.shape_words:
        shape_word_table(pipe, settings, schedule)
    return 0


def shape_word_table(pipe, settings, schedule) -> None:
    K = len(schedule)
    scene = lambda shape: D.Scene("blue", (D.ShapeObject(shape, "yellow", "large", "centre"),))  # noqa: E731
    print("last-scale bits equal to the picture's, picture shape (rows) x caption shape (columns):")
    print(" " * 10 + "".join(f"{w:>10}" for w in D.SHAPES))
    for shape in D.SHAPES:
        src = encode_scene(pipe, scene(shape), schedule)
        row = []
        for word in D.SHAPES:
            cond = pipe.encode_prompts([scene(word).caption()])
            res = EDIT.edit(pipe.transformer, src, cond.kv_compact, cond.cu_seqlens, K - 1, seed=0, **settings)
            row.append(float((res.bits[-1] == src.bits[-1]).float().mean()))
        print(f"{shape:>10}" + "".join(f"{a:>10.4f}" for a in row), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
