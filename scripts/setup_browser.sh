#!/usr/bin/env bash
# setup_browser.sh -- what tests/test_comfy_browser.py needs: Debian's chromium and the npm packages
# of tests/browser (playwright-core only; it drives the system chromium and downloads no browser).
#
# Idempotent: chromium is installed only when missing (apt-get, as root or through sudo), and
# `npm ci` runs only when tests/browser/node_modules does not match package-lock.json. Logs go to
# stderr. Usage: scripts/setup_browser.sh   (env CHROMIUM=/path/to/chromium skips the apt step)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BROWSER_DIR="$HERE/../tests/browser"
log() { echo "[setup_browser $(date +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
t0=$(date +%s)

chromium="${CHROMIUM:-}"
if [ -z "$chromium" ]; then
  chromium="$(command -v chromium || command -v chromium-browser || true)"
fi
if [ -z "$chromium" ] || [ ! -x "$chromium" ]; then
  command -v apt-get >/dev/null || die "no chromium and no apt-get: install Chromium and set CHROMIUM=/path/to/it"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "installing chromium needs root (or sudo)"
    SUDO="sudo"
  fi
  log "installing chromium (apt-get)"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >&2
  chromium="$(command -v chromium)"
fi
log "chromium: $chromium ($("$chromium" --version 2>/dev/null || echo 'version unknown'))"

command -v node >/dev/null || die "Node.js (>= 20) is needed for tests/browser"
command -v npm >/dev/null || die "npm is needed for tests/browser"
stamp="$BROWSER_DIR/node_modules/.comfyui-infinity-lock.sha256"
want="$(sha256sum "$BROWSER_DIR/package-lock.json" | cut -d' ' -f1)"
if [ -d "$BROWSER_DIR/node_modules/playwright-core" ] && [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ]; then
  log "tests/browser/node_modules is current"
else
  log "npm ci in tests/browser"
  (cd "$BROWSER_DIR" && npm ci --no-audit --no-fund --loglevel=error >&2)
  echo "$want" > "$stamp"
fi
log "done in $(( $(date +%s) - t0 ))s"
