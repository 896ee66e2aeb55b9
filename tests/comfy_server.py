"""Start, drive and stop a real ComfyUI server for ComfyUI-Infinity's tests (stdlib only).

    from comfy_server import ComfyServer
    with ComfyServer(comfy_dir, python, plugins={"ComfyUI-Infinity": repo_root},
                     expect_nodes=["InfinityScaleSchedule"]) as srv:
        entry = srv.run({"1": {"class_type": ..., "inputs": {...}}})
        assert entry["status"]["status_str"] == "success", srv.describe_failure(entry)

The server runs `<python> -u main.py --cpu --listen 127.0.0.1 --port <free>` with cwd = the ComfyUI
directory, a fresh `--base-directory` (custom_nodes/ models/ input/ output/ temp/ user/, each plugin
symlinked into custom_nodes/), an in-memory database, no API nodes and no browser launch, in its own
process group; stop() sends SIGINT to the group (ComfyUI exits 0 in about a second), then SIGTERM,
then SIGKILL. The server's stdout+stderr go to `log_path` (default <base>/comfyui.log).

Models: pass `models_dir=DIR` to make <base>/models a symlink to DIR, and/or
`extra_model_paths={"name": {"base_path": DIR, "infinity": "subdir"}}` to write an
extra_model_paths.yaml and pass it with --extra-model-paths-config.

When the server's interpreter cannot import a real torchvision, `torchvision_stubs` (default
scripts/stubs of this repository: an import-only stand-in) is put on its PYTHONPATH: ComfyUI 0.3.75
imports torchvision at module level but only uses it for models this project never runs.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_STUBS = os.path.join(REPO_ROOT, "scripts", "stubs")

# What ComfyUI 0.3.75 logs (nodes.py load_custom_node) when a custom-node package does not load.
_PLUGIN_FAILURE_MARKERS = ("Cannot import {path} module for custom nodes",
                           "Error while calling comfy_entrypoint in {path}",
                           "comfy_entrypoint in {path} ",
                           "Skip {path} module for custom nodes")


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines of the environment file scripts/setup_comfyui.sh writes (# comments skipped)."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                out[k] = v
    return out


class ComfyError(RuntimeError):
    """A server that would not start, or a request that failed. `status`/`response` are set for
    rejected prompts (HTTP 400 from POST /prompt)."""

    status: int | None = None
    response: object = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec (Linux): SIGTERM when we die
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def python_has_module(python: str, module: str) -> bool:
    code = f"import importlib.util,sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


def _yaml_scalar(value) -> str:
    return json.dumps(str(value))  # a JSON string is a valid double-quoted YAML scalar


def write_extra_model_paths(path: str, config: dict[str, dict[str, str]]) -> str:
    """Write an extra_model_paths.yaml: {section: {"base_path": dir, folder_name: rel_or_abs_path}}."""
    lines = ["# written by tests/comfy_server.py"]
    for section, entries in config.items():
        lines.append(f"{section}:")
        for key, value in entries.items():
            if isinstance(value, (list, tuple)):  # several paths for one folder: a YAML block scalar
                lines.append(f"  {key}: |")
                lines += [f"    {v}" for v in value]
            elif isinstance(value, bool):
                lines.append(f"  {key}: {'true' if value else 'false'}")
            else:
                lines.append(f"  {key}: {_yaml_scalar(value)}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


class ComfyServer:
    def __init__(
        self,
        comfy_dir: str,
        python: str,
        plugins: dict[str, str] | list[str] | tuple[str, ...] = (),
        *,
        models_dir: str | None = None,
        extra_model_paths: dict[str, dict[str, str]] | None = None,
        base_dir: str | None = None,
        port: int | None = None,
        extra_args: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        log_path: str | None = None,
        startup_timeout: float = 240.0,
        expect_nodes: list[str] | tuple[str, ...] = (),
        torchvision_stubs: str | None = DEFAULT_STUBS,
        disable_api_nodes: bool = True,
    ):
        self.comfy_dir = os.path.abspath(comfy_dir)
        self.python = python
        if isinstance(plugins, dict):
            self.plugins = {name: os.path.abspath(p) for name, p in plugins.items()}
        else:
            self.plugins = {os.path.basename(os.path.abspath(p).rstrip("/")): os.path.abspath(p) for p in plugins}
        self.external_models_dir = os.path.abspath(models_dir) if models_dir else None
        self.extra_model_paths = extra_model_paths
        self.base_dir = base_dir
        self._own_base_dir = base_dir is None
        self.port = port
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.expect_nodes = list(expect_nodes)
        self.torchvision_stubs = torchvision_stubs
        self.disable_api_nodes = disable_api_nodes
        self.proc: subprocess.Popen | None = None
        self.object_info: dict = {}
        self.startup_seconds: float | None = None
        self._log_fh = None
        self._log_start = 0  # offset of this start's output in the log file

    # ------------------------------------------------------------------------------ paths
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def models_dir(self) -> str:
        return os.path.join(self.base_dir, "models")

    @property
    def input_dir(self) -> str:
        return os.path.join(self.base_dir, "input")

    @property
    def output_dir(self) -> str:
        return os.path.join(self.base_dir, "output")

    def plugin_link(self, name: str) -> str:
        return os.path.join(self.base_dir, "custom_nodes", name)

    # -------------------------------------------------------------------------- lifecycle
    def _prepare_base_dir(self) -> None:
        if self.base_dir is None:
            self.base_dir = tempfile.mkdtemp(prefix="comfyui-infinity-test-")
        # ComfyUI dies at start-up when <base>/custom_nodes is missing.
        for sub in ("custom_nodes", "input", "output", "temp", "user"):
            os.makedirs(os.path.join(self.base_dir, sub), exist_ok=True)
        models = self.models_dir
        if self.external_models_dir:
            os.makedirs(self.external_models_dir, exist_ok=True)
            if os.path.islink(models) or os.path.isfile(models):
                os.remove(models)
            elif os.path.isdir(models):
                if os.listdir(models):
                    raise ComfyError(f"{models} exists and is not empty; cannot link it to {self.external_models_dir}")
                os.rmdir(models)
            os.symlink(self.external_models_dir, models)
        else:
            os.makedirs(models, exist_ok=True)
        for name, path in self.plugins.items():
            if not os.path.isfile(os.path.join(path, "__init__.py")):
                raise ComfyError(f"plugin {path} has no __init__.py (a custom-node package is a directory with one)")
            link = self.plugin_link(name)
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(path, link)

    def command(self) -> list[str]:
        cmd = [self.python, "-u", os.path.join(self.comfy_dir, "main.py"),
               "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", self.base_dir,
               "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch"]
        if self.disable_api_nodes:
            cmd.append("--disable-api-nodes")
        if self.extra_model_paths:
            yaml_path = write_extra_model_paths(os.path.join(self.base_dir, "extra_model_paths.yaml"),
                                                self.extra_model_paths)
            cmd += ["--extra-model-paths-config", yaml_path]
        return cmd + self.extra_args

    def server_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "PYTHONUNBUFFERED": "1",
            # keep ComfyUI, HF hub and transformers off the network
            "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        })
        env.pop("PYTHONPATH", None)
        if self.torchvision_stubs and not python_has_module(self.python, "torchvision"):
            env["PYTHONPATH"] = self.torchvision_stubs
        env.update(self.env)
        return env

    def start(self) -> "ComfyServer":
        if not os.path.isfile(os.path.join(self.comfy_dir, "main.py")):
            raise ComfyError(f"no ComfyUI at {self.comfy_dir} (run scripts/setup_comfyui.sh)")
        if not (os.path.isfile(self.python) or shutil.which(self.python)):
            raise ComfyError(f"no interpreter {self.python}")
        self._prepare_base_dir()
        if self.log_path is None:
            self.log_path = os.path.join(self.base_dir, "comfyui.log")
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        explicit_port = self.port is not None
        env = self.server_env()
        for attempt in range(3):
            if not explicit_port:
                self.port = free_port()
            cmd = self.command()
            self._log_fh = open(self.log_path, "ab")
            self._log_start = self._log_fh.tell()
            self._log_fh.write(f"==== {' '.join(cmd)}\n".encode())
            self._log_fh.flush()
            t0 = time.monotonic()
            self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, env=env, stdin=subprocess.DEVNULL,
                                         stdout=self._log_fh, stderr=subprocess.STDOUT,
                                         start_new_session=True,  # own process group, see stop()
                                         # and never outlive a test run killed hard
                                         preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
            try:
                self._wait_ready()
            except ComfyError:
                tail = self.log_tail()
                self.stop()
                if not explicit_port and attempt < 2 and "address already in use" in tail.lower():
                    continue
                raise
            self.startup_seconds = time.monotonic() - t0
            break
        self._check_plugins()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with {self.proc.returncode} before answering; "
                                 f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/object_info", timeout=5) as r:
                    if r.status == 200:
                        self.object_info = json.load(r)
                        return
            except (urllib.error.URLError, ConnectionError, socket.timeout, json.JSONDecodeError):
                pass
            time.sleep(0.25)
        raise ComfyError(f"ComfyUI did not answer /object_info within {self.startup_timeout}s; "
                         f"log {self.log_path}:\n{self.log_tail()}")

    def plugin_failures(self) -> list[str]:
        log = self.log_text()
        return [name for name in self.plugins
                if any(m.format(path=self.plugin_link(name)) in log for m in _PLUGIN_FAILURE_MARKERS)]

    def _check_plugins(self) -> None:
        failed = self.plugin_failures()
        missing = [n for n in self.expect_nodes if n not in self.object_info]
        if failed or missing:
            tail = self.log_tail(150)
            self.stop()
            raise ComfyError(f"custom nodes did not load: failed packages {failed}, missing nodes {missing}; "
                             f"log {self.log_path}:\n{tail}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        """End the server's process group: SIGINT (ComfyUI logs "Stopped server" and exits 0),
        then SIGTERM, then SIGKILL. Returns the exit code."""
        rc = None
        if self.proc is not None:
            pgid = self.proc.pid  # == the group id: start_new_session=True
            for sig, wait in ((signal.SIGINT, timeout / 2), (signal.SIGTERM, timeout / 2), (signal.SIGKILL, 10.0)):
                if self.proc.poll() is not None:
                    break
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
                end = time.monotonic() + wait
                while time.monotonic() < end and self.proc.poll() is None:
                    time.sleep(0.05)
            rc = self.proc.poll()
            self.proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        return rc

    def cleanup(self) -> None:
        """Remove the base directory this object created (never an external models dir: it is a symlink)."""
        if self._own_base_dir and self.base_dir and os.path.isdir(self.base_dir):
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.cleanup()

    # ------------------------------------------------------------------------------- logs
    def log_text(self) -> str:
        """This start's part of the server log."""
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_start)
            return f.read().decode("utf-8", "replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -------------------------------------------------------------------------------- HTTP
    def request(self, method: str, path: str, body=None, timeout: float = 30.0,
                headers: dict | None = None) -> tuple[int, object, dict]:
        """(status, body, headers). The body is parsed JSON when it is JSON, else bytes.
        Never raises on HTTP error statuses."""
        data = None
        hdrs = dict(headers or {})
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw, rh = r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            status, raw, rh = e.code, e.read(), dict(e.headers or {})
        ctype = next((v for k, v in rh.items() if k.lower() == "content-type"), "")
        if raw and "json" in ctype:
            try:
                return status, json.loads(raw), rh
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
        return status, raw, rh

    def get_json(self, path: str, timeout: float = 30.0):
        status, body, _ = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyError(f"GET {path} -> HTTP {status}: {body!r}"[:2000])
        return body if not isinstance(body, (bytes, bytearray)) else json.loads(body)

    def get_file(self, path: str, timeout: float = 30.0) -> tuple[int, bytes, str]:
        """GET a static file or /view URL: (status, raw bytes, content type)."""
        req = urllib.request.Request(self.url + path, method="GET")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            return e.code, e.read(), (e.headers.get("Content-Type", "") if e.headers else "")

    def node_info(self, node_class: str | None = None) -> dict:
        """GET /object_info (all nodes) or /object_info/<class> (that node's schema)."""
        if node_class is None:
            return self.get_json("/object_info")
        info = self.get_json("/object_info/" + urllib.parse.quote(node_class))
        if node_class not in info:
            raise ComfyError(f"node {node_class} is not registered")
        return info[node_class]

    def view(self, filename: str, subfolder: str = "", type_: str = "output") -> bytes:
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type_})
        status, raw, _ = self.get_file("/view?" + q)
        if status != 200:
            raise ComfyError(f"GET /view?{q} -> HTTP {status}")
        return raw

    def queue_prompt(self, prompt: dict, client_id: str | None = None, extra_data: dict | None = None) -> dict:
        """POST /prompt with an API-format graph. Raises ComfyError(status, response) when rejected."""
        body = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        if extra_data:
            body["extra_data"] = extra_data
        status, resp, _ = self.request("POST", "/prompt", body)
        if status != 200:
            err = ComfyError(f"POST /prompt -> HTTP {status}: {json.dumps(resp, default=str)[:3000]}")
            err.status, err.response = status, resp
            raise err
        return resp

    def wait_for_history(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.1) -> dict:
        """Poll GET /history/<id> until the prompt finished (success, error or interrupted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, hist, _ = self.request("GET", f"/history/{prompt_id}")
            if status == 200 and isinstance(hist, dict) and prompt_id in hist:
                st = hist[prompt_id].get("status") or {}
                if st.get("completed") or st.get("status_str") in ("success", "error"):
                    return hist[prompt_id]
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI died while running {prompt_id}; log:\n{self.log_tail()}")
            time.sleep(poll)
        raise ComfyError(f"prompt {prompt_id} not finished after {timeout}s; log:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300.0, **kw) -> dict:
        """Queue a prompt and wait for its history entry."""
        return self.wait_for_history(self.queue_prompt(prompt, **kw)["prompt_id"], timeout)

    def interrupt(self, prompt_id: str | None = None) -> int:
        return self.request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})[0]

    @staticmethod
    def messages(entry: dict, kind: str | None = None) -> list:
        """The history entry's status messages ([type, data] pairs), optionally of one type."""
        msgs = (entry.get("status") or {}).get("messages") or []
        return [m for m in msgs if kind is None or m[0] == kind]

    def describe_failure(self, entry: dict) -> str:
        """A readable reason for a failed history entry (for assertion messages)."""
        for kind, data in self.messages(entry):
            if kind in ("execution_error", "execution_interrupted"):
                return (f"{kind} in node {data.get('node_id')} ({data.get('node_type')}): "
                        f"{data.get('exception_type', '')}: {data.get('exception_message', '')}\n"
                        + "".join(data.get("traceback") or []))
        return f"status {entry.get('status')}; log tail:\n{self.log_tail(40)}"


class Listener:
    """The websocket of one client id, read in a background thread (aiohttp, as ComfyUI's page does).
    `messages` holds (monotonic time, dict or bytes); `wait` blocks until a message matches.
    supports_preview_metadata: announce the feature so previews arrive with their prompt id."""

    def __init__(self, port: int, client_id: str | None = None, supports_preview_metadata: bool = False):
        self.client_id = client_id or uuid.uuid4().hex
        self.url = f"ws://127.0.0.1:{port}/ws?clientId={self.client_id}"
        self.flags = {"supports_preview_metadata": True} if supports_preview_metadata else None
        self.messages: list[tuple[float, object]] = []
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self):
        try:
            asyncio.run(self._run())
        except BaseException as e:  # reported by wait()
            self._error = e
        finally:
            self._ready.set()
            with self._cond:
                self._cond.notify_all()

    async def _run(self):
        import aiohttp
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.url, heartbeat=30, max_msg_size=0) as ws:
                if self.flags:
                    await ws.send_json({"type": "feature_flags", "data": self.flags})
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.2)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        item = json.loads(msg.data)
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        item = bytes(msg.data)
                    else:
                        raise ConnectionError(f"websocket closed: {msg.type}")
                    with self._cond:
                        self.messages.append((time.monotonic(), item))
                        self._cond.notify_all()

    def start(self) -> "Listener":
        self._thread.start()
        if not self._ready.wait(30) or self._error:
            raise ComfyError(f"websocket {self.url} did not connect: {self._error}")
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(10)

    __enter__ = start

    def __exit__(self, *exc):
        self.stop()

    def wait(self, pred, timeout: float, start: int = 0):
        """The first (time, message) from index `start` on for which pred(message) is true, or None."""
        deadline = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self.messages):
                    t, m = self.messages[i]
                    i += 1
                    if pred(m):
                        return t, m
                left = deadline - time.monotonic()
                if left <= 0 or self._error is not None or not self._thread.is_alive():
                    return None
                self._cond.wait(min(left, 0.5))

    def json_messages(self) -> list[dict]:
        with self._cond:
            return [m for _, m in self.messages if isinstance(m, dict)]

    def binary_messages(self) -> list[bytes]:
        with self._cond:
            return [m for _, m in self.messages if isinstance(m, bytes)]


def _main(argv=None) -> int:
    """Manual use: start ComfyUI with this repository loaded, print its URL, stop on Ctrl-C.

    python tests/comfy_server.py [--port N] [--models-dir DIR]
    ComfyUI and its python come from INFINITY_COMFYUI_DIR / INFINITY_COMFY_PYTHON, else from the
    env file scripts/setup_comfyui.sh writes (<INFINITY_COMFY_HOME>/venv/comfyui-infinity.env).
    """
    import argparse
    p = argparse.ArgumentParser(description=_main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int)
    p.add_argument("--models-dir")
    p.add_argument("--name", default="ComfyUI-Infinity", help="custom_nodes/ folder name for this repository")
    a = p.parse_args(argv)
    comfy_dir, python = os.environ.get("INFINITY_COMFYUI_DIR"), os.environ.get("INFINITY_COMFY_PYTHON")
    if not comfy_dir:
        home = os.environ.get("INFINITY_COMFY_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "comfyui-infinity")
        env_file = os.path.join(os.environ.get("INFINITY_COMFY_VENV") or os.path.join(home, "venv"), "comfyui-infinity.env")
        if not os.path.isfile(env_file):
            print(f"no {env_file}: run scripts/setup_comfyui.sh first (or set INFINITY_COMFYUI_DIR)")
            return 1
        with open(env_file, encoding="utf-8") as f:
            env = dict(line.strip().split("=", 1) for line in f if "=" in line and not line.startswith("#"))
        comfy_dir, python = env["INFINITY_COMFYUI_DIR"], python or env["INFINITY_COMFY_PYTHON"]
    srv = ComfyServer(comfy_dir, python or "python3", {a.name: REPO_ROOT}, port=a.port, models_dir=a.models_dir)

    def _on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _on_term)
    try:
        srv.start()
        print(f"ComfyUI at {srv.url} (base dir {srv.base_dir}, log {srv.log_path}); Ctrl-C stops it", flush=True)
        while srv.alive():
            time.sleep(0.5)
        print(f"ComfyUI exited; log tail:\n{srv.log_tail()}")
        return 1
    except KeyboardInterrupt:
        return 0
    except ComfyError as e:
        print(e)
        return 1
    finally:
        srv.stop()
        srv.cleanup()


if __name__ == "__main__":
    raise SystemExit(_main())
