#!/usr/bin/env bash
# Train on every host of a Cloud TPU pod slice. JAX finds the coordinator and the process ids
# from the TPU metadata, so recfusion_jax.main only has to call jax.distributed.initialize().
#   TPU_NAME=my-v5e-64 ZONE=us-west4-a WORKDIR=gs://bucket/run1 bash launch/tpu_pod.sh [flags]
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (a gs:// path)}"
CONFIG=${CONFIG:-configs/pod.py}
REPO=${REPO:-https://github.com/your-org/recfusion-jax.git}

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d recfusion-jax ] || git clone $REPO recfusion-jax
  cd recfusion-jax && pip install -q -e '.[all]' 'jax[tpu]==0.10.2'
  python -m recfusion_jax.main --config $CONFIG --workdir $WORKDIR --distributed $*
"
