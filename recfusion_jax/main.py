r"""Entry point: ``python -m recfusion_jax.main --config configs/tiny.py --workdir DIR``.

Config fields can be overridden on the command line, e.g. ``--config.num_steps=1000``.
Launched as several processes (TPU pod slices, multi-GPU hosts, or several CPU processes), it
calls ``jax.distributed.initialize()`` first; see launch/.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Call jax.distributed.initialize(); default: when the environment "
    "says this is one of several processes (JAX_COORDINATOR_ADDRESS, TPU pod, SLURM...).")
flags.mark_flags_as_required(["config", "workdir"])


def _multi_process_environment() -> bool:
  keys = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
          "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
  return any(os.environ.get(k) for k in keys) and os.environ.get("SLURM_NTASKS", "2") != "1"


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  distributed = _DISTRIBUTED.value
  if distributed is None:
    distributed = _multi_process_environment()
  if distributed:
    # Arguments come from the environment (cluster auto-detection or JAX_* variables).
    jax.distributed.initialize()
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  from recfusion_jax import train  # pylint: disable=import-outside-toplevel
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
