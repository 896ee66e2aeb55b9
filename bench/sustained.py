"""Sustained use of a real ComfyUI with ComfyUI-Infinity: N prompts back to back, some interrupted.

    python bench/sustained.py                      # 200 prompts on a fresh headless ComfyUI
    python bench/sustained.py --prompts 50 --seed 3
    python bench/sustained.py --port 8188 [--pid PID] [--output-dir DIR]   # attach to a running ComfyUI

Without --port the script starts ComfyUI 0.3.75 (CPU) with this package the way the tests do
(tests/stand_ins.py InfinityEnv on tests/comfy_server.py, provisioned by scripts/setup_comfyui.sh
through tests/conftest.py): the bundled model "Infinity tiny shapes (bundled)" is the real
bundled/infinity_tiny_shapes/ when it exists, else the random-weight stand-in the tests pass through
INFINITY_BUNDLED_DIR; the official-name stand-ins (random weights) are there too. An attached server
needs the bundled model; the model switch uses its infinity_2b_reg.pth and flan-t5-xl (skipped when
it has no infinity_2b_reg.pth).

Each prompt is the shipped workflow workflows/api/infinity_t2i_bundled.json with a different prompt
text, seed, aspect ratio (the 15 templates) and batch size (1-4), queued as soon as the previous one
ended. The first 15 (--warmup) draw each aspect ratio once at batch size 4, so that every image size
and the largest buffers have been met before the memory baseline is taken after prompt 20. About one
in ten of the others is interrupted (POST /interrupt with its prompt id) when the sampler starts,
after one of its scales, or when the VAE decode starts. Halfway, two prompts run on a random-weight
stand-in (infinity_2b_reg.pth + flan-t5-xl) and then the bundled model comes back (reloaded: ComfyUI's
cache dropped it when the loader's input changed).

Checked after every prompt: a finished prompt has its batch of PNGs of the expected size in the
output folder; an interrupted one ended with execution_interrupted and wrote no file; GET /queue
answers; from the switch back on, the server log's count of live Infinity models (loader_nodes.py)
shows the stand-in released. Measured: the server's execution time per prompt (from the history's
execution_start to its end message), how long an interrupt took to stop the prompt, and the server
process's resident memory (RSS) after each prompt. Printed: the latency distribution (p50/p90/max),
the memory curve and RSS(end) / RSS(after the first 20 prompts), PASS when within 5%. Exit status 0
when every check passed. tests/test_comfy_robustness.py runs the same code with 10 prompts.

What the RSS shows depends on the C allocator: without nodes/memory.py (malloc_trim after each VAE
decode) glibc kept the freed buffers of the varying image and batch sizes, and the RSS climbed in
steps from 0.6 to 1.06 GB over 200 prompts while the memory in use stayed at 0.6 GB. Caches that
depend on the decoded sizes (e.g. oneDNN's convolution primitives, up to 1024 of them) grow until
every size has been decoded: hence the warm-up.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from comfy_server import ComfyError, ComfyServer, Listener  # noqa: E402  (tests/comfy_server.py)

BUNDLED = "Infinity tiny shapes (bundled)"
STAND_IN = ("infinity_2b_reg.pth", "flan-t5-xl")  # (transformer, text encoder) of the model switch
WORKFLOW = REPO / "workflows" / "api" / "infinity_t2i_bundled.json"
TIER = "0.06M"
RSS_TOLERANCE = 0.05
BASELINE_AFTER = 20
WARMUP = 15  # one prompt per aspect ratio at the largest batch, before the baseline

COLOURS = "red blue green yellow purple orange white black".split()
SHAPES = "circle square triangle star".split()
PLACES = "on the left|on the right|at the top|at the bottom|in the centre".split("|")


# ------------------------------------------------------------------------------------ websocket
def is_type(m, kind: str, prompt_id: str | None = None) -> bool:
    return (isinstance(m, dict) and m.get("type") == kind
            and (prompt_id is None or (m.get("data") or {}).get("prompt_id") == prompt_id))


END_TYPES = ("execution_success", "execution_error", "execution_interrupted")


def is_end(m, prompt_id: str) -> bool:
    return any(is_type(m, k, prompt_id) for k in END_TYPES)


# -------------------------------------------------------------------------------------- the plan
@dataclass
class Spec:
    index: int
    text: str
    seed: int
    aspect: int          # index into the schedule node's aspect_ratio options (= H_DIV_W_TEMPLATES)
    batch: int
    stand_in: bool = False
    interrupt: tuple | None = None  # ("executing", node key) or ("progress", scales done)


def make_plan(n: int, seed: int = 0, interrupts: int | None = None, switch_at: int | None = None,
              scales: int = 7, batches=(1, 1, 1, 2, 2, 3, 4), warmup: int = 0) -> list[Spec]:
    """n prompts: random texts, seeds, aspect ratios (15 templates) and batch sizes (drawn from
    `batches`); `interrupts` prompts (default n // 10, at least 1) interrupted at a random point; prompts
    switch_at and switch_at + 1 (default n // 2) on the random-weight stand-in. The first `warmup`
    prompts draw the aspect ratios in turn at the largest batch size, never interrupted: every image
    size, and the largest buffers, have been seen once they are done."""
    rng = random.Random(seed)
    switch_at = n // 2 if switch_at is None else switch_at
    plan = []
    for i in range(n):
        c1, c2 = rng.sample(COLOURS, 2)
        text = f"a {rng.choice(['small', 'big'])} {c1} {rng.choice(SHAPES)} {rng.choice(PLACES)}, {c2} background"
        if rng.random() < 0.2:
            c3 = rng.choice([c for c in COLOURS if c not in (c1, c2)])
            text += f", and a {c3} {rng.choice(SHAPES)} {rng.choice(PLACES)}"
        aspect, batch = rng.randrange(15), rng.choice(batches)
        if i < warmup:
            aspect, batch = i % 15, max(batches)
        plan.append(Spec(i, text, rng.randrange(2 ** 32), aspect, batch,
                         stand_in=switch_at <= i < switch_at + 2 if n >= 4 else False))
    k = max(1, n // 10) if interrupts is None else interrupts
    # never the first prompt (the model loads there), a warm-up one or a stand-in one
    candidates = [s.index for s in plan[max(1, warmup):] if not s.stand_in]
    for i in rng.sample(candidates, min(k, len(candidates))):
        plan[i].interrupt = rng.choice([("executing", "sampler"), ("progress", rng.randrange(1, scales - 1)),
                                        ("executing", "decode")])
    return plan


def load_template() -> tuple[dict, dict]:
    """(graph, {role: node id}) of the shipped bundled workflow."""
    graph = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    roles = {"InfinityModelLoader": "loader", "InfinityTextEncoderLoader": "text_encoder",
             "InfinityTextEncode": "encode", "InfinityScaleSchedule": "schedule", "InfinitySampler": "sampler",
             "InfinityVAEDecode": "decode", "SaveImage": "save"}
    ids = {roles[n["class_type"]]: k for k, n in graph.items() if n["class_type"] in roles}
    return graph, ids


def build_graph(spec: Spec, template: dict, ids: dict, aspect_labels: list[str], prefix: str) -> dict:
    g = json.loads(json.dumps(template))
    transformer, text_encoder = STAND_IN if spec.stand_in else (BUNDLED, BUNDLED)
    g[ids["loader"]]["inputs"]["transformer"] = transformer
    g[ids["text_encoder"]]["inputs"]["text_encoder"] = text_encoder
    g[ids["encode"]]["inputs"]["prompt"] = spec.text
    g[ids["schedule"]]["inputs"].update(mode="aspect ratio", aspect_ratio=aspect_labels[spec.aspect], tier=TIER)
    g[ids["sampler"]]["inputs"].update(seed=spec.seed, batch_size=spec.batch)
    g[ids["save"]]["inputs"]["filename_prefix"] = prefix
    return g


def expected_size(aspect: int) -> tuple[int, int]:
    from infinity_core import schedules
    h, w = schedules.image_size(schedules.get_schedule(schedules.H_DIV_W_TEMPLATES[aspect], TIER))
    return w, h


# ----------------------------------------------------------------------------------------- memory
def rss_reader(pid: int | None):
    """A function returning the resident memory (bytes) of process `pid` (psutil, else /proc)."""
    if pid is None:
        return lambda: None
    try:
        import psutil
        proc = psutil.Process(pid)
        return lambda: proc.memory_info().rss
    except ImportError:
        def read():
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        return read


def find_server_pid(port: int) -> int | None:
    """The local process listening on `port` (psutil), or None."""
    try:
        import psutil
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return c.pid
    except Exception:
        pass
    return None


# -------------------------------------------------------------------------------------------- run
@dataclass
class Result:
    spec: Spec
    prompt_id: str = ""
    outcome: str = ""           # finished / interrupted / error / timeout
    stopped_in: str = ""        # node type where an interrupted prompt stopped
    exec_s: float | None = None  # server execution time (history timestamps)
    wall_s: float = 0.0         # queue -> end message
    stop_s: float | None = None  # POST /interrupt -> end message
    interrupt_sent: bool = False
    rss: int | None = None
    answer_s: float | None = None
    problems: list = field(default_factory=list)


@dataclass
class Report:
    results: list
    baseline_after: int
    tolerance: float
    bundle: str
    seconds: float
    loads: list = field(default_factory=list)  # model_loads() of the server log during the run

    @property
    def problems(self) -> list[str]:
        return [f"prompt {r.spec.index}: {p}" for r in self.results for p in r.problems]

    @property
    def rss_ratio(self) -> float | None:
        rss = [r.rss for r in self.results]
        b = min(self.baseline_after, len(rss)) - 1
        if not rss or rss[b] is None or rss[-1] is None:
            return None
        return rss[-1] / rss[b]

    @property
    def memory_ok(self) -> bool | None:
        r = self.rss_ratio
        return None if r is None else abs(r - 1) <= self.tolerance

    @property
    def ok(self) -> bool:
        return not self.problems and self.memory_ok is not False

    def summary(self) -> str:
        res = self.results
        fin = [r for r in res if r.outcome == "finished"]
        intr = [r for r in res if r.outcome == "interrupted"]
        asked = [r for r in res if r.spec.interrupt]
        lines = [f"{len(res)} prompts in {self.seconds:.0f} s ({self.bundle}); "
                 f"{len(fin)} finished, {len(intr)} interrupted ({len(asked)} asked), "
                 f"{sum(r.spec.stand_in for r in res)} on the random-weight stand-in, "
                 f"{len(self.problems)} problems"]
        if fin:
            lines.append("latency of finished prompts (server execution time): " + _dist([r.exec_s for r in fin]))
            for b in sorted({r.spec.batch for r in fin}):
                lines.append(f"  batch {b}: " + _dist([r.exec_s for r in fin if r.spec.batch == b]))
            lines.append("  queue -> end message (wall clock): " + _dist([r.wall_s for r in fin]))
        if intr:
            where = {}
            for r in intr:
                where[r.stopped_in] = where.get(r.stopped_in, 0) + 1
            lines.append("interrupted prompts: stopped in " + ", ".join(f"{k} {v}" for k, v in sorted(where.items()))
                         + "; POST /interrupt -> stopped: " + _dist([r.stop_s for r in intr if r.stop_s is not None]))
        answers = [r.answer_s for r in res if r.answer_s is not None]
        if answers:
            lines.append(f"GET /queue after every prompt answered; slowest {max(answers) * 1000:.0f} ms")
        if self.loads:
            seq = ", ".join(f"{what} ({c[0]}/{c[1]}/{c[2]})" for what, c in self.loads)
            lines.append(f"loads (transformers/VAEs/text encoders in memory after each): {seq}")
        rss = [r.rss for r in res]
        if rss and rss[0] is not None:
            lines.append("memory curve (server RSS after prompt i):")
            picks = sorted({0, len(rss) - 1, min(self.baseline_after, len(rss)) - 1,
                            *range(0, len(rss), max(1, len(rss) // 20))})
            mib = [x / 2 ** 20 for x in rss]
            lo, hi = min(mib), max(mib)
            for i in picks:
                bar = "#" * (1 + int(40 * (mib[i] - lo) / (hi - lo))) if hi > lo else "#"
                tag = " <- baseline" if i == min(self.baseline_after, len(rss)) - 1 else ""
                lines.append(f"  {i + 1:4d}  {mib[i]:8.1f} MiB  {bar}{tag}")
            lines.append(f"  min {lo:.1f} MiB, max {hi:.1f} MiB")
            ratio = self.rss_ratio
            verdict = "PASS" if self.memory_ok else "FAIL"
            lines.append(f"RSS(end)/RSS(after {min(self.baseline_after, len(rss))} prompts) = {ratio:.4f}  "
                         f"{verdict} (within {self.tolerance:.0%})")
        else:
            lines.append("RSS not measured (no server process id)")
        for p in self.problems[:20]:
            lines.append("PROBLEM " + p)
        return "\n".join(lines)


def _pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


def _dist(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return (f"p50 {_pct(values, 0.5):.2f} s, p90 {_pct(values, 0.9):.2f} s, max {max(values):.2f} s "
            f"(n={len(values)})")


def _exec_seconds(entry: dict) -> float | None:
    msgs = (entry.get("status") or {}).get("messages") or []
    ts = {k: d.get("timestamp") for k, d in msgs if isinstance(d, dict)}
    end = next((ts[k] for k in END_TYPES if ts.get(k)), None)
    if ts.get("execution_start") and end:
        return (end - ts["execution_start"]) / 1000
    return None


def history_entry(srv: ComfyServer, prompt_id: str, timeout: float = 30.0) -> dict | None:
    """The history entry once ComfyUI stored it (shortly after the end message)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, hist, _ = srv.request("GET", f"/history/{prompt_id}")
        if status == 200 and isinstance(hist, dict) and prompt_id in hist:
            return hist[prompt_id]
        time.sleep(0.02)
    return None


def run(srv: ComfyServer, n: int = 200, *, seed: int = 0, interrupts: int | None = None,
        switch_at: int | None = None, warmup: int = 0, plan: list[Spec] | None = None,
        baseline_after: int = BASELINE_AFTER,
        tolerance: float = RSS_TOLERANCE, output_dir: str | None = None, prefix: str | None = None,
        bundle: str = "", timeout: float = 600.0, pid: int | None = None, log=print) -> Report:
    """Queue n prompts (make_plan(n, seed, interrupts, switch_at, warmup=warmup), or the given plan) back to back on a
    running ComfyUI (`srv`: tests/comfy_server.ComfyServer, started or attached) and check each; see the
    module docstring. The RSS is read from process `pid` (default: the server srv started); output_dir:
    the server's output folder, to check the files."""
    template, ids = load_template()
    aspect_labels = srv.node_info("InfinityScaleSchedule")["input"]["required"]["aspect_ratio"][1]["options"]
    options = srv.node_info("InfinityModelLoader")["input"]["required"]["transformer"][1]["options"]
    if BUNDLED not in options:
        raise ComfyError(f"the server offers no {BUNDLED!r} (transformers: {options[:8]})")
    plan = make_plan(n, seed, interrupts, switch_at, warmup=warmup) if plan is None else plan
    n = len(plan)
    if any(s.stand_in for s in plan) and STAND_IN[0] not in options:
        if log:
            log(f"note: no {STAND_IN[0]} on this server: the model switch is skipped")
        for s in plan:
            s.stand_in = False
    prefix = prefix or f"sustained_{uuid.uuid4().hex[:6]}"
    read_rss = rss_reader(pid or srv.pid)
    log_start = len(srv.log_text())
    results = []
    t_start = time.monotonic()
    with Listener(srv.port) as ws:
        for spec in plan:
            r = Result(spec)
            results.append(r)
            name = f"{prefix}/p{spec.index:04d}"
            graph = build_graph(spec, template, ids, aspect_labels, name)
            start = len(ws.messages)
            t0 = time.monotonic()
            try:
                r.prompt_id = prompt_id = srv.queue_prompt(graph, client_id=ws.client_id)["prompt_id"]
            except ComfyError as e:
                r.outcome = "error"
                r.problems.append(f"refused: {e}")
                continue
            t_int = None
            if spec.interrupt:
                kind, what = spec.interrupt
                node = ids[what] if kind == "executing" else ids["sampler"]

                def trigger(m, kind=kind, node=node, what=what, prompt_id=prompt_id):
                    if not is_type(m, kind, prompt_id) or m["data"].get("node") != node:
                        return False
                    return kind == "executing" or m["data"].get("value", 0) >= what
                hit = ws.wait(lambda m: trigger(m) or is_end(m, prompt_id), timeout, start)
                if hit and not is_end(hit[1], prompt_id):
                    status, _, _ = srv.request("POST", "/interrupt", {"prompt_id": prompt_id})
                    t_int = time.monotonic()
                    r.interrupt_sent = status == 200
                    if status != 200:
                        r.problems.append(f"POST /interrupt answered HTTP {status}")
            end = ws.wait(lambda m: is_end(m, prompt_id), timeout, start)
            r.wall_s = (end[0] if end else time.monotonic()) - t0
            if t_int is not None and end:
                r.stop_s = end[0] - t_int
            entry = history_entry(srv, prompt_id) if end else None
            r.rss = read_rss()
            t = time.monotonic()
            try:
                srv.get_json("/queue", timeout=10)
                r.answer_s = time.monotonic() - t
            except Exception as e:  # the server must keep answering
                r.problems.append(f"GET /queue failed after the prompt: {e}")
            if entry is None:
                r.outcome = "timeout"
                r.problems.append(f"no end after {timeout:.0f} s" if not end else "no history entry")
                if srv.proc is not None and not srv.alive():
                    r.problems.append("the server died")
                    break
                continue
            r.exec_s = _exec_seconds(entry)
            _check(srv, r, entry, ids, name, output_dir)
            if log and (spec.index + 1) % max(1, n // 20) == 0:
                log(f"  {spec.index + 1}/{n} prompts, {time.monotonic() - t_start:.0f} s"
                    + (f", RSS {r.rss / 2 ** 20:.0f} MiB" if r.rss else ""))
    report = Report(results, baseline_after, tolerance, bundle, time.monotonic() - t_start)
    report.loads = model_loads(srv.log_text()[log_start:])  # empty for an attached server (no log)
    switched = [r.spec.index for r in results if r.spec.stand_in]
    stand_in_loads = [i for i, x in enumerate(report.loads) if x[0] == STAND_IN[0]]
    if switched and stand_in_loads and switched[-1] + 1 < len(results):
        # from the switch back on, the stand-in is released (ComfyUI's cache dropped it and nothing of ours
        # holds it): every load reports at most one model of each kind in memory
        for what, counts in report.loads[stand_in_loads[-1] + 1:]:
            if max(counts) > 1:
                results[switched[-1] + 1].problems.append(
                    f"after the switch back, loading {what} left {counts[0]} transformers, {counts[1]} VAEs and "
                    f"{counts[2]} text encoders in memory")
    return report


# loader_nodes.py logs after each load "Infinity: loaded <label>: depth ... In memory: 1 transformer, 1 vae,
# 0 text encoders" (or "Infinity: loaded text encoder <path> (d_model ...")
_LOAD_LINE = re.compile(r"Infinity: loaded (text encoder .+? \(d_model|.+?: depth).*?In memory: (\d+) transformers?, "
                        r"(\d+) vaes?, (\d+) text encoders?")


def model_loads(log_text: str) -> list[tuple[str, tuple[int, int, int]]]:
    """(what was loaded: the transformer's label or "text encoder", (transformers, VAEs, text encoders in
    memory after it)) for each load the server log reports."""
    out = []
    for m in _LOAD_LINE.finditer(log_text):
        what = "text encoder" if m.group(1).startswith("text encoder ") else m.group(1)[:-len(": depth")]
        out.append((what, (int(m.group(2)), int(m.group(3)), int(m.group(4)))))
    return out


def _check(srv: ComfyServer, r: Result, entry: dict, ids: dict, name: str, output_dir: str | None) -> None:
    status = (entry.get("status") or {}).get("status_str")
    interrupted = ComfyServer.messages(entry, "execution_interrupted")
    save = ids["save"]
    files = sorted(glob.glob(os.path.join(output_dir, name + "_*"))) if output_dir else None
    if status == "success":
        r.outcome = "finished"
        if r.interrupt_sent:
            r.problems.append(f"interrupted at {r.spec.interrupt} but finished anyway")
        images = (entry.get("outputs", {}).get(save) or {}).get("images") or []
        if len(images) != r.spec.batch:
            r.problems.append(f"{len(images)} images for batch size {r.spec.batch}")
        want = expected_size(r.spec.aspect)
        from PIL import Image
        for im in images:
            path = os.path.join(output_dir, im["subfolder"], im["filename"]) if output_dir else None
            try:
                if path:
                    with Image.open(path) as pic:
                        size = pic.size
                else:
                    import io
                    with Image.open(io.BytesIO(srv.view(im["filename"], im["subfolder"], im["type"]))) as pic:
                        size = pic.size
            except Exception as e:
                r.problems.append(f"image {im['filename']} unreadable: {e}")
                continue
            if size != want:
                r.problems.append(f"image {im['filename']} is {size}, expected {want}")
        if files is not None and len(files) != r.spec.batch:
            r.problems.append(f"{len(files)} files in the output folder for batch size {r.spec.batch}")
    elif interrupted:
        r.outcome = "interrupted"
        r.stopped_in = interrupted[0][1].get("node_type", "?")
        if not r.interrupt_sent:
            r.problems.append("interrupted without being asked")
        if save in entry.get("outputs", {}):
            r.problems.append("an interrupted prompt has Save Image outputs")
        if files:
            r.problems.append(f"an interrupted prompt left files: {files}")
    else:
        r.outcome = "error"
        r.problems.append(srv.describe_failure(entry)[:600])


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--interrupts", type=int, default=None, help="interrupted prompts (default prompts // 10)")
    ap.add_argument("--baseline-after", type=int, default=BASELINE_AFTER)
    ap.add_argument("--warmup", type=int, default=WARMUP,
                    help=f"first prompts: each aspect ratio at the largest batch size (default {WARMUP})")
    ap.add_argument("--tolerance", type=float, default=RSS_TOLERANCE)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of a started server (INFINITY_TEST_THREADS; default 1 as in the tests)")
    ap.add_argument("--port", type=int, help="attach to the ComfyUI at 127.0.0.1:PORT instead of starting one")
    ap.add_argument("--pid", type=int, help="process id of the attached server (default: the one on --port)")
    ap.add_argument("--output-dir", help="the attached server's output folder (to check the files)")
    ap.add_argument("--keep", action="store_true", help="keep the started server's folder")
    args = ap.parse_args(argv)

    env, pid = None, None
    if args.port:
        srv = ComfyServer("", "", port=args.port)
        pid = args.pid or find_server_pid(args.port)
        output_dir = args.output_dir
        bundle = "attached server"
    else:
        import conftest  # tests/conftest.py: provisioning of ComfyUI (scripts/setup_comfyui.sh)
        import stand_ins
        if args.threads:
            os.environ["INFINITY_TEST_THREADS"] = str(args.threads)
        comfy_dir, python = conftest._provision_comfyui()
        root = Path(tempfile.mkdtemp(prefix="infinity-sustained-"))
        env = stand_ins.InfinityEnv(root)
        t = time.monotonic()
        srv = env.start(comfy_dir, python)
        print(f"ComfyUI started in {time.monotonic() - t:.1f} s at {srv.url} (pid {srv.pid}, log {srv.log_path})")
        output_dir = srv.output_dir
        bundle = ("bundled model: random-weight stand-in (INFINITY_BUNDLED_DIR)" if env.bundle_is_stand_in
                  else "bundled model: bundled/infinity_tiny_shapes")
    try:
        report = run(srv, args.prompts, seed=args.seed, interrupts=args.interrupts, warmup=args.warmup,
                     baseline_after=args.baseline_after,
                     tolerance=args.tolerance, output_dir=output_dir, bundle=bundle, pid=pid)
    finally:
        if env is not None:
            env.stop()
            if not args.keep:
                import shutil
                shutil.rmtree(env.root, ignore_errors=True)
    print(report.summary())
    print("ALL CHECKS PASSED" if report.ok else "CHECKS FAILED")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
