"""A synthetic multimodal recommendation data set with planted topic structure.

Every item has a dominant latent topic (and a small secondary one). The topic shows in each
content modality: text tokens come from topic-owned words, the image is a topic template plus
noise, and the video is a topic template that moves with a topic-specific velocity. Users like
one or two topics and pick items of those topics with Zipf-like popularity, so a model that
recovers topics from content (or from co-occurrence) can rank far above chance, and cold items
are only reachable through content.

``noise_modality`` replaces one modality with topic-independent noise of the same texture, so a
fusion model has to learn to ignore it. ``make_synthetic_with_truth`` also returns the planted
ground truth (topics, templates, preferences) for tests and diagnostics.

``content_plan`` / ``content_chunks`` / ``stream_interactions`` draw the same kind of catalogue a
chunk of items at a time, for catalogues too large to hold (``data_prep.synthetic_pod``).
"""

from __future__ import annotations

import collections.abc
import dataclasses
from typing import Any

import numpy as np

from recfusion_jax.data import splits
from recfusion_jax.data.types import MODALITIES, Catalogue, Interactions, RecDataset

# Image pixels are 128 + _PIXEL_SCALE * (unit-std pattern + noise), clipped to uint8.
_PIXEL_SCALE = 40.0
# Sinusoids summed per channel of a template: few and low-frequency, so templates are smooth.
_NUM_WAVES = 3
_MAX_FREQ = 2
_BASE_TIME = 1_600_000_000


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Knobs of the generator; the defaults train in well under a minute on a CPU."""

  num_items: int = 600
  num_users: int = 400
  num_topics: int = 16
  # Text: id 0 is padding, ids 1..num_stop_words are topic-free stop words, the rest is split
  # evenly between topics.
  vocab_size: int = 256
  num_stop_words: int = 32
  stop_word_prob: float = 0.3
  text_len: int = 16
  min_text_len: int = 6
  image_size: int = 16
  video_frames: int = 4
  # Per-pixel noise std, relative to the (unit-std) topic template.
  image_noise: float = 0.5
  # Share of an item's content drawn from its secondary topic (the dominant one gets the rest).
  secondary_topic_weight: float = 0.2
  # Interactions per user, drawn uniformly from [min, max]; at least 3 (train, valid, test).
  min_interactions: int = 20
  max_interactions: int = 40
  # Users like 1..max_topics_per_user topics; `exploration` of their choices ignores topics.
  max_topics_per_user: int = 2
  exploration: float = 0.05
  # Item popularity inside a topic is proportional to 1 / rank**popularity_exponent.
  popularity_exponent: float = 1.0
  # Per-modality rates of items lacking that modality. Items are never left without content
  # by chance; exactly round(no_content_fraction * num_items) items have none.
  missing_text: float = 0.1
  missing_image: float = 0.1
  missing_video: float = 0.1
  no_content_fraction: float = 0.0
  # One of MODALITIES or None: that modality becomes topic-independent noise.
  noise_modality: str | None = None
  # Items whose every interaction is moved to test (never trained on).
  cold_item_fraction: float = 0.1
  seed: int = 0
  name: str = "synthetic"

  def __post_init__(self):
    def check(ok: bool, message: str):
      if not ok:
        raise ValueError(f"SyntheticConfig: {message}")

    check(self.num_items >= 1 and self.num_users >= 1, "num_items and num_users must be >= 1")
    check(self.num_topics >= 2, f"num_topics must be >= 2, got {self.num_topics}")
    words = self.vocab_size - 1 - self.num_stop_words
    check(self.num_stop_words >= 1 and words >= 2 * self.num_topics,
          f"vocab_size={self.vocab_size} leaves {words} topic words after "
          f"{self.num_stop_words} stop words; need >= 2 per topic ({2 * self.num_topics})")
    check(1 <= self.min_text_len <= self.text_len,
          f"need 1 <= min_text_len ({self.min_text_len}) <= text_len ({self.text_len})")
    check(self.image_size >= 2 and self.video_frames >= 1, "image_size >= 2, video_frames >= 1")
    check(3 <= self.min_interactions <= self.max_interactions <= self.num_items,
          f"need 3 <= min_interactions ({self.min_interactions}) <= max_interactions "
          f"({self.max_interactions}) <= num_items ({self.num_items})")
    check(1 <= self.max_topics_per_user <= self.num_topics,
          f"max_topics_per_user must be in [1, num_topics], got {self.max_topics_per_user}")
    check(0.0 <= self.secondary_topic_weight < 0.5,
          f"secondary_topic_weight must be in [0, 0.5), got {self.secondary_topic_weight}")
    for field in ("stop_word_prob", "missing_text", "missing_image", "missing_video",
                  "no_content_fraction"):
      value = getattr(self, field)
      check(0.0 <= value <= 1.0, f"{field} must be in [0, 1], got {value}")
    # Without exploration a user liking one small topic could run out of items to sample.
    check(0.0 < self.exploration <= 1.0, f"exploration must be in (0, 1], got {self.exploration}")
    check(0.0 <= self.cold_item_fraction < 1.0,
          f"cold_item_fraction must be in [0, 1), got {self.cold_item_fraction}")
    check(self.image_noise >= 0.0 and self.popularity_exponent >= 0.0,
          "image_noise and popularity_exponent must be >= 0")
    check(self.noise_modality is None or self.noise_modality in MODALITIES,
          f"noise_modality must be None or one of {MODALITIES}, got {self.noise_modality!r}")

  @property
  def words_per_topic(self) -> int:
    return (self.vocab_size - 1 - self.num_stop_words) // self.num_topics


@dataclasses.dataclass
class SyntheticTruth:
  """The planted structure behind a synthetic data set."""

  item_topic: np.ndarray             # [N] int32 dominant topic
  item_secondary_topic: np.ndarray   # [N] int32, != item_topic
  user_topic_pref: np.ndarray        # [U, K] float32 rows sum to 1
  topic_words: np.ndarray            # [K, words_per_topic] int32 token ids owned by each topic
  image_templates: np.ndarray        # [K, H, W, 3] float32, zero mean, unit std
  video_templates: np.ndarray        # [K, H, W, 3] float32 (frame 0 of each topic's video)
  video_velocity: np.ndarray         # [K, 2] int32 (dy, dx) pixels per frame
  held_out_items: np.ndarray         # [C] int32 items whose interactions were all moved to test


def resolve_config(config: Any = None, **overrides: Any) -> SyntheticConfig:
  """Builds a SyntheticConfig from None, a SyntheticConfig, a mapping or a ConfigDict."""
  if config is None:
    fields = {}
  elif isinstance(config, SyntheticConfig):
    fields = dataclasses.asdict(config)
  elif hasattr(config, "to_dict"):  # ml_collections.ConfigDict is not a Mapping.
    fields = dict(config.to_dict())
  elif isinstance(config, collections.abc.Mapping):
    fields = dict(config)
  else:
    raise TypeError(f"config must be a SyntheticConfig, a mapping or a ConfigDict, "
                    f"got {type(config).__name__}")
  fields.update(overrides)
  known = {f.name for f in dataclasses.fields(SyntheticConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise TypeError(f"unknown synthetic config fields {unknown}; known: {sorted(known)}")
  return SyntheticConfig(**fields)


def make_synthetic(config: Any = None, **overrides: Any) -> RecDataset:
  """Generates the synthetic data set (see module docstring); deterministic in ``seed``."""
  return make_synthetic_with_truth(config, **overrides)[0]


def make_synthetic_with_truth(config: Any = None,
                              **overrides: Any) -> tuple[RecDataset, SyntheticTruth]:
  """Like ``make_synthetic`` but also returns the planted ground truth."""
  cfg = resolve_config(config, **overrides)
  rng = np.random.default_rng(cfg.seed)
  n, k = cfg.num_items, cfg.num_topics
  item_topic, item_secondary = _item_topics(rng, cfg)
  topic_words = _topic_words(cfg)
  text_ids, text_mask = _make_text(rng, cfg, item_topic, item_secondary, topic_words)
  image_templates = _smooth_templates(rng, k, cfg.image_size)
  image = _make_image(rng, cfg, item_topic, item_secondary, image_templates)
  video_templates = _smooth_templates(rng, k, cfg.image_size)
  video_velocity = _velocities(rng, k)
  video = _make_video(rng, cfg, item_topic, item_secondary,
                      _rolled(video_templates, video_velocity, cfg.video_frames))
  presence = _make_presence(rng, cfg)
  _zero_absent(presence, text_ids, text_mask, image, video)

  user_pref = _user_preferences(rng, cfg)
  user, item = _sample_interactions(rng, cfg, item_topic, user_pref)
  timestamp = _timestamps(rng, cfg, user)
  held_out = np.sort(rng.permutation(n)[:int(round(cfg.cold_item_fraction * n))]).astype(np.int32)
  train, valid, test = _split(user, item, timestamp, held_out)

  has_id = np.bincount(train.item, minlength=n) > 0
  catalogue = Catalogue(text_ids=text_ids, text_mask=text_mask, image=image, video=video,
                        presence=presence, has_id=has_id)
  dataset = RecDataset(
      catalogue=catalogue, num_users=cfg.num_users, train=train, valid=valid, test=test,
      cold_items=np.flatnonzero(~has_id).astype(np.int32),
      user_has_id=np.ones(cfg.num_users, dtype=bool), name=cfg.name)
  truth = SyntheticTruth(
      item_topic=item_topic, item_secondary_topic=item_secondary,
      user_topic_pref=user_pref, topic_words=topic_words.astype(np.int32),
      image_templates=image_templates, video_templates=video_templates,
      video_velocity=video_velocity, held_out_items=held_out)
  return dataset, truth


# ---- streaming: catalogues too large to hold ------------------------------------------------
#
# ``make_synthetic`` builds every array at once and a [users, items] sampling matrix. At pod
# shapes (224-px images, 16-frame videos: about 2.5 MB an item) the content is drawn chunk by
# chunk instead, for a writer to store as it goes (``data_prep.synthetic_pod``); only what is a
# few bytes an item (topics, presence) and the interaction log are held whole.


@dataclasses.dataclass
class ContentPlan:
  """What every chunk of a streamed catalogue shares: per item its topics and presence, per
  topic its words and templates. A chunk's tokens and pixels are drawn from these alone."""

  item_topic: np.ndarray        # [N] int32 dominant topic
  item_secondary: np.ndarray    # [N] int32
  presence: np.ndarray          # [N, M] bool
  topic_words: np.ndarray       # [K, words_per_topic] token ids
  image_templates: np.ndarray   # [K, H, W, 3] float32
  video_moving: np.ndarray      # [K, T, H, W, 3] float32: each topic's template, moving


def content_plan(config: Any = None, **overrides: Any) -> ContentPlan:
  """The shared part of a streamed catalogue (see ``ContentPlan``); deterministic in ``seed``."""
  cfg = resolve_config(config, **overrides)
  rng = np.random.default_rng([cfg.seed, 1])
  k = cfg.num_topics
  item_topic, item_secondary = _item_topics(rng, cfg)
  image_templates = _smooth_templates(rng, k, cfg.image_size)
  video_moving = _rolled(_smooth_templates(rng, k, cfg.image_size), _velocities(rng, k),
                         cfg.video_frames)
  return ContentPlan(item_topic, item_secondary, _make_presence(rng, cfg), _topic_words(cfg),
                     image_templates, video_moving)


def content_chunks(config: Any, plan: ContentPlan, chunk_items: int
                   ) -> collections.abc.Iterator[tuple[int, dict[str, np.ndarray]]]:
  """(first item, content of the next ``chunk_items`` items) until the catalogue ends.

  Each dict holds ``text_ids`` [C, Lt] int32, ``text_mask`` [C, Lt] bool, ``image`` [C, H, W, 3]
  uint8, ``video`` [C, T, H, W, 3] uint8, ``presence`` [C, M] bool, ``topic`` [C] int32, with
  absent modalities zero. Chunk c draws from its own stream, so the content is deterministic
  in (``seed``, ``chunk_items``) and one chunk never needs another.
  """
  cfg = resolve_config(config)
  if chunk_items < 1:
    raise ValueError(f"chunk_items must be >= 1, got {chunk_items}")
  for c, start in enumerate(range(0, cfg.num_items, chunk_items)):
    rows = slice(start, min(start + chunk_items, cfg.num_items))
    rng = np.random.default_rng([cfg.seed, 2, c])
    topic, secondary = plan.item_topic[rows], plan.item_secondary[rows]
    presence = plan.presence[rows]
    text_ids, text_mask = _make_text(rng, cfg, topic, secondary, plan.topic_words)
    image = _make_image(rng, cfg, topic, secondary, plan.image_templates)
    video = _make_video(rng, cfg, topic, secondary, plan.video_moving)
    _zero_absent(presence, text_ids, text_mask, image, video)
    yield start, {"text_ids": text_ids, "text_mask": text_mask, "image": image, "video": video,
                  "presence": presence, "topic": topic}


def stream_interactions(config: Any, item_topic: np.ndarray, users_per_chunk: int = 4096
                        ) -> Interactions:
  """The interaction log of a streamed catalogue, drawn ``users_per_chunk`` users at a time.

  Each of a user's draws picks one of their topics by preference, then an item of that topic by
  its Zipf popularity (a share ``exploration`` of the draws: any item); repeats are dropped, so
  a user keeps up to their count (uniform in [min_interactions, max_interactions]) of distinct
  items, in draw order. No [users, items] matrix as in ``make_synthetic``. Grouped by user, time
  increasing per user, rating 1; deterministic in ``seed``.
  """
  cfg = resolve_config(config)
  rng = np.random.default_rng([cfg.seed, 3])
  n, k = cfg.num_items, cfg.num_topics
  user_pref = _user_preferences(rng, cfg)
  popularity, order = _topic_popularity(rng, cfg, item_topic)
  # Each topic's popularity sums to 1, so the running sum in (topic, rank) order climbs from t to
  # t + 1 over topic t's items: the item of topic t drawn by a uniform u is where t + u lands.
  climb = np.cumsum(popularity[order])
  topic_start = np.searchsorted(item_topic[order], np.arange(k))
  topic_last = np.r_[topic_start[1:], n] - 1
  draws = 2 * cfg.max_interactions
  users, items = [], []
  for start in range(0, cfg.num_users, users_per_chunk):
    pref = np.cumsum(user_pref[start:start + users_per_chunk], axis=1)
    c = pref.shape[0]
    count = rng.integers(cfg.min_interactions, cfg.max_interactions + 1, size=c)
    u = rng.random((c, draws, 1)) * pref[:, None, -1:]
    topic = np.minimum((pref[:, None, :] < u).sum(-1), k - 1)
    pos = np.searchsorted(climb, topic + rng.random((c, draws)))
    item = order[np.clip(pos, topic_start[topic], topic_last[topic])]
    item = np.where(rng.random((c, draws)) < cfg.exploration,
                    rng.integers(0, n, size=(c, draws)), item)
    # A user's first draw of each item, in draw order, up to their count.
    row = np.broadcast_to(np.arange(c)[:, None], item.shape)
    _, first = np.unique(row.astype(np.int64).ravel() * n + item.ravel(), return_index=True)
    keep = np.zeros(item.size, bool)
    keep[first] = True
    keep = keep.reshape(item.shape)
    keep &= np.cumsum(keep, axis=1) <= count[:, None]
    users.append(start + row[keep])
    items.append(item[keep])
  user = np.concatenate(users).astype(np.int32)
  return Interactions(user, np.concatenate(items).astype(np.int32), _timestamps(rng, cfg, user),
                      np.ones(user.size, np.float32))


def _item_topics(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
  """Balanced dominant topics, [N] int32; the secondary topic is any other topic."""
  n, k = cfg.num_items, cfg.num_topics
  item_topic = rng.permutation(np.arange(n) % k).astype(np.int32)
  return item_topic, ((item_topic + rng.integers(1, k, size=n)) % k).astype(np.int32)


def _topic_words(cfg: SyntheticConfig) -> np.ndarray:
  """[K, words_per_topic]: the token ids each topic owns (after padding and stop words)."""
  k = cfg.num_topics
  return (1 + cfg.num_stop_words
          + np.arange(k * cfg.words_per_topic).reshape(k, cfg.words_per_topic))


def _zero_absent(presence: np.ndarray, text_ids: np.ndarray, text_mask: np.ndarray,
                 image: np.ndarray, video: np.ndarray) -> None:
  """Absent rows are zeros, as the contract requires (in place)."""
  text_ids[~presence[:, 0]] = 0
  text_mask[~presence[:, 0]] = False
  image[~presence[:, 1]] = 0
  video[~presence[:, 2]] = 0


def _make_text(rng: np.random.Generator, cfg: SyntheticConfig, topic: np.ndarray,
               secondary: np.ndarray, topic_words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Text of the items whose topics are given (any number of them, not only num_items)."""
  n, length = topic.shape[0], cfg.text_len
  if cfg.noise_modality == "text":
    tokens = rng.integers(1, cfg.vocab_size, size=(n, length))
  else:
    # Zipf inside a topic's words, so each topic has a few tell-tale words.
    weights = 1.0 / np.arange(1, cfg.words_per_topic + 1)
    cdf = np.cumsum(weights / weights.sum())
    rank = np.minimum(np.searchsorted(cdf, rng.random((n, length))), cfg.words_per_topic - 1)
    token_topic = np.where(rng.random((n, length)) < cfg.secondary_topic_weight,
                           secondary[:, None], topic[:, None])
    words = topic_words[token_topic, rank]
    stop = rng.integers(1, cfg.num_stop_words + 1, size=(n, length))
    tokens = np.where(rng.random((n, length)) < cfg.stop_word_prob, stop, words)
  lengths = rng.integers(cfg.min_text_len, length + 1, size=n)
  mask = np.arange(length)[None, :] < lengths[:, None]
  return np.where(mask, tokens, 0).astype(np.int32), mask


def _smooth_templates(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
  """[count, size, size, 3] periodic low-frequency patterns, each with zero mean, unit std."""
  shape = (count, 3, _NUM_WAVES)
  fy = rng.integers(-_MAX_FREQ, _MAX_FREQ + 1, size=shape)
  fx = rng.integers(-_MAX_FREQ, _MAX_FREQ + 1, size=shape)
  fx = np.where((fx == 0) & (fy == 0), 1, fx)  # a constant wave would carry no pattern
  phase = rng.uniform(0, 2 * np.pi, size=shape)
  amp = rng.normal(size=shape)
  grid = np.arange(size) * (2 * np.pi / size)
  arg = (fy[..., None, None] * grid[:, None] + fx[..., None, None] * grid[None, :]
         + phase[..., None, None])                                  # [count, 3, waves, H, W]
  pattern = np.einsum("ncwhv,ncw->nhvc", np.cos(arg), amp)
  pattern -= pattern.mean(axis=(1, 2, 3), keepdims=True)
  pattern /= pattern.std(axis=(1, 2, 3), keepdims=True) + 1e-6
  return pattern.astype(np.float32)


def _velocities(rng: np.random.Generator, count: int) -> np.ndarray:
  velocity = rng.integers(-2, 3, size=(count, 2))
  velocity[:, 1] = np.where((velocity[:, 0] == 0) & (velocity[:, 1] == 0), 1, velocity[:, 1])
  return velocity.astype(np.int32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(128.0 + _PIXEL_SCALE * x), 0, 255).astype(np.uint8)


def _mix(templates: np.ndarray, topic: np.ndarray, secondary: np.ndarray,
         weight: float) -> np.ndarray:
  return (1.0 - weight) * templates[topic] + weight * templates[secondary]


def _make_image(rng: np.random.Generator, cfg: SyntheticConfig, topic: np.ndarray,
                secondary: np.ndarray, templates: np.ndarray) -> np.ndarray:
  n, size = topic.shape[0], cfg.image_size
  if cfg.noise_modality == "image":
    # Same texture statistics as real images, but a private random pattern per item.
    base = _smooth_templates(rng, n, size)
  else:
    base = _mix(templates, topic, secondary, cfg.secondary_topic_weight)
  noise = rng.normal(scale=cfg.image_noise, size=(n, size, size, 3)).astype(np.float32)
  return _to_uint8(base + noise)


def _rolled(templates: np.ndarray, velocity: np.ndarray, frames: int) -> np.ndarray:
  """[P, T, H, W, 3]: frame t of pattern p is the pattern shifted by velocity[p] * t."""
  p, h, w, _ = templates.shape
  t = np.arange(frames)
  # np.roll semantics: out[y] = in[(y - shift) % H].
  rows = (np.arange(h)[None, None, :] - velocity[:, None, None, 0] * t[None, :, None]) % h
  cols = (np.arange(w)[None, None, :] - velocity[:, None, None, 1] * t[None, :, None]) % w
  idx = np.arange(p)[:, None, None, None]
  return templates[idx, rows[:, :, :, None], cols[:, :, None, :]]


def _make_video(rng: np.random.Generator, cfg: SyntheticConfig, topic: np.ndarray,
                secondary: np.ndarray, moving: np.ndarray) -> np.ndarray:
  """``moving``: ``_rolled(topic templates, velocities, frames)``, [K, T, H, W, 3]."""
  n, size, frames = topic.shape[0], cfg.image_size, cfg.video_frames
  if cfg.noise_modality == "video":
    base = _rolled(_smooth_templates(rng, n, size), _velocities(rng, n), frames)
  else:
    base = _mix(moving, topic, secondary, cfg.secondary_topic_weight)
  noise = rng.normal(scale=cfg.image_noise, size=(n, frames, size, size, 3)).astype(np.float32)
  return _to_uint8(base + noise)


def _make_presence(rng: np.random.Generator, cfg: SyntheticConfig) -> np.ndarray:
  n = cfg.num_items
  rates = np.array([cfg.missing_text, cfg.missing_image, cfg.missing_video])
  presence = rng.random((n, len(MODALITIES))) >= rates
  # Chance alone never empties an item: give it back one modality that is not always missing.
  available = np.flatnonzero(rates < 1.0)
  empty = ~presence.any(axis=1)
  if available.size:
    presence[np.flatnonzero(empty), rng.choice(available, size=int(empty.sum()))] = True
  presence[rng.permutation(n)[:int(round(cfg.no_content_fraction * n))]] = False
  return presence


def _user_preferences(rng: np.random.Generator, cfg: SyntheticConfig) -> np.ndarray:
  u, k, m = cfg.num_users, cfg.num_topics, cfg.max_topics_per_user
  num_liked = rng.integers(1, m + 1, size=u)
  liked = np.argsort(rng.random((u, k)), axis=1)[:, :m]
  weight = rng.gamma(2.0, size=(u, m)) * (np.arange(m)[None, :] < num_liked[:, None])
  pref = np.zeros((u, k))
  np.put_along_axis(pref, liked, weight, axis=1)
  return (pref / pref.sum(axis=1, keepdims=True)).astype(np.float32)


def _sample_interactions(rng: np.random.Generator, cfg: SyntheticConfig, item_topic: np.ndarray,
                         user_pref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per user, distinct items sampled by preference; returns (user, item) grouped by user."""
  n = cfg.num_items
  popularity, _ = _topic_popularity(rng, cfg, item_topic)
  prob = ((1.0 - cfg.exploration) * user_pref[:, item_topic] * popularity[None, :]
          + cfg.exploration / n)                                   # [U, N], rows sum to 1
  # Gumbel top-k = sampling without replacement proportionally to prob.
  with np.errstate(divide="ignore"):
    scores = np.log(prob) + rng.gumbel(size=prob.shape)
  ranked = np.argsort(-scores, axis=1)
  count = rng.integers(cfg.min_interactions, cfg.max_interactions + 1, size=cfg.num_users)
  keep = np.arange(n)[None, :] < count[:, None]
  user = np.broadcast_to(np.arange(cfg.num_users)[:, None], ranked.shape)[keep]
  # Gumbel order favours popular items first; time order should not, so shuffle per user.
  item = ranked[keep]
  shuffle = np.lexsort((rng.random(user.size), user))
  return user[shuffle].astype(np.int32), item[shuffle].astype(np.int32)


def _topic_popularity(rng: np.random.Generator, cfg: SyntheticConfig, item_topic: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Zipf popularity inside each topic over a random ranking of its items: ([N] float64, each
  topic's items summing to 1; [N] item ids sorted by (topic, rank))."""
  n, k = item_topic.shape[0], cfg.num_topics
  order = np.lexsort((rng.random(n), item_topic))
  topic_start = np.searchsorted(item_topic[order], np.arange(k))
  rank = np.empty(n, dtype=np.int64)
  rank[order] = np.arange(n) - topic_start[item_topic[order]]
  popularity = (rank + 1.0) ** -cfg.popularity_exponent
  popularity /= np.bincount(item_topic, weights=popularity, minlength=k)[item_topic]
  return popularity, order


def _timestamps(rng: np.random.Generator, cfg: SyntheticConfig, user: np.ndarray) -> np.ndarray:
  """Strictly increasing per user (``user`` is grouped); users start at random times."""
  gaps = rng.integers(60, 86_400, size=user.size)
  cumulative = np.cumsum(gaps)
  first = np.searchsorted(user, np.arange(cfg.num_users))
  user_first = first[user]
  since_first = cumulative - cumulative[user_first] + gaps[user_first]
  start = rng.integers(0, 365 * 86_400, size=cfg.num_users)
  return (_BASE_TIME + start[user] + since_first).astype(np.int64)


def _split(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray,
           held_out: np.ndarray) -> tuple[Interactions, Interactions, Interactions]:
  """``splits.loo`` (leave the last out, the second-last for valid), then every interaction of
  a held-out item goes to test."""
  order = np.lexsort((timestamp, user))
  user, item, timestamp = user[order], item[order], timestamp[order]
  rating = np.ones(user.size, dtype=np.float32)
  labels = splits.loo(splits.LogArrays(user.astype(np.int64), item.astype(np.int64), rating,
                                       timestamp.astype(np.int64))).labels
  cold = np.isin(item, held_out)
  events = Interactions(user, item, timestamp, rating)
  train = events.select((labels == "train") & ~cold)
  valid = events.select((labels == "valid") & ~cold)
  test = events.select((labels == "test") | cold)
  return train, valid, test
