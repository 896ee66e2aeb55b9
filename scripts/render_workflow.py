#!/usr/bin/env python3
"""Render a shipped workflow headless through a real ComfyUI and copy its PNGs into a folder.

    scripts/render_workflow.py WORKFLOW --out DIR [--prompt TEXT] [--seed N]

WORKFLOW is a UI-format workflow of workflows/ (its API twin workflows/api/<same name> is what is
queued) or an API-format file itself. The script starts ComfyUI (tests/comfy_server.ComfyServer:
CPU, a throw-away base directory with this repository in custom_nodes/, no browser, no network),
POSTs the graph to /prompt, waits for /history, copies the PNGs the graph saved into DIR, prints
their paths and the time taken, and stops the server. --prompt replaces the positive prompt text,
--seed the sampler seed. Exit code 0 on success, 1 when the render fails, 2 on bad input.

Which ComfyUI: --comfyui/--python, else INFINITY_COMFYUI_DIR/INFINITY_COMFY_PYTHON, else the env
file scripts/setup_comfyui.sh writes (<INFINITY_COMFY_HOME or ~/.cache/comfyui-infinity>/venv/
comfyui-infinity.env).

The bundled model: when the workflow loads "Infinity tiny shapes (bundled)" and
bundled/infinity_tiny_shapes/transformer.safetensors (or the one in $INFINITY_BUNDLED_DIR) is not
there, the script builds a random-weight stand-in with the real file layout (tests/stand_ins.py
write_bundle) in a temporary folder, points the server at it with INFINITY_BUNDLED_DIR, says so,
and names the PNGs random_stand_in_*.png: the picture then shows that the pipeline runs, not what
the trained model draws.

This file only needs the Python standard library; the stand-in is built by the ComfyUI interpreter.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from comfy_server import ComfyError, ComfyServer, read_env_file  # noqa: E402  (stdlib only)

PLUGIN_NAME = "ComfyUI-Infinity"
BUNDLED_LABEL = "Infinity tiny shapes (bundled)"  # nodes/model_paths.py BUNDLED_LABEL
BUNDLED_ENV = "INFINITY_BUNDLED_DIR"  # nodes/model_paths.py BUNDLED_ENV
REPO_BUNDLE = REPO / "bundled" / "infinity_tiny_shapes"
STAND_IN_PREFIX = "random_stand_in_"
EXPECT_NODES = ["InfinityModelLoader", "InfinityTextEncoderLoader", "InfinityTextEncode",
                "InfinityScaleSchedule", "InfinitySampler", "InfinityVAEDecode"]

# Runs in the ComfyUI interpreter (it has torch, safetensors, transformers, sentencepiece).
_BUILD_STAND_IN = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from stand_ins import write_bundle
write_bundle(sys.argv[3])
"""


class UsageError(Exception):
    """Bad input from the user (exit code 2)."""


class RenderError(Exception):
    """The render failed (exit code 1)."""


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ inputs
def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from e
    except ValueError as e:
        raise UsageError(f"{what} {path} is not valid JSON: {e}") from e


def _is_api_graph(data) -> bool:
    return (isinstance(data, dict) and bool(data)
            and all(isinstance(n, dict) and "class_type" in n for n in data.values()))


def resolve_workflow(arg: str) -> tuple[Path, dict]:
    """(API-format file, its graph) for a UI workflow (-> its twin in api/) or an API-format file."""
    given = Path(arg).expanduser()
    candidates = [given] if given.is_absolute() else list(dict.fromkeys([Path.cwd() / given, REPO / given]))
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        shipped = sorted(p.name for p in (REPO / "workflows").glob("*.json"))
        raise UsageError(f"workflow not found: {arg} (looked at {', '.join(str(c) for c in candidates)}); "
                         f"shipped workflows: {', '.join('workflows/' + s for s in shipped) or 'none'}")
    data = _read_json(path, "workflow")
    if _is_api_graph(data):
        return path, data
    if not (isinstance(data, dict) and "nodes" in data):
        raise UsageError(f"{path} is neither a ComfyUI workflow (UI format, with 'nodes') nor an API-format graph")
    twin = path.parent / "api" / path.name
    if not twin.is_file():
        raise UsageError(f"{path} is a UI-format workflow and its API twin {twin} does not exist "
                         f"(export it with ComfyUI's 'Export (API)', or pass an API-format file)")
    data = _read_json(twin, "API workflow")
    if not _is_api_graph(data):
        raise UsageError(f"{twin} is not an API-format graph ({{node id: {{class_type, inputs}}}})")
    return twin, data


def _link_target(value):
    """The node id of a link input ([node id, output index]), else None."""
    if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
        return str(value[0])
    return None


def set_prompt(graph: dict, text: str) -> list[str]:
    """Replace the text of the prompt nodes that feed a sampler's `positive` input (or, when nothing is
    linked that way, of the only node with a text `prompt` input). Returns the changed node ids."""
    targets = []
    for node in graph.values():
        nid = _link_target((node.get("inputs") or {}).get("positive"))
        if nid in graph and isinstance((graph[nid].get("inputs") or {}).get("prompt"), str):
            targets.append(nid)
    if not targets:
        with_prompt = [nid for nid, n in graph.items() if isinstance((n.get("inputs") or {}).get("prompt"), str)]
        if len(with_prompt) == 1:
            targets = with_prompt
    if not targets:
        raise UsageError("--prompt: the workflow has no positive prompt node (a node with a text 'prompt' "
                         "input linked to a sampler's 'positive')")
    for nid in dict.fromkeys(targets):
        graph[nid]["inputs"]["prompt"] = text
    return list(dict.fromkeys(targets))


def set_seed(graph: dict, seed: int) -> list[str]:
    targets = [nid for nid, n in graph.items()
               if isinstance((n.get("inputs") or {}).get("seed"), int)
               and not isinstance(n["inputs"]["seed"], bool)]
    if not targets:
        raise UsageError("--seed: the workflow has no node with a number 'seed' input")
    for nid in targets:
        graph[nid]["inputs"]["seed"] = seed
    return targets


def uses_bundled(graph: dict) -> bool:
    return any(v == BUNDLED_LABEL for n in graph.values() for v in (n.get("inputs") or {}).values())


def input_files(graph: dict) -> list[Path]:
    """Pictures a LoadImage node names that ship in workflows/input/ (copied into ComfyUI's input/)."""
    out = []
    for n in graph.values():
        name = (n.get("inputs") or {}).get("image")
        if n.get("class_type") == "LoadImage" and isinstance(name, str):
            p = REPO / "workflows" / "input" / name
            if p.is_file():
                out.append(p)
    return out


def find_comfyui(comfy_dir: str | None, python: str | None) -> tuple[str, str]:
    comfy_dir = comfy_dir or os.environ.get("INFINITY_COMFYUI_DIR")
    python = python or os.environ.get("INFINITY_COMFY_PYTHON")
    if not comfy_dir:
        home = os.environ.get("INFINITY_COMFY_HOME") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                     "comfyui-infinity")
        env_file = os.path.join(os.environ.get("INFINITY_COMFY_VENV") or os.path.join(home, "venv"),
                                "comfyui-infinity.env")
        if not os.path.isfile(env_file):
            raise UsageError(f"no ComfyUI found: {env_file} does not exist. Run scripts/setup_comfyui.sh "
                             f"first (scripts/quickstart.sh does), or set INFINITY_COMFYUI_DIR "
                             f"(and INFINITY_COMFY_PYTHON) or pass --comfyui/--python")
        env = read_env_file(env_file)
        if not env.get("INFINITY_COMFYUI_DIR"):
            raise UsageError(f"{env_file} names no INFINITY_COMFYUI_DIR; rerun scripts/setup_comfyui.sh")
        comfy_dir = env["INFINITY_COMFYUI_DIR"]
        python = python or env.get("INFINITY_COMFY_PYTHON")
    python = python or sys.executable
    if not os.path.isfile(os.path.join(comfy_dir, "main.py")):
        raise UsageError(f"no ComfyUI at {comfy_dir} (no main.py); run scripts/setup_comfyui.sh")
    return comfy_dir, python


# ---------------------------------------------------------------------------------- output
def _free_name(out_dir: Path, name: str) -> Path:
    """out_dir/name, or out_dir/<stem>-<n><suffix> when that exists (never overwrite an earlier render)."""
    target = out_dir / name
    n = 1
    while target.exists():
        target = out_dir / f"{Path(name).stem}-{n}{Path(name).suffix}"
        n += 1
    return target


def collect_pngs(srv: ComfyServer, entry: dict, out_dir: Path, prefix: str) -> list[Path]:
    copied = []
    for node_out in (entry.get("outputs") or {}).values():
        for img in node_out.get("images") or []:
            name = img.get("filename", "")
            if img.get("type") != "output" or not name.lower().endswith(".png"):
                continue
            target = _free_name(out_dir, prefix + name)
            src = Path(srv.output_dir, img.get("subfolder") or "", name)
            if src.is_file():
                shutil.copyfile(src, target)
            else:  # not on this filesystem for some reason: ask the server
                target.write_bytes(srv.view(name, img.get("subfolder") or "", "output"))
            copied.append(target)
    return copied


def describe_rejection(err: ComfyError, graph: dict) -> str:
    """The server's message for a prompt rejected by POST /prompt (validation errors per node)."""
    resp = err.response if isinstance(err.response, dict) else {}
    if not resp:
        return str(err)
    top = resp.get("error") or {}
    lines = [f"ComfyUI rejected the workflow: {top.get('message', '')}"
             + (f" ({top['details']})" if top.get("details") else "")]
    for nid, ne in (resp.get("node_errors") or {}).items():
        ctype = ne.get("class_type") or (graph.get(str(nid)) or {}).get("class_type", "?")
        for e in ne.get("errors") or []:
            extra = e.get("extra_info") or {}
            where = f" (input {extra['input_name']})" if extra.get("input_name") else ""
            detail = f": {e['details']}" if e.get("details") else ""
            lines.append(f"  node {nid} ({ctype}){where}: {e.get('message', '')}{detail}")
    return "\n".join(lines)


def describe_failure(srv: ComfyServer, entry: dict, verbose: bool) -> str:
    """The failing node and its message (with the traceback when verbose) for a failed history entry."""
    for kind, data in srv.messages(entry):
        if kind in ("execution_error", "execution_interrupted"):
            msg = (f"the workflow failed in node {data.get('node_id')} ({data.get('node_type')}): "
                   f"{data.get('exception_type', '')}: {data.get('exception_message', '')}".rstrip())
            if verbose:
                msg += "\n" + "".join(data.get("traceback") or [])
            return msg
    return f"the workflow did not succeed: status {entry.get('status')}; log tail:\n{srv.log_tail(40)}"


# ------------------------------------------------------------------------------------ main
def render(args) -> int:
    t_start = time.monotonic()
    api_path, graph = resolve_workflow(args.workflow)
    if args.prompt is not None:
        set_prompt(graph, args.prompt)
    if args.seed is not None:
        set_seed(graph, args.seed)
    comfy_dir, python = find_comfyui(args.comfyui, args.python)
    out_dir = Path(args.out).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    env: dict[str, str] = {}
    bundle_dir = Path(os.environ[BUNDLED_ENV]) if os.environ.get(BUNDLED_ENV) else REPO_BUNDLE
    stand_in = uses_bundled(graph) and not (bundle_dir / "transformer.safetensors").is_file()
    work = Path(tempfile.mkdtemp(prefix="infinity-render-"))
    builder = None
    srv = None
    try:
        if stand_in:
            missing = bundle_dir / "transformer.safetensors"
            shown = missing.relative_to(REPO) if missing.is_relative_to(REPO) else missing
            print(f"NOTE: {shown} is not in this checkout (the trained bundled model is not published yet).\n"
                  f"NOTE: rendering with RANDOM STAND-IN WEIGHTS in the bundle's file layout: the image shows "
                  f"that the whole ComfyUI pipeline runs, not what the trained model draws "
                  f"(files named {STAND_IN_PREFIX}*.png).", flush=True)
            bundle_dir = work / "stand_in_bundle"
            env[BUNDLED_ENV] = str(bundle_dir)
            # Built while ComfyUI starts, into a staging folder renamed into place when complete (the
            # nodes only see the bundle once its files are all there).
            builder_log = open(work / "stand_in_build.log", "wb")
            builder = subprocess.Popen(
                [python, "-c", _BUILD_STAND_IN, str(TESTS), str(REPO), str(work / "staging")],
                cwd=str(REPO), stdin=subprocess.DEVNULL, stdout=builder_log, stderr=subprocess.STDOUT)
            builder_log.close()
        log_path = args.log or str(work / "comfyui.log")
        say(f"starting ComfyUI ({comfy_dir}) with {REPO} in custom_nodes/ ...")
        srv = ComfyServer(comfy_dir, python, {PLUGIN_NAME: str(REPO)}, base_dir=str(work / "comfyui"),
                          models_dir=args.models_dir, env=env, log_path=log_path,
                          startup_timeout=args.startup_timeout, expect_nodes=EXPECT_NODES)
        try:
            srv.start()
        except ComfyError as e:
            hint = "" if args.log else "\n(that log is removed on exit: pass --log FILE to keep it)"
            raise RenderError(f"ComfyUI failed to start: {e}{hint}") from e
        t_ready = time.monotonic()
        say(f"ComfyUI is up at {srv.url} after {srv.startup_seconds:.1f}s")
        if builder is not None:
            try:
                builder.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired as e:
                raise RenderError(f"building the stand-in bundle took over {args.timeout:.0f}s") from e
            if builder.returncode != 0:
                output = (work / "stand_in_build.log").read_text(encoding="utf-8", errors="replace")
                tail = "\n".join(output.splitlines()[-30:])
                raise RenderError(f"building the stand-in bundle failed (exit {builder.returncode}):\n{tail}")
            os.rename(work / "staging", bundle_dir)
        for pic in input_files(graph):
            shutil.copy(pic, Path(srv.input_dir) / pic.name)

        say(f"rendering {api_path.relative_to(REPO) if api_path.is_relative_to(REPO) else api_path} ...")
        t_queue = time.monotonic()
        try:
            entry = srv.run(graph, timeout=args.timeout)
        except ComfyError as e:
            if e.status is not None:
                raise RenderError(describe_rejection(e, graph)) from e
            raise RenderError(str(e)) from e
        t_done = time.monotonic()
        status = entry.get("status") or {}
        if status.get("status_str") != "success":
            raise RenderError(describe_failure(srv, entry, args.verbose))
        pngs = collect_pngs(srv, entry, out_dir, STAND_IN_PREFIX if stand_in else "")
        if not pngs:
            raise RenderError(f"the workflow ran but saved no PNG (does it end in a Save Image node?); "
                              f"outputs: {json.dumps(entry.get('outputs'))[:1000]}")
        for p in pngs:
            print(p)
        print(f"rendered {len(pngs)} image(s) in {t_done - t_queue:.1f}s "
              f"(ComfyUI start {t_ready - t_start:.1f}s, total {time.monotonic() - t_start:.1f}s)"
              + (" -- random stand-in weights, not the trained model" if stand_in else ""), flush=True)
        return 0
    finally:
        if builder is not None and builder.poll() is None:
            builder.kill()
            builder.wait()
        if srv is not None:
            srv.stop()
        if args.log and srv is not None:
            say(f"ComfyUI log: {args.log}")
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow", help="workflows/<name>.json (its twin workflows/api/<name>.json is run) "
                                    "or an API-format file")
    p.add_argument("--out", required=True, help="folder for the PNGs (created if missing)")
    p.add_argument("--prompt", help="replace the positive prompt text")
    p.add_argument("--seed", type=int, help="replace the sampler seed")
    p.add_argument("--models-dir", help="use this folder as ComfyUI's models/ (for workflows that name "
                                        "official weights)")
    p.add_argument("--comfyui", help="ComfyUI directory (default: INFINITY_COMFYUI_DIR or the setup env file)")
    p.add_argument("--python", help="its interpreter (default: INFINITY_COMFY_PYTHON or the setup env file)")
    p.add_argument("--log", help="keep the ComfyUI log in this file (default: a temporary file, removed)")
    p.add_argument("--verbose", action="store_true", help="show the traceback of a node that fails")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the render (default 900)")
    p.add_argument("--startup-timeout", type=float, default=240.0, help="seconds to wait for ComfyUI to start")
    args = p.parse_args(argv)
    try:
        return render(args)
    except UsageError as e:
        print(f"render_workflow.py: error: {e}", file=sys.stderr)
        return 2
    except RenderError as e:
        print(f"render_workflow.py: render failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("render_workflow.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
