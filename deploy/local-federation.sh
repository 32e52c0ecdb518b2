#!/usr/bin/env bash
# One machine, three hospitals, for real: a Prefect server on a free loopback port, three
# site roots each set up with `medfed site init`, one work pool and one worker process per
# site, a coordinator root holding no site secret, and a 2-round job run through the workers.
#
#   bash deploy/local-federation.sh WORKDIR
#
# Every process it starts is stopped when it exits. Needs the README's setup (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
[ $# -eq 1 ] || { echo "usage: bash deploy/local-federation.sh WORKDIR" >&2; exit 2; }
mkdir -p "$1"
W=$(cd "$1" && pwd)
BIN=$REPO/.venv/bin
[ -x "$BIN/medfed" ] || { echo "local-federation: run 'bash deploy/setup.sh' first" >&2; exit 2; }
ROUNDS=${MEDFED_ROUNDS:-2}
EPOCHS=${MEDFED_LOCAL_EPOCHS:-5}

export PREFECT_HOME="$W/prefect-home"      # this federation's own Prefect database and settings
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_WORKER_QUERY_SECONDS=1        # a process worker polls every 10 s by default
export PREFECT_WORKER_PREFETCH_SECONDS=5
export PREFECT_LOGGING_LEVEL=WARNING
# Three sites share this machine: each worker's torch / BLAS threads get their share of the
# cores (one thread per core in each of three processes thrashes: rounds 4-5x slower).
THREADS=$(( $(nproc) / 3 )); [ "$THREADS" -ge 1 ] || THREADS=1
PIDS=()
cleanup() {
  # Workers first (newest first), then the server they talk to; whatever has not exited after
  # a grace period is killed (a worker whose server is gone retries instead of exiting).
  local i pid
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    pid=${PIDS[i]}
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 -- "-$pid" 2>/dev/null || kill -9 "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
trap cleanup EXIT

PORT=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" >"$W/prefect-server.log" 2>&1 &
PIDS+=($!); disown "$!"
for _ in $(seq 1 120); do
  curl -fs "$PREFECT_API_URL/health" >/dev/null 2>&1 && break
  sleep 1
done
curl -fs "$PREFECT_API_URL/health" >/dev/null || { echo "local-federation: Prefect server did not start" >&2; exit 1; }
echo "Prefect server: $PREFECT_API_URL"

# The coordinator: its own keys only.
COORD="$W/coordinator"
KEY=$("$BIN/medfed" coordinator-key "$COORD")

# Three hospitals, each in its own root; the demo data stands in for their PACS exports.
"$BIN/medfed" demo-data "$W/data" >/dev/null
SITES=(lakeside northfield st-mary)
for s in "${SITES[@]}"; do
  [ -f "$W/sites/$s/site.toml" ] || "$BIN/medfed" site init "$W/sites/$s" --name "$s" \
    --data "$W/data/$s" --labels "$W/data/$s/manifest.csv" \
    --federation local --coordinator-key "$KEY" --epsilon-budget 10 >/dev/null
done

# The federation file names sites by their public keys (from their enrollment files).
FED="$COORD/federation.toml"
cat >"$FED" <<TOML
name = "local"
rounds = $ROUNDS
local_epochs = $EPOCHS
batch_size = 16
learning_rate = 0.25
min_sites = 2
seed = 7
ledger_url = "sqlite:///$W/ledger.db"
artifact_store = "$W/artifacts"
coordinator_root = "$COORD"
site_timeout_seconds = 600

[model]
kind = "cnn"
hidden = 64

[dp]
target_epsilon = 2.0
max_grad_norm = 0.3
epsilon_budget = 10.0
TOML
for s in "${SITES[@]}"; do "$BIN/medfed" register "$FED" "$W/sites/$s/enrollment.json" >/dev/null; done
"$BIN/medfed" plan "$FED" --out "$W/plan.json" >/dev/null

# Each site approves the plan, deploys site_round on its own work pool, starts its worker.
for s in "${SITES[@]}"; do
  "$BIN/medfed" site approve "$W/sites/$s" "$W/plan.json" >/dev/null
  "$BIN/medfed" site deploy "$W/sites/$s" >/dev/null
  MEDFED_SITE_ROOT="$W/sites/$s" \
    OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS \
    setsid "$BIN/prefect" worker start --pool "medfed-$s" --type process \
    >"$W/worker-$s.log" 2>&1 &
  PIDS+=($!); disown "$!"
done
echo "workers: ${SITES[*]}"

"$BIN/medfed" run "$FED"
"$BIN/medfed" ledger verify --ledger "sqlite:///$W/ledger.db" --identities "$FED" \
  --witnesses "${#SITES[@]}" >/dev/null
echo "ledger: sqlite:///$W/ledger.db (verified: enrolled identities, cosigned by every site)"
"$BIN/medfed" report --ledger "sqlite:///$W/ledger.db" --identities "$FED" --out "$W/report" \
  >/dev/null
echo "report: $W/report/report.html (the compliance officer's view of the same ledger)"
