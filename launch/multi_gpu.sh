#!/usr/bin/env bash
# GPUs on one node (or on a few nodes without a scheduler; under SLURM use launch/slurm_gpu.sh).
# See docs/LAUNCHING.md.
#
#   WORKDIR=runs/gpu bash launch/multi_gpu.sh [--config.key=value ...]
#       one process driving every local GPU (no coordinator; the mesh spans all of them)
#   PROCESSES_PER_NODE=8 WORKDIR=runs/gpu bash launch/multi_gpu.sh
#       one process per GPU (CUDA_VISIBLE_DEVICES=i), joined by jax.distributed over 127.0.0.1
#   NUM_NODES=2 NODE_RANK=<0|1> COORDINATOR=node0:12345 WORKDIR=/shared/run bash launch/multi_gpu.sh
#       the same on every node; WORKDIR (and the data) on a filesystem all nodes share
#
# Variables: CONFIG (configs/pod.py), WORKDIR (required), DATA_DIR (optional: sets
# --config.data.dir), NUM_GPUS (default: counted by nvidia-smi), PROCESSES_PER_NODE (1),
# NUM_NODES (1), NODE_RANK (0), COORDINATOR (host:port of node 0; default 127.0.0.1 and a free
# port on one node), LOG_DIR (default $WORKDIR.logs, or logs/NAME for a gs:// WORKDIR; "-" for
# this terminal), DRY_RUN=1.
# The processes are supervised as in local_multiprocess.sh: TERM/INT forwarded (trainers save
# and exit 75, "resume me"), siblings stopped when one fails, worst status returned.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh
rf_require_bash_51
CONFIG=${CONFIG:-configs/pod.py}
: "${WORKDIR:?set WORKDIR (shared by all processes; on several nodes, a shared filesystem)}"
PROCESSES_PER_NODE=${PROCESSES_PER_NODE:-1}
NUM_NODES=${NUM_NODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [[ -z ${NUM_GPUS:-} ]]; then
  command -v nvidia-smi > /dev/null || rf_die "nvidia-smi not found: set NUM_GPUS"
  NUM_GPUS=$(nvidia-smi -L | grep -c '^GPU ')
fi
for name in NUM_GPUS PROCESSES_PER_NODE NUM_NODES; do
  [[ ${!name} =~ ^[1-9][0-9]*$ ]] || rf_die "$name must be a positive integer, got '${!name}'"
done
[[ $NODE_RANK =~ ^[0-9]+$ ]] && ((NODE_RANK < NUM_NODES)) \
  || rf_die "NODE_RANK must be in [0, $NUM_NODES), got '$NODE_RANK'"
((NUM_GPUS % PROCESSES_PER_NODE == 0)) \
  || rf_die "PROCESSES_PER_NODE=$PROCESSES_PER_NODE does not divide NUM_GPUS=$NUM_GPUS"
GPUS_PER_PROCESS=$((NUM_GPUS / PROCESSES_PER_NODE))
NUM_PROCESSES=$((NUM_NODES * PROCESSES_PER_NODE))
if ((NUM_NODES > 1)); then
  [[ -n ${COORDINATOR:-} ]] || rf_die "set COORDINATOR=host:port (node 0's address) for NUM_NODES > 1"
else
  COORDINATOR=${COORDINATOR:-127.0.0.1:$(rf_free_port)}
fi
if [[ $WORKDIR == *://* ]]; then
  LOG_DIR=${LOG_DIR:-logs/$(basename "$WORKDIR")}  # logs stay on this node's disk
else
  LOG_DIR=${LOG_DIR:-${WORKDIR%/}.logs}
fi
[[ ${DRY_RUN:-0} == 1 || $LOG_DIR == - ]] || mkdir -p "$LOG_DIR"

# Each child gets exactly the JAX_* variables set below, never stale ones from this shell.
unset JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID
data_flags=()
[[ -z ${DATA_DIR:-} ]] || data_flags=(--config.data.dir="$DATA_DIR")
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

for ((local_rank = 0; local_rank < PROCESSES_PER_NODE; local_rank++)); do
  process_id=$((NODE_RANK * PROCESSES_PER_NODE + local_rank))
  log=-
  [[ $LOG_DIR == - ]] || log="$LOG_DIR/process$process_id.log"
  vars=()
  if ((PROCESSES_PER_NODE > 1)); then
    first=$((local_rank * GPUS_PER_PROCESS))
    vars+=(CUDA_VISIBLE_DEVICES="$(seq -s, "$first" $((first + GPUS_PER_PROCESS - 1)))")
  fi
  # Explicit, so that a SLURM allocation around this shell cannot switch it on.
  distributed=(--nodistributed)
  if ((NUM_PROCESSES > 1)); then
    # Read by recfusion_jax.main and passed to jax.distributed.initialize().
    vars+=(JAX_COORDINATOR_ADDRESS="$COORDINATOR" JAX_NUM_PROCESSES="$NUM_PROCESSES"
           JAX_PROCESS_ID="$process_id")
    distributed=(--distributed)
  fi
  rf_start "process $process_id" "$log" "${vars[@]}" -- "${RF_TRAINER[@]}" --config "$CONFIG" \
    --workdir "$WORKDIR" "${data_flags[@]}" "${distributed[@]}" "$@"
done
[[ ${DRY_RUN:-0} == 1 ]] && exit 0
status=0
rf_supervise || status=$?
exit "$status"
