#!/usr/bin/env bash
# Fresh machine: make .venv, install, ingest a sample corpus, run a query, print the hits.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
corpus=${SHOAL_DEMO_CORPUS:-demo_corpus}
if [ ! -d "$corpus" ]; then
  python scripts/make_corpus.py "$corpus" --limit 300
fi
shoal ingest "$corpus"
if [ -f ../shared/data/cranfield/corpus.jsonl ] || [ -n "${SHOAL_DEMO_CORPUS:-}" ]; then
  q=${SHOAL_DEMO_QUERY:-"how does a propeller slipstream change the lift of a wing"}
else
  q=${SHOAL_DEMO_QUERY:-"how are files split into chunks with character offsets"}
fi
echo
echo "\$ shoal query \"$q\" -k 5"
shoal query "$q" -k 5
echo
shoal status
echo
echo "Next: '. .venv/bin/activate && shoal search' for interactive search (type 'exit' to leave)."
