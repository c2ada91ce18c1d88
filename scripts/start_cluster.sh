#!/usr/bin/env bash
# Start a Ray head for shoal on 127.0.0.1 only: dashboard :8265, Prometheus metrics :8080.
#   scripts/start_cluster.sh [extra `ray start` flags, e.g. --num-gpus=2 --block]
# Environment: SHOAL_RAY_PORT (6379), SHOAL_DASHBOARD_PORT (8265), SHOAL_METRICS_PORT (8080),
#              SHOAL_RAY_TEMP (ray's default /tmp/ray).
# Loopback only: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 with --node-ip-address=127.0.0.1 (this also
# refuses remote worker nodes). For a real multi-node cluster see README ("Ray cluster").
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi   # so `shoal` is on the jobs' PATH
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Token auth: a local ray.init() writes ~/.ray/auth_token and later heads turn token auth on;
# say so explicitly so `ray job submit` and dashboard calls agree (they need the same setting).
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
args=(--head --node-ip-address=127.0.0.1 --port="${SHOAL_RAY_PORT:-6379}"
      --dashboard-host=127.0.0.1 --dashboard-port="${SHOAL_DASHBOARD_PORT:-8265}"
      --metrics-export-port="${SHOAL_METRICS_PORT:-8080}" --disable-usage-stats)
if [ -n "${SHOAL_RAY_TEMP:-}" ]; then args+=(--temp-dir="$SHOAL_RAY_TEMP"); fi
echo "[start_cluster] dashboard http://127.0.0.1:${SHOAL_DASHBOARD_PORT:-8265} asks for a token: \
\`ray get-auth-token\` (file ${RAY_AUTH_TOKEN_PATH:-~/.ray/auth_token}); \
ray job commands need --address http://127.0.0.1:${SHOAL_DASHBOARD_PORT:-8265}" >&2
exec ray start "${args[@]}" "$@"
