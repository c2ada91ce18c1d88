#!/usr/bin/env bash
# Fresh machine: make .venv if needed, install with test extras, run the whole suite.
#   scripts/test.sh [pytest args]      e.g. scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh test
# shellcheck disable=SC1091
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
exec python -m pytest -q -p no:cacheprovider "${@:-tests}"
