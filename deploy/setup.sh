#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with medfed and its test tools.
#
# torch first: on a machine without an NVIDIA GPU we take the CPU build (torch==2.13.0; on
# this project's machines pip finds it on local disk), because a bare `torch` requirement
# pulls a multi-GB CUDA build. A machine whose venv already has torch keeps it; set
# MEDFED_TORCH to install a different spec (e.g. MEDFED_TORCH="torch" on a GPU host).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "setup: medfed needs Python 3.11 or newer ($PYTHON is older)" >&2; exit 2; }

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip

if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  if [ -n "${MEDFED_TORCH:-}" ]; then
    "${PIP[@]}" install "$MEDFED_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" install torch
  else
    "${PIP[@]}" install torch==2.13.0
  fi
fi
"${PIP[@]}" install -e ".[test]"

# Headless Chromium for the report's browser tests and `medfed report --pdf` (Debian's
# package; Playwright drives it, it never downloads a browser). Root installs it; anyone
# else is told how.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
      >/dev/null || echo "setup: could not install chromium; browser tests will skip" >&2
  else
    echo "setup: no chromium; for the browser tests run: sudo apt-get install chromium" >&2
  fi
fi
.venv/bin/medfed --help >/dev/null
echo "setup: done. Activate with '. .venv/bin/activate', or call .venv/bin/medfed directly."
