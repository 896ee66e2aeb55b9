"""Shared pytest fixture: `comfy_server`, one real ComfyUI 0.3.75 (CPU) for the whole session.

The server is started lazily: only a session that runs a test requesting `comfy_server` pays for
provisioning (scripts/setup_comfyui.sh: ~2.5 min on a fresh machine, under a second when the venv
is already there) and start-up (~10 s). It loads this repository as the custom-node package
`ComfyUI-Infinity` (so its web files are at /extensions/ComfyUI-Infinity/), uses ComfyUI's default
caching (vary an input to force re-execution) and a models dir at `comfy_server.models_dir`.

Environment:
  INFINITY_COMFYUI_DIR    use this ComfyUI checkout instead of provisioning one; its interpreter is
                          INFINITY_COMFY_PYTHON, else the interpreter running pytest
  INFINITY_COMFY_HOME     where setup_comfyui.sh keeps its venv (default ~/.cache/comfyui-infinity)
  INFINITY_COMFY_LOG      write the server log there (default: in the pytest temp dir, kept by pytest)
  CI=true                 a failed provisioning FAILS the tests that need the server; elsewhere they
                          are skipped with the reason
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_TESTS_DIR)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from comfy_server import ComfyError, ComfyServer, read_env_file  # noqa: E402

COMFY_PLUGIN_NAME = "ComfyUI-Infinity"
COMFY_EXPECT_NODES = ["InfinityModelLoader", "InfinityTextEncoderLoader", "InfinityTextEncode",
                      "InfinityScaleSchedule", "InfinitySampler", "InfinityEdit", "InfinityVAEDecode",
                      "InfinityVAEEncode"]


class _Unprovisioned(Exception):
    pass


def _provision_comfyui() -> tuple[str, str]:
    """(ComfyUI dir, its python): INFINITY_COMFYUI_DIR, else scripts/setup_comfyui.sh (reuses an install)."""
    comfy_dir = os.environ.get("INFINITY_COMFYUI_DIR")
    if comfy_dir:
        python = os.environ.get("INFINITY_COMFY_PYTHON") or sys.executable
        if not os.path.isfile(os.path.join(comfy_dir, "main.py")):
            raise _Unprovisioned(f"INFINITY_COMFYUI_DIR={comfy_dir} has no main.py")
        return comfy_dir, python
    setup = os.path.join(_REPO, "scripts", "setup_comfyui.sh")
    timeout = float(os.environ.get("INFINITY_COMFY_SETUP_TIMEOUT", "1800"))
    with tempfile.TemporaryDirectory(prefix="comfyui-infinity-env-") as tmp:
        env_file = os.path.join(tmp, "comfyui.env")
        try:
            r = subprocess.run(["bash", setup, "--env-file", env_file], cwd=_REPO, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise _Unprovisioned(f"scripts/setup_comfyui.sh did not finish: {e}") from e
        if r.returncode != 0 or not os.path.isfile(env_file):
            tail = "\n".join((r.stderr or "").splitlines()[-25:])
            raise _Unprovisioned(f"scripts/setup_comfyui.sh exited {r.returncode}:\n{tail}")
        env = read_env_file(env_file)
    return env["INFINITY_COMFYUI_DIR"], env["INFINITY_COMFY_PYTHON"]


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A running ComfyUI (tests/comfy_server.ComfyServer) with ComfyUI-Infinity loaded."""
    try:
        comfy_dir, python = _provision_comfyui()
    except _Unprovisioned as e:
        msg = f"no ComfyUI to test against: {e}"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg + "\n(run scripts/setup_comfyui.sh, or set INFINITY_COMFYUI_DIR)")
    base = tmp_path_factory.mktemp("comfyui")
    srv = ComfyServer(comfy_dir, python, {COMFY_PLUGIN_NAME: _REPO}, base_dir=str(base),
                      log_path=os.environ.get("INFINITY_COMFY_LOG") or str(base / "comfyui.log"),
                      expect_nodes=COMFY_EXPECT_NODES)
    try:
        srv.start()
    except ComfyError as e:  # provisioned but broken (e.g. our package fails to import): always a failure
        pytest.fail(f"ComfyUI did not start: {e}", pytrace=False)
    try:
        yield srv
    finally:
        srv.stop()


# -- the session's ComfyUI with the random-weight stand-ins of the official files ------------------
@pytest.fixture(scope="session")
def infinity(request, tmp_path_factory):
    """One server for every test file that needs models (tests/stand_ins.py builds them)."""
    import stand_ins
    return stand_ins.infinity_env(request, tmp_path_factory)


@pytest.fixture
def srv(infinity):
    return infinity.server
