r"""Tiny RecFusion on synthetic data: the test and smoke-run configuration (seconds on CPU).

  python -m recfusion_jax.main --config configs/tiny.py --workdir /tmp/recfusion_tiny

``arg`` is a comma-separated list of switches, e.g. ``--config configs/tiny.py:noise=image``:
  noise=<modality>   make that modality pure noise in the synthetic data
  ablation=<name>    separate_towers | mean_fusion | no_contrastive
"""

import ml_collections

from recfusion_jax import config_lib


def model_config(vocab_size: int = 256, text_len: int = 16, image_size: int = 16,
                 video_frames: int = 4) -> ml_collections.ConfigDict:
  """The model part, shared by every config (the others override sizes)."""
  m = ml_collections.ConfigDict()
  m.modalities = ("text", "image", "video")
  m.embed_dim = 32
  m.fusion = "gated"         # gated | residual | mean | concat (models/fusion.py)
  m.scoring = "cosine"       # cosine: unit vectors + temperature | dot: norms + item bias
  m.item_bias = False        # a learned per-item (popularity) score term
  m.item_content_scale = False  # residual: a learned per-item weight on content (warm items)
  m.item_content_scale_init = 1.0  # its starting value (1: the plain residual model)
  m.content_dropout = 0.0    # hide each (item, modality) of the catalogue term in training
  m.item_item = "off"        # dot: an N x N history-to-item term: off|learned|ease|ease_fixed
  m.item_item_reg = 500.0    # ease*: EASE's L2 strength (the runner's valid choice for EASE)
  # A first-order Markov chain's term at scoring time: off | markov (models/recfusion.py); its
  # weight and decay are chosen on valid after training (benchmark/fit.py), over the latest
  # ``transition_window`` history items.
  m.transition = "off"
  m.transition_window = 8
  # False: the in-batch term (content alone) trains the encoder and gate toward the user model
  # but does not move the user model, which the catalogue term alone then trains.
  m.in_batch_user_gradient = True
  # Per-user (cloze / next-item) batches: False scores the in-batch term from content alone
  # (what cold items need); True from every source, the ID included.
  m.in_batch_with_id = False
  m.history_fusion = "gated"   # history item vectors: gated (by a context) | sum (ID + content)
  #                              | id (IDs only: no content in the user model)
  m.gate_dim = 16
  m.gate_hidden = 32
  m.temperature = 0.1        # initial value of the learned score temperature
  m.contrastive_temperature = 0.1

  e = m.encoder = ml_collections.ConfigDict()
  e.unified = True           # False: one trunk per modality (ablation / two-tower checkpoints)
  e.width = 32
  e.depth = 2
  e.num_heads = 2
  e.mlp_dim = 64
  e.pre_ln = True            # ViT/CLIP style; False = BERT's post-LN
  e.ln_eps = 1e-6
  e.activation = "gelu"
  e.dropout = 0.0
  e.remat = False            # recompute each block's activations in the backward pass
  e.compute_dtype = "float32"  # float32 | bfloat16 (activations/matmuls; parameters stay fp32)
  e.attention = "einsum"     # einsum | dot_product (jax.nn.dot_product_attention; no dropout)
  # Modalities with LayerNorms and MLPs of their own in every block of the unified trunk
  # (Multiway, as BEiT-3; attention stays shared); () : one trunk for every token.
  e.experts = ()
  e.text = ml_collections.ConfigDict(dict(
      vocab_size=vocab_size, max_len=text_len, type_vocab_size=2, stem_norm=True,
      pooling="mean", causal=False, trunk_gradient_scale=1.0))
  e.image = ml_collections.ConfigDict(dict(
      size=image_size, patch=4, patch_bias=True, pre_norm=False, pooling="cls",
      # The share of the trunk's weight gradient this modality's tokens pass on (1: all; 0:
      # they train their stem through a trunk they leave as it is). encoder.py.
      trunk_gradient_scale=1.0))
  e.video = ml_collections.ConfigDict(dict(
      frames=video_frames, size=image_size, tubelet_frames=2, patch=4, pooling="cls",
      trunk_gradient_scale=1.0))

  m.item_id = ml_collections.ConfigDict(dict(
      use=True, dropout=0.5,
      separate_history=False))   # own input embeddings for history items (untied)
  m.user = ml_collections.ConfigDict(dict(
      use_id=True, history_len=20, depth=1, num_heads=2, dropout=0.0,
      kind="transformer",        # transformer | pool (models/user.py)
      causal=False,              # next-item: position t sees items <= t (SASRec)
      recent=0,                  # pool: learned weights over the latest K items (0: off)
      history_dropout=0.0))      # hide each history item with this probability in training
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  switches = config_lib.parse_switches(arg, {"noise": None, "ablation": ""})
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.source = "synthetic"
  config.data.synthetic = ml_collections.ConfigDict(dict(num_items=600, num_users=400))
  if switches["noise"] is not None:
    config.data.synthetic.noise_modality = switches["noise"]
  config.data.num_workers = 0         # Grain worker processes (0 = in-process)
  config.data.history = "earlier"     # earlier | all_others (see recfusion_jax/data/examples.py)
  config.data.example = "interaction"  # interaction | cloze | next (data/examples.py)
  config.data.target_share = 0.2      # cloze: share of a user's window hidden as targets
  config.data.next_positions = 0      # next: transitions scored a row, drawn at random; 0: all
  config.data.next_window = "latest"  # next: a row's window of the timeline: latest | random

  config.model = model_config()

  config.batch_size = 128             # global, over all devices and processes
  # > 0: run the content encoder and the user tower that many rows (global) at a time by
  # gradient caching -- the same update with one micro-batch's activations of each
  # (recfusion_jax/gradcache.py).
  config.micro_batch = 0
  # > 0: the in-batch softmax and contrastive losses in [tile, tile] blocks, a ring over the
  # devices: no [B, B] logits or [B, B, S] gate weights (recfusion_jax/tiled_losses.py).
  config.loss_tile = 0
  config.num_steps = 300
  config.contrastive_weight = 0.1     # lambda; 0 is the no-contrastive ablation
  config.rec_loss = "sampled"         # sampled: in-batch negatives | full: the whole catalogue
  config.logq_weight = 1.0            # strength of the logQ correction of in-batch negatives
  config.in_batch_weight = 1.0        # weight of the in-batch term next to the catalogue term
  config.exclude_history = False      # catalogue term: a row's history items are no negatives
  # The catalogue term's form: softmax | squared (the 0/1 target row's squared error, EASE's
  # objective), with this weight on the non-target items.
  config.catalogue_loss = "softmax"
  config.catalogue_negative_weight = 1.0
  config.cache_refresh_every = 100    # full re-encode of the item cache (steps)

  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=30, weight_decay=1e-4, clip_norm=1.0, b2=0.98,
      # The content encoder's own decay; unset: ``weight_decay``. A strong decay that
      # regularises the ID table and user model can erase what the encoder learned.
      encoder_weight_decay=ml_collections.config_dict.placeholder(float),
      # The content encoder's rate (and decay) as a share of the others': below 1 a pretrained
      # trunk (``init_from``) keeps what it knows while the ID table and user model train.
      encoder_lr_scale=1.0,
      # The parameters that scale applies to, as path prefixes: the whole encoder, or e.g. only
      # the pretrained trunk and text stem, so that parts started from scratch take the rate.
      encoder_lr_scale_paths=("encoder/",)))
  config.nonfinite = "stop"           # a NaN/Inf loss or gradient: stop | skip (drop the update)

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # -1: all remaining devices
  config.log_every = 50
  config.checkpoint_every = 200
  config.keep_checkpoints = 2
  config.eval_block_size = 256
  config.eval_item_axes = ()           # () keeps the item table whole on each device in eval
  config.eval_split = "test"          # "valid" while tuning: test numbers are for reporting only
  # Full ranking on valid every `every` steps (0: never); the best state is kept and returned,
  # and training stops after `patience` evaluations without a better `metric` (0: never).
  config.validation = ml_collections.ConfigDict(dict(every=0, patience=0, metric="NDCG@10"))
  config.init_from = ""               # converted pretrained encoder (recfusion_jax.convert)

  config_lib.apply_ablation(config, switches["ablation"])
  return config
