#!/usr/bin/env bash
# Multi-GPU: one process per host, each driving all local GPUs.
# On one host (all GPUs in one process), no coordinator is needed:
#   WORKDIR=runs/gpu bash launch/multi_gpu.sh
# On several hosts, run the same command on every host with:
#   COORDINATOR=host0:12345 NUM_PROCESSES=4 PROCESS_ID=<0..3> WORKDIR=/shared/run bash launch/multi_gpu.sh
# (under SLURM, srun sets these and jax.distributed.initialize() reads them itself).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/pod.py}
: "${WORKDIR:?set WORKDIR (shared by all hosts)}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
if [ -n "${COORDINATOR:-}" ]; then
  export JAX_COORDINATOR_ADDRESS=$COORDINATOR JAX_NUM_PROCESSES=$NUM_PROCESSES JAX_PROCESS_ID=$PROCESS_ID
  exec python -m recfusion_jax.main --config "$CONFIG" --workdir "$WORKDIR" --distributed "$@"
fi
exec python -m recfusion_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
