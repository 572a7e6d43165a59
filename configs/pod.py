r"""Scale configuration: TPU pod slices and multi-GPU hosts.

  # every host of a TPU v5e-64 slice (see launch/tpu_pod.sh):
  python -m recfusion_jax.main --config configs/pod.py --workdir gs://BUCKET/recfusion/run1

Sized for many chips, not for CPU: a ViT-B/BERT-base-shaped unified trunk (12 x 768, pre-LN so
ViT/CLIP weights import directly; BERT imports into ``encoder.pre_ln=False``), 224px posters, a
16k global batch so that every positive meets 16k in-batch negatives and every modality pair
16k contrastive negatives, and FSDP over 8 chips per data-parallel group.

``arg``: ``chips_per_replica=N`` (the fsdp axis; default 8), ``batch=N`` (global batch).
"""

import ml_collections

from configs import movielens
from recfusion_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  switches = config_lib.parse_switches(arg, {"chips_per_replica": 8, "batch": 16384})
  config = movielens.get_config("size=base")

  m = config.model
  m.embed_dim = 256
  m.gate_dim = 64
  m.gate_hidden = 256
  m.modalities = ("text", "image", "video")
  e = m.encoder
  e.width, e.depth, e.num_heads, e.mlp_dim = 768, 12, 12, 3072
  e.pre_ln, e.ln_eps = True, 1e-6
  e.dropout = 0.1
  e.text.max_len = 512
  e.image.size, e.image.patch = 224, 16
  e.video = ml_collections.ConfigDict(dict(
      frames=16, size=224, tubelet_frames=2, patch=16, pooling="cls"))
  m.user.history_len = 100
  m.user.depth = 4
  m.user.num_heads = 4

  config.data.text_len = 128
  config.data.num_workers = 8          # per host: Grain worker processes
  config.init_from = ""                # point at a converted ViT/CLIP/BERT checkpoint
  config.batch_size = switches["batch"]
  config.num_steps = 100_000
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 2_000
  config.cache_refresh_every = 2_000
  config.log_every = 100
  config.checkpoint_every = 1_000
  config.keep_checkpoints = 3
  config.eval_block_size = 4096
  config.mesh.fsdp = switches["chips_per_replica"]
  config.mesh.data = -1
  return config
