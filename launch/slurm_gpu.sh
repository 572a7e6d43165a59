#!/usr/bin/env bash
# Submits launch/slurm.sbatch: NODES nodes x GPUS_PER_NODE GPUs, one training task per GPU.
# See docs/LAUNCHING.md.
#   NODES=2 WORKDIR=/shared/runs/run1 bash launch/slurm_gpu.sh [--config.key=value ...]
# Variables: NODES (1), GPUS_PER_NODE (8), CPUS_PER_TASK (8), TIME (24:00:00), PARTITION,
# ACCOUNT, JOB_NAME (recfusion), SBATCH_FLAGS (more sbatch flags, word-split), CONFIG, WORKDIR
# (required; on a filesystem every node shares), DATA_DIR, LOG_DIR (logs), REQUEUE (1),
# MAX_REQUEUES (20), PEER_WAIT_S (30: srun ends the other tasks this long after the first one
# exits); DRY_RUN=1 prints the sbatch command instead of submitting.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-8}
TIME=${TIME:-24:00:00}
JOB_NAME=${JOB_NAME:-recfusion}
LOG_DIR=${LOG_DIR:-logs}
: "${WORKDIR:?set WORKDIR (a folder on a filesystem every node shares)}"
for name in NODES GPUS_PER_NODE CPUS_PER_TASK; do
  [[ ${!name} =~ ^[1-9][0-9]*$ ]] || rf_die "$name must be a positive integer, got '${!name}'"
done
read -r -a extra <<< "${SBATCH_FLAGS:-}"
# The batch script reads these from its environment (sbatch exports the submitting one).
export CONFIG WORKDIR LOG_DIR
[[ -z ${DATA_DIR:-} ]] || export DATA_DIR
cmd=(sbatch --job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE"
  --gpus-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --time="$TIME"
  --output="$LOG_DIR/slurm-%j.out" --export=ALL)
[[ -z ${PARTITION:-} ]] || cmd+=(--partition="$PARTITION")
[[ -z ${ACCOUNT:-} ]] || cmd+=(--account="$ACCOUNT")
cmd+=("${extra[@]}" launch/slurm.sbatch "$@")
[[ ${DRY_RUN:-0} == 1 ]] || mkdir -p "$LOG_DIR"  # sbatch does not create the --output folder
rf_run "${cmd[@]}"
