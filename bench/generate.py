"""Generation speed on this machine, measured side by side with the fp32 matmul rate.

For each case (random weights of real shapes): seconds per image, per scale (transformer and VAE
decode separately), transformer tokens/s, effective GFLOP/s of the transformer and of the VAE
decoder as a fraction of the matmul rate measured right before and after each of them, peak RSS. FLOPs are counted by
torch.utils.flop_counter on the very same calls (PyTorch's counter has no formula for the CPU
flash-attention kernel that SDPA runs here, nor for oneDNN's linear; we register the standard counts,
4 B H Lq Lk c and 2 M K N, so attention is counted as on CUDA and as the official code's explicit
matmuls are). Optional speed modes print their speed-up and how
many bits differ from the exact mode at the same seed.

    python bench/generate.py                      # layer12 256+512, 2B 256
    python bench/generate.py --cases layer12_256  # one case
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infinity_core import schedules as S  # noqa: E402
from infinity_core.sampler import sample  # noqa: E402
from infinity_core.speed import quantize_int8  # noqa: E402
from infinity_core.transformer import Infinity  # noqa: E402
from infinity_core.vae import BSQVAE  # noqa: E402
from infinity_core.zoo import TRANSFORMERS, VAES  # noqa: E402

CASES = {
    "layer12_256": ("infinity_layer12", "infinity_vae_d32", "0.06M"),
    "layer12_512": ("infinity_layer12", "infinity_vae_d32", "0.25M"),
    "2b_256": ("infinity_2b", "infinity_vae_d32reg", "0.06M"),
}


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(torch.ops.mkldnn._linear_pointwise)
def _onednn_linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """The blocks' oneDNN linear (transformer.block_linear, early scales): 2 M K N like addmm."""
    return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def random_init_(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02, generator=g)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def build_case(name: str):
    """A case's transformer and VAE with random weights of the real shapes, its schedule and a
    24-token text condition: (model, vae, schedule, text [24, C], cu_seqlens)."""
    tname, vname, tier = CASES[name]
    tcfg = TRANSFORMERS[tname]
    with torch.device("meta"):
        model = Infinity(tcfg)
        vae = BSQVAE(VAES[vname])
    model.to_empty(device="cpu"), vae.to_empty(device="cpu")
    random_init_(model), random_init_(vae, 1)
    for b in model.modules():
        for n, buf in b.named_buffers(recurse=False):
            if n == "zero_k_bias":
                buf.zero_()
    model.eval(), vae.eval()
    text = torch.randn(24, tcfg.text_channels) * 0.3
    return model, vae, S.get_schedule(1.0, tier), text, torch.tensor([0, 24], dtype=torch.int32)


def run_case(name: str, reps: int, cfg: float, modes: list[str]) -> dict:
    model, vae, schedule, text, cu = build_case(name)
    run = lambda **kw: sample(model, text, cu, schedule, cfg=cfg, tau=1.0, seed=0, **kw)  # noqa: E731

    with FlopCounterMode(display=False) as fc:
        res = run()
    t_flops = fc.get_total_flops()
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        vae.decode(res.summed_codes)
    v_flops = fc.get_total_flops()

    # Each repetition measures the matmul rate right before and after the transformer and the VAE
    # decode; a run's fraction is its GFLOP/s over the mean of the two rates around it (the machine's
    # rate drifts by 2x within minutes), and the medians over repetitions are printed.
    t_times, v_times, rates, t_fracs, v_fracs, per_scale = [], [], [], [], [], None
    for _ in range(reps):
        r0 = matmul_gflops()
        marks = [time.perf_counter()]
        res, t_s = timed(lambda: run(callback=lambda si, b, p: marks.append(time.perf_counter())))
        per_scale = [round(e - s, 3) for s, e in zip(marks[:-1], marks[1:])]
        r1 = matmul_gflops()
        with torch.inference_mode():
            _, v_s = timed(lambda: vae.decode(res.summed_codes))
        r2 = matmul_gflops()
        t_times.append(t_s), v_times.append(v_s), rates.extend((r0, r1, r2))
        t_fracs.append(t_flops / t_s / 1e9 / ((r0 + r1) / 2))
        v_fracs.append(v_flops / v_s / 1e9 / ((r1 + r2) / 2))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    rate, t_s, v_s = med(rates), med(t_times), med(v_times)
    tokens = S.token_count(schedule) * (2 if cfg != 1 else 1)
    out = {
        "case": name, "image": "x".join(map(str, S.image_size(schedule))), "cfg": cfg,
        "matmul_gflops": round(rate, 1),
        "transformer_s": round(t_s, 3), "vae_decode_s": round(v_s, 3), "per_image_s": round(t_s + v_s, 3),
        "transformer_per_scale_s": per_scale,
        "transformer_tokens_per_s": round(tokens / t_s, 1),
        "transformer_tflop": round(t_flops / 1e12, 3), "vae_tflop": round(v_flops / 1e12, 3),
        "transformer_gflops": round(t_flops / t_s / 1e9, 1),
        "transformer_frac_of_matmul": round(med(t_fracs), 3),
        "vae_gflops": round(v_flops / v_s / 1e9, 1),
        "vae_frac_of_matmul": round(med(v_fracs), 3),
        "fracs_per_rep": {"transformer": [round(f, 3) for f in t_fracs], "vae": [round(f, 3) for f in v_fracs]},
        "matmul_gflops_range": [round(min(rates), 1), round(max(rates), 1)],
        "peak_rss_gib": round(peak_rss_gib(), 2),
    }
    exact = res
    for mode in modes:
        if mode.startswith("cfg_off_from_"):
            k = int(mode.rsplit("_", 1)[1])
            cfg_list = [cfg if i < k else 1.0 for i in range(len(schedule))]
            fast, s = timed(lambda: sample(model, text, cu, schedule, cfg=cfg_list, tau=1.0, seed=0,
                                           drop_unconditional=True))
        elif mode == "int8":
            import copy
            qmodel = quantize_int8(copy.deepcopy(model))
            sample(qmodel, text, cu, schedule, cfg=cfg, tau=1.0, seed=0)  # warm-up
            fast, s = timed(lambda: sample(qmodel, text, cu, schedule, cfg=cfg, tau=1.0, seed=0))
            del qmodel
        else:
            raise SystemExit(f"unknown mode {mode}")
        differ = sum(int((a != b).sum()) for a, b in zip(fast.bits, exact.bits))
        total = sum(b.numel() for b in exact.bits)
        out[f"mode_{mode}"] = {"seconds": round(s, 3), "speedup": round(t_s / s, 2),
                               "bits_differing": differ, "bits_total": total}
    del model, vae
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--reps", type=int, default=3, help="repetitions; medians are printed")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--modes", nargs="*", default=["cfg_off_from_5", "int8"],
                   help="speed modes: cfg_off_from_N (guidance off from scale N, unconditional half dropped), int8")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.cases:
        print(json.dumps(run_case(name, args.reps, args.cfg, args.modes)), flush=True)


if __name__ == "__main__":
    main()
