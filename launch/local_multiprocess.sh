#!/usr/bin/env bash
# Several JAX processes on this machine (CPU, gloo collectives): the multi-host code path
# (per-process input shards, global arrays from process-local data, distributed checkpoints)
# exercised without a cluster.
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 bash launch/local_multiprocess.sh --config.num_steps=50
#
# Variables: NUM_PROCESSES (2), DEVICES_PER_PROCESS (4), CONFIG (configs/tiny.py),
# WORKDIR (/tmp/recfusion_multiprocess), PORT (a free one), DRY_RUN=1 (print, start nothing).
# Each process logs to $WORKDIR.process<i>.log. The launcher owns its processes: SIGTERM/SIGINT
# are forwarded to every trainer (they save a checkpoint and exit 75, "resume me"); when one
# process fails the others get SIGTERM and, after PEER_GRACE_S (15 s), SIGKILL; each trainer
# runs in its own process group, swept when it exits, so no Grain worker or resource tracker
# outlives it. The exit status is the worst one (see rf_worst_status in launch/common.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh
rf_require_bash_51
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
CONFIG=${CONFIG:-configs/tiny.py}
WORKDIR=${WORKDIR:-/tmp/recfusion_multiprocess}
[[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] || rf_die "NUM_PROCESSES must be a positive integer"
[[ $DEVICES_PER_PROCESS =~ ^[1-9][0-9]*$ ]] || rf_die "DEVICES_PER_PROCESS must be a positive integer"
PORT=${PORT:-$(rf_free_port)}
[[ ${DRY_RUN:-0} == 1 ]] || mkdir -p "$(dirname "${WORKDIR%/}")"

for ((i = 0; i < NUM_PROCESSES; i++)); do
  rf_start "process $i" "${WORKDIR%/}.process$i.log" \
    JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
    XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}" \
    JAX_COORDINATOR_ADDRESS="127.0.0.1:${PORT}" JAX_NUM_PROCESSES="$NUM_PROCESSES" \
    JAX_PROCESS_ID="$i" \
    -- "${RF_TRAINER[@]}" --config "$CONFIG" --workdir "$WORKDIR" --distributed "$@"
done
[[ ${DRY_RUN:-0} == 1 ]] && exit 0
status=0
rf_supervise || status=$?
for ((i = 0; i < NUM_PROCESSES; i++)); do
  echo "== process $i: ${WORKDIR%/}.process$i.log"
  tail -n 3 "${WORKDIR%/}.process$i.log"
done
exit "$status"
