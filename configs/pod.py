r"""Scale configuration: TPU pod slices and multi-GPU hosts, on a pod-shaped synthetic catalogue.

  # once: a synthetic catalogue with text, 224px images and 16-frame videos (data_prep):
  python -m data_prep.synthetic_pod --out_dir data_out/synthetic_pod --num_items 10000
  # every host of a TPU v5e-64 slice (see launch/tpu_pod.sh):
  python -m recfusion_jax.main --config configs/pod.py --workdir gs://BUCKET/recfusion/run1 \
      --config.data.dir=gs://BUCKET/synthetic_pod

Sized for many chips, not for CPU: a ViT-B/BERT-base-shaped unified trunk (12 x 768, pre-LN so
ViT/CLIP weights import directly; BERT imports into ``encoder.pre_ln=False``), 224px images,
16-frame videos, 128 text tokens, a 16k global batch so that every positive meets 16k in-batch
negatives (``rec_loss="sampled"``: no softmax over the whole catalogue at this scale) and every
modality pair 16k contrastive negatives, and FSDP over 8 chips per data-parallel group. The data
is the layout ``data_prep`` writes (``data.source="tfds"``: manifest, TFDS ArrayRecord items,
split TSVs); its shapes must be the model's (``SHAPES``; the loader checks them).

``arg`` switches (comma separated):
  size=pod              the scale model and data shapes above (default)
  size=test             the same model family (unified trunk, text + image + video stems, gated
                        fusion, in-batch softmax, FSDP) at CPU-test widths and ``SHAPES["test"]``:
                        ``tests/test_config_training.py`` trains it on 8 simulated devices
  chips_per_replica=N   the fsdp axis (default 8; size=test: 2)
  batch=N               global batch (default 16384; size=test: 32)
"""

import ml_collections

from configs import tiny
from recfusion_jax import config_lib

# Content shapes of the data each size trains on; ``python -m data_prep.synthetic_pod`` writes
# SHAPES["pod"] by default.
SHAPES = {
    "pod": dict(image_size=224, video_frames=16, text_len=128, vocab_size=30522),
    "test": dict(image_size=16, video_frames=4, text_len=16, vocab_size=256),
}
DATA_DIR = "data_out/synthetic_pod"   # the default --out_dir of data_prep.synthetic_pod
# size -> (chips_per_replica, batch) when the switches leave them at 0.
_MESH_AND_BATCH = {"pod": (8, 16384), "test": (2, 32)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  switches = config_lib.parse_switches(
      arg, {"size": "pod", "chips_per_replica": 0, "batch": 0})
  size = switches["size"]
  if size not in SHAPES:
    raise ValueError(f"unknown size {size!r}; choose one of {sorted(SHAPES)}")
  shapes = SHAPES[size]
  chips, batch = _MESH_AND_BATCH[size]
  config = tiny.get_config()

  config.data = ml_collections.ConfigDict()
  config.data.source = "tfds"                  # a data_prep build (manifest.json + ArrayRecord)
  config.data.dir = DATA_DIR
  config.data.protocol = "loo"                 # the split data_prep.synthetic_pod writes
  config.data.split_seed = 0
  config.data.text_len = shapes["text_len"]
  config.data.history = config_lib.history_for_protocol(config.data.protocol)
  config.data.num_workers = 8 if size == "pod" else 0   # per host: Grain worker processes
  # ~2.5 MB an item (16 x 224 x 224 video): read record by record, never whole (data/records.py).
  config.data.streaming = True

  m = config.model = tiny.model_config(
      vocab_size=shapes["vocab_size"], text_len=shapes["text_len"],
      image_size=shapes["image_size"], video_frames=shapes["video_frames"])
  m.modalities = ("text", "image", "video")
  e = m.encoder
  if size == "pod":
    m.embed_dim, m.gate_dim, m.gate_hidden = 256, 64, 256
    e.width, e.depth, e.num_heads, e.mlp_dim = 768, 12, 12, 3072
    e.dropout = 0.1
    # bf16 activations and matmuls, float32 parameters and optimizer state: the accelerators'
    # native matmul type (docs/TUNING.md §7 measures it on an AMX CPU).
    e.compute_dtype = "bfloat16"
    e.text.max_len = 512
    e.image.patch = e.video.patch = 16
    m.user.history_len, m.user.depth, m.user.num_heads = 100, 4, 4
  else:
    m.embed_dim, m.gate_dim, m.gate_hidden = 16, 8, 16
    e.width, e.depth, e.num_heads, e.mlp_dim = 16, 1, 2, 32
    e.image.patch = e.video.patch = 8
    m.user.history_len, m.user.depth, m.user.num_heads = 6, 1, 2
  e.pre_ln, e.ln_eps = True, 1e-6
  e.video.tubelet_frames = 2

  config.rec_loss = "sampled"          # in-batch softmax over the global batch, logQ-corrected
  config.init_from = ""                # point at a converted ViT/CLIP/BERT checkpoint
  config.batch_size = switches["batch"] or batch
  config.mesh.fsdp = switches["chips_per_replica"] or chips
  config.mesh.data = -1
  # Evaluation splits the catalogue's item table over each replica's chips (per-shard top-k,
  # merged exactly) and the users over the replicas: no device holds the whole table.
  config.eval_item_axes = ("fsdp",)
  if size == "pod":
    config.num_steps = 100_000
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 2_000
    config.cache_refresh_every = 2_000
    config.log_every = 100
    config.checkpoint_every = 1_000
    config.keep_checkpoints = 3
    config.eval_block_size = 4096
  else:
    config.num_steps = 2
    config.optimizer.warmup_steps = 1
    config.cache_refresh_every = config.log_every = config.checkpoint_every = 1
    config.eval_block_size = 64
  return config
