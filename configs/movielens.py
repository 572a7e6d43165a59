r"""RecFusion on MovieLens-100k with IMDb plots (text) and posters (image); no video.

Build the data once (see data_prep/movielens.py), then:

  python -m data_prep.movielens --raw_dir ../shared/data --out_dir data_out/movielens
  python -m recfusion_jax.convert --hf <all-MiniLM-L6-v2 folder> --out data_out/minilm
  python -m recfusion_jax.main --config configs/movielens.py --workdir runs/movielens

``arg`` switches (comma separated), e.g. ``configs/movielens.py:size=small,protocol=cold_items``:
  size=base       the text stem and unified trunk are all-MiniLM-L6-v2 shaped (6 x 384) and
                  start from its weights (``init_from``); the default.
  size=small      a 2 x 64 trunk trained from scratch: minutes on a 2-core CPU.
  protocol=NAME   warm_ratio | loo | cold_items | cold_users | missing_modality
  seed=N          split seed
  ablation=NAME   separate_towers | mean_fusion | no_contrastive
  recipe=NAME     dot (default) | paper: the scoring and training recipe (config_lib.apply_recipe).
                  dot is what the valid ladder of docs/TUNING.md kept (warm_ratio test NDCG@10
                  0.371 +- 0.002 over 3 seeds, §15); paper is the design as first written,
                  kept to reproduce the earlier numbers (docs/results_paper/RESULTS.md).
"""

import ml_collections

from configs import tiny
from recfusion_jax import config_lib

MINILM_VOCAB = 30522


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  switches = config_lib.parse_switches(
      arg, {"size": "base", "protocol": "warm_ratio", "seed": 0, "ablation": "",
            "recipe": "dot"})
  size = switches["size"]
  config = tiny.get_config()

  config.data = ml_collections.ConfigDict()
  config.data.source = "movielens"
  config.data.dir = "data_out/movielens"        # output of data_prep.movielens
  config.data.protocol = switches["protocol"]
  config.data.split_seed = switches["seed"]
  config.data.text_len = 32                      # tokens kept of the built 128 (CPU budget)
  config.data.num_workers = 0
  # 1,682 items of 64 px: 100 MB, read once into memory (a batch then gathers rows, no decode).
  config.data.streaming = False
  # Random splits hold out items from anywhere in a user's timeline: train on "all the user's
  # other items" as history, as evaluation sees them; loo is next-item prediction.
  config.data.history = config_lib.history_for_protocol(config.data.protocol)
  # (A recipe's per-protocol fields, config.protocol_fields, are applied by the CLIs and the
  # runner through config_lib.set_protocol; the command line's overrides win over them.)

  m = config.model = tiny.model_config(vocab_size=MINILM_VOCAB, text_len=config.data.text_len,
                                       image_size=64)
  m.modalities = ("text", "image")
  m.embed_dim = 64
  m.user.history_len = 50
  m.user.depth = 2
  m.encoder.image.patch = 16                     # 64x64 poster -> 16 patches + class token
  if size == "base":
    e = m.encoder
    e.width, e.depth, e.num_heads, e.mlp_dim = 384, 6, 12, 1536
    e.pre_ln, e.ln_eps, e.activation = False, 1e-12, "gelu"   # BERT layout
    e.text.max_len = 512
    config.init_from = "data_out/minilm"
    # 99% of this step's FLOPs are the content encoder's matmuls; in bf16 (float32 parameters
    # and optimizer state) they take AMX/tensor-core kernels (perf/step_speed.py measures
    # the step, docs/TUNING.md §7). size=small stays float32: its step is
    # memory-bound and its accuracy numbers were measured in float32.
    e.compute_dtype = "bfloat16"
    config.optimizer.learning_rate = 5e-4
    # The pretrained trunk and text stem fine-tune at a tenth of that (5e-5, BERT's usual rate);
    # what starts from scratch (the ID table, user model, image stem, projections) trains at the
    # full rate (docs/TUNING.md §23-§24). towers/text: the separate-towers layouts' MiniLM tower.
    config.optimizer.encoder_lr_scale = 0.1
    config.optimizer.encoder_lr_scale_paths = ("encoder/trunk/", "encoder/text_stem/",
                                               "encoder/towers/text/")
  elif size == "small":
    e = m.encoder
    e.width, e.depth, e.num_heads, e.mlp_dim = 64, 2, 4, 128
    # Valid NDCG@10 at 600 steps (docs/TUNING.md): 1e-3 0.149, 5e-4 0.142.
    config.optimizer.learning_rate = 1e-3
  else:
    raise ValueError(f"unknown size {size!r}")

  # 1,682 items: scoring the whole catalogue every step costs less than encoding the batch and
  # gives every example all the negatives (in-batch sampling stays the default at pod scale).
  config.rec_loss = "full"
  config.batch_size = 128
  config.num_steps = 400                         # ~1.3 epochs of warm_ratio (CPU budget)
  config.optimizer.warmup_steps = 100
  config.cache_refresh_every = 250
  config.log_every = 50
  config.checkpoint_every = 500
  config_lib.apply_recipe(config, switches["recipe"])
  config_lib.apply_ablation(config, switches["ablation"])
  return config
