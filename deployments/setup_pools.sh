#!/usr/bin/env bash
# Create Kiln's work pools on the Prefect server PREFECT_API_URL points at.
#   cpu: runs full-pipeline itself and the data stages (download ... tokenize, report)
#   gpu: runs training and eval stages; its concurrency limit (GPU_LIMIT, default 1) is how
#        many stage runs share the machine's GPUs at once.
# Process pools by default (one machine); for a cluster use another worker type, e.g.
#   POOL_TYPE=docker deployments/setup_pools.sh   (workers from docker/docker-compose.yml)
# Idempotent: existing pools are kept, the gpu limit is (re)applied.
set -euo pipefail
PREFECT=${PREFECT:-prefect}
POOL_TYPE=${POOL_TYPE:-process}
CPU_POOL=${CPU_POOL:-cpu}
GPU_POOL=${GPU_POOL:-gpu}
GPU_LIMIT=${GPU_LIMIT:-1}

for pool in "$CPU_POOL" "$GPU_POOL"; do
  if $PREFECT --no-prompt work-pool inspect "$pool" >/dev/null 2>&1; then
    echo "work pool $pool exists"
  else
    $PREFECT --no-prompt work-pool create "$pool" --type "$POOL_TYPE"
  fi
done
$PREFECT --no-prompt work-pool set-concurrency-limit "$GPU_POOL" "$GPU_LIMIT"
