r"""RecFusion on MMRec-format data (Amazon Baby / Sports / Clothing with precomputed features).

Put MMRec's files of one set in ``data_out/mmrec/<name>/`` (see README, "Running on MMRec
data"), then:

  python -m recfusion_jax.main --config configs/mmrec.py:name=baby --workdir runs/mmrec_baby

``arg`` switches (comma separated):
  name=NAME       baby (default) | sports | clothing | any folder of data_out/mmrec holding
                  NAME.inter; ``--config.data.dir=PATH`` points elsewhere
  ablation=NAME   separate_towers | mean_fusion | no_contrastive

Each modality enters the trunk through the ``features`` stem (one token per item and
modality); MMRec's files have 384-wide text and 4096-wide image features. Other widths: set
``--config.model.encoder.text.feature_dim=...`` (the loader names the width it found).
"""

import ml_collections

from configs import tiny
from recfusion_jax import config_lib

TEXT_FEATURE_DIM = 384      # MMRec's text_feat.npy (sentence-transformers)
IMAGE_FEATURE_DIM = 4096    # MMRec's image_feat.npy (CNN)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  switches = config_lib.parse_switches(arg, {"name": "baby", "ablation": ""})
  config = tiny.get_config()

  config.data = ml_collections.ConfigDict()
  config.data.source = "mmrec"
  config.data.name = switches["name"]                       # <name>.inter
  config.data.dir = f"data_out/mmrec/{switches['name']}"
  config.data.filter_cold_users = True                      # as MMRec: valid/test users need train
  config.data.num_workers = 0
  # MMRec splits by global time: held-out items follow a user's train items.
  config.data.history = "earlier"

  m = config.model = tiny.model_config()
  m.modalities = ("text", "image")
  m.embed_dim = 64
  m.user.history_len = 50
  m.user.depth = 2
  e = m.encoder
  e.width, e.depth, e.num_heads, e.mlp_dim = 64, 1, 4, 128
  e.text = ml_collections.ConfigDict(dict(stem="features", feature_dim=TEXT_FEATURE_DIM,
                                          pooling="cls"))
  e.image = ml_collections.ConfigDict(dict(stem="features", feature_dim=IMAGE_FEATURE_DIM,
                                           pooling="cls"))

  # A few thousand items: the full-catalogue softmax gives every example all the negatives.
  config.rec_loss = "full"
  config.batch_size = 512
  config.num_steps = 2000
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 100
  config.cache_refresh_every = 500
  config.log_every = 100
  config.checkpoint_every = 1000
  config.eval_block_size = 512
  config_lib.apply_ablation(config, switches["ablation"])
  return config
