#!/usr/bin/env bash
# Make .venv (if missing) and install shoal into it: torch first, then the project
# with faiss-gpu where an NVIDIA GPU answers, faiss-cpu otherwise.
#   scripts/setup.sh [EXTRA]     e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extra=${1:-}
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($py --version 2>&1)"
  "$py" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then faiss=gpu; else faiss=cpu; fi
extras=$faiss${extra:+,$extra}
stamp=.venv/.shoal-install
want="$(sha256sum pyproject.toml | cut -c1-16) $extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { python -m pip --disable-pip-version-check -q "$@"; }
# torch first: 2.13.0 is a CPU build on this disk; a bare `torch` could pull a multi-GB CUDA build.
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0"
  pip install "torch==${SHOAL_TORCH_VERSION:-2.13.0}"
fi
echo "[setup] installing shoal[$extras] (faiss-$faiss)"
pip install -e ".[$extras]"
echo "$want" > "$stamp"
