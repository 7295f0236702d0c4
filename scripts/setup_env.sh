#!/usr/bin/env bash
# Create .venv (if missing) and install occ-mfd with its extras. Idempotent; re-run after pulling.
#   TORCH_SPEC   torch requirement installed first (default: the CPU wheel torch==2.13.0).
#                GPU users: TORCH_SPEC=skip to keep a torch already in the venv, or e.g.
#                TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124".
#   SPARSE_SPEC  spconv build (default spconv==2.3.8, the CPU build). GPU: a CUDA 12 torch and spconv-cu126 (or
#                cu121/cu124; all 2.3.8, Python 3.10-3.13); spconv-cu120 stops at 2.3.6 and Python 3.11. spconv has
#                no CUDA 13 build: PyPI's default torch 2.13 is CUDA 13, so take torch from a cu12x index.
#   EXTRAS       extras to install (default sparse,viz,dev).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
SPARSE_SPEC=${SPARSE_SPEC:-spconv==2.3.8}
EXTRAS=${EXTRAS:-viz,dev}

# Debian libraries open3d needs (libusb) and for headless EGL rendering; only when we are root.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=""
  for p in libusb-1.0-0 libegl1 libgl1 libgomp1; do
    dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
  done
  if [ -n "$need" ]; then
    echo "[setup] apt-get install$need"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
  fi
  # Optional: a virtual X display, key presses and screenshots for the interactive-viewer test
  # (tests/test_viewer_x11.py, which skips without them); a failed install is not fatal.
  xneed=""
  for p in xvfb xauth xdotool imagemagick; do
    dpkg -s "$p" >/dev/null 2>&1 || xneed="$xneed $p"
  done
  if [ -n "$xneed" ]; then
    echo "[setup] apt-get install$xneed (for the X viewer test)"
    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $xneed >/dev/null; } \
      || echo "[setup] could not install$xneed; tests/test_viewer_x11.py will skip"
  fi
fi

[ -x "$VENV/bin/python" ] || { echo "[setup] creating $VENV"; python3 -m venv "$VENV"; }
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.occ_mfd_installed"
want="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16) $TORCH_SPEC $SPARSE_SPEC $EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
$PIP install -q --upgrade pip
if [ "$TORCH_SPEC" != skip ]; then
  echo "[setup] installing $TORCH_SPEC"
  $PIP install -q $TORCH_SPEC
fi
if [ "$SPARSE_SPEC" != skip ]; then
  $PIP install -q "$SPARSE_SPEC"
fi
echo "[setup] installing occ-mfd[$EXTRAS]"
$PIP install -q -e ".[$EXTRAS]"
echo "$want" > "$stamp"
# Does the installed spconv fit this torch? (a CUDA spconv with a CPU torch, a CUDA major mismatch, two builds …)
$VENV/bin/python -c 'from occ_mfd.models.sparse import spconv_status as s; p = s().problem
print("[setup] spconv:", "fits torch" if p is None else "WARNING: " + p)' 2>/dev/null || true
echo "[setup] done: $($VENV/bin/python -c 'import torch, numpy; print("torch", torch.__version__, "numpy", numpy.__version__)')"
