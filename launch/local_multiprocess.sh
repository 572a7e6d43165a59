#!/usr/bin/env bash
# Several JAX processes on this machine (CPU, gloo collectives): the multi-host code path
# (per-process input shards, global arrays from process-local data, distributed checkpoints)
# exercised without a cluster.
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 bash launch/local_multiprocess.sh --config.num_steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
CONFIG=${CONFIG:-configs/tiny.py}
WORKDIR=${WORKDIR:-/tmp/recfusion_multiprocess}
PORT=${PORT:-12355}
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:${PORT}" JAX_NUM_PROCESSES=$NUM_PROCESSES JAX_PROCESS_ID=$i \
    python -m recfusion_jax.main --config "$CONFIG" --workdir "$WORKDIR" --distributed "$@" \
    > "${WORKDIR%/}.process$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
tail -n 3 "${WORKDIR%/}".process*.log
exit $status
