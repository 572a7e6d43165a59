"""A pod-shaped synthetic catalogue: text, images and videos at ``configs/pod.py``'s shapes.

Usage:
  python -m data_prep.synthetic_pod --out_dir data_out/synthetic_pod \
      [--num_items 10000 --num_users 50000 --interactions_per_user 40 --image_size 224 \
       --video_frames 16 --text_len 128 --vocab_size 30522 --num_topics 16 --seed 0 \
       --protocols loo --chunk_items 8 --reuse_tfds]

The content follows ``recfusion_jax.data.synthetic``'s planted topics (topic words, topic image
templates, topic videos moving with a topic velocity; users like one or two topics), drawn
``chunk_items`` items at a time (``synthetic.content_chunks``) and handed to TFDS's writer, which
holds at most 1 GB in memory and spills the rest to temporary files: the catalogue is never
whole in memory here (the interaction log, a few numbers per event, and per-item topics and
presence are). At the default shapes an item takes about 2.5 MB on disk
(a 16 x 224 x 224 x 3 uint8 video, stored raw, and a PNG image).

Output under ``--out_dir``, the layout of ``data_prep.movielens`` (the same loader reads both;
configs name it ``data.source="tfds"``):
  tfds/synthetic_mm_items/<config>/1.1.0/   TFDS ArrayRecord, one example per item: index,
                                            text_ids, text_mask, image, video, has_*.
  item_map.tsv, user_map.tsv                dense index <-> id (here the same numbers).
  splits/<protocol>/seed<k>.tsv|.json       see recfusion_jax/data/splits.py; ``loo`` by
                                            default (every rating is 1: the rating-threshold
                                            protocols warm_ratio / missing_modality do not apply).
  build_report.json, manifest.json
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
import numpy as np

from configs import pod
from data_prep import cli
from recfusion_jax.data import records
from recfusion_jax.data import splits as splits_lib
from recfusion_jax.data import synthetic
from recfusion_jax.data.types import MODALITIES

NAME = "synthetic_pod"
# Protocols that hold on implicit data (rating 1); cold_items needs items with text and image.
PROTOCOLS = ("loo", "cold_items", "cold_users")


def generator_fields(num_items: int, num_users: int, interactions_per_user: int, image_size: int,
                     video_frames: int, text_len: int, vocab_size: int, num_topics: int,
                     seed: int) -> dict:
  """The ``SyntheticConfig`` of the catalogue: users get uniformly 1/2 to 3/2 of
  ``interactions_per_user`` interactions (at least 3, at most ``num_items``)."""
  low = max(3, interactions_per_user - interactions_per_user // 2)
  high = min(num_items, max(low, interactions_per_user + interactions_per_user // 2))
  fields = dict(num_items=num_items, num_users=num_users, min_interactions=low,
                max_interactions=high, image_size=image_size, video_frames=video_frames,
                text_len=text_len, min_text_len=max(1, min(text_len, text_len // 4)),
                vocab_size=vocab_size, num_topics=num_topics, seed=seed,
                cold_item_fraction=0.0, name=NAME)
  synthetic.resolve_config(fields)   # every range checked before anything is written
  return fields


def _write_maps(out_dir: str, item_topic: np.ndarray, num_users: int) -> dict[str, str]:
  """item_map.tsv (index, item_id, title) and user_map.tsv (index, user_id), line by line."""
  paths = {"item_map": "item_map.tsv", "user_map": "user_map.tsv"}
  with open(os.path.join(out_dir, paths["item_map"]), "w", encoding="utf-8") as f:
    f.write("index\titem_id\ttitle\n")
    for k, topic in enumerate(item_topic.tolist()):
      f.write(f"{k}\t{k}\tsynthetic item {k} (topic {topic})\n")
  with open(os.path.join(out_dir, paths["user_map"]), "w", encoding="utf-8") as f:
    f.write("index\tuser_id\n")
    for u in range(num_users):
      f.write(f"{u}\t{u}\n")
  return paths


def build(out_dir: str, *, num_items: int, num_users: int, interactions_per_user: int = 40,
          image_size: int = pod.SHAPES["pod"]["image_size"],
          video_frames: int = pod.SHAPES["pod"]["video_frames"],
          text_len: int = pod.SHAPES["pod"]["text_len"],
          vocab_size: int = pod.SHAPES["pod"]["vocab_size"], num_topics: int = 16,
          seed: int = 0, protocols: tuple[str, ...] = ("loo",), chunk_items: int = 8,
          reuse_tfds: bool = False, verbose: bool = True) -> dict:
  """Writes the items (TFDS ArrayRecord), id maps, splits, report and manifest; returns the
  report. Existing TFDS data of the same settings is regenerated unless ``reuse_tfds``."""
  from data_prep import tfds_builders  # pylint: disable=import-outside-toplevel  (imports TF)

  unknown = sorted(set(protocols) - set(PROTOCOLS))
  if unknown or not protocols:
    raise ValueError(f"protocols {list(protocols)}: choose from {list(PROTOCOLS)}")
  start = time.time()
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  fields = generator_fields(num_items, num_users, interactions_per_user, image_size,
                            video_frames, text_len, vocab_size, num_topics, seed)
  items_dir = tfds_builders.build_synthetic_items(
      os.path.join(out_dir, "tfds"), fields, chunk_items, overwrite=not reuse_tfds)
  plan = synthetic.content_plan(fields)   # topics and presence again: what the items hold
  maps = _write_maps(out_dir, plan.item_topic, num_users)
  # Streaming readers (data.streaming) find an item's record through this index.
  records.write_record_index(items_dir, os.path.join(out_dir, records.INDEX_FILE))

  events = synthetic.stream_interactions(fields, plan.item_topic)
  log = splits_lib.LogArrays(events.user.astype(np.int64), events.item.astype(np.int64),
                             events.rating, events.timestamp)
  has = {m: dict(enumerate(plan.presence[:, MODALITIES.index(m)].tolist()))
         for m in ("text", "image")}
  split_summary = {}
  for protocol in protocols:
    split = splits_lib.make_split(protocol, log, has["text"], has["image"], seed=0)
    splits_lib.write_split(split, log, os.path.join(out_dir, "splits"))
    split_summary[f"{protocol}/seed0"] = {
        label: split.meta["counts"][label]["positives"] for label in ("train", "valid", "test")}

  per_user = np.bincount(events.user, minlength=num_users)
  report = {
      "items": num_items, "users": num_users, "interactions": len(log),
      "interactions_per_user": {"min": int(per_user.min()),
                                "mean": round(len(log) / num_users, 2),
                                "max": int(per_user.max())},
      "items_with": {m: int(plan.presence[:, k].sum()) for k, m in enumerate(MODALITIES)},
      "splits_positives": split_summary,
      "tfds_bytes": sum(os.path.getsize(os.path.join(d, f))
                        for d, _, files in os.walk(items_dir) for f in files),
      "wall_time_s": round(time.time() - start, 1),
  }
  manifest = {
      "name": NAME,
      "items_tfds": os.path.relpath(items_dir, out_dir),
      "item_records": records.INDEX_FILE,
      "item_map": maps["item_map"], "user_map": maps["user_map"],
      "splits": "splits",
      "protocols": list(protocols),
      "seeds": {p: [0] for p in protocols},
      "image_size": image_size, "video_frames": video_frames, "text_len": text_len,
      "vocab_size": vocab_size,
      "generator": fields, "chunk_items": chunk_items,
      "report": "build_report.json",
  }
  with open(os.path.join(out_dir, "build_report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  if verbose:
    print(json.dumps(report, indent=1))
  return report


def _define_flags() -> None:
  """The CLI's flags, defined only when run as a program (the module is also imported)."""
  shapes = pod.SHAPES["pod"]
  flags.DEFINE_string("out_dir", None, "Output directory; required (configs/pod.py reads "
                      f"{pod.DATA_DIR}).")
  flags.DEFINE_integer("num_items", 10_000, "Items in the catalogue.")
  flags.DEFINE_integer("num_users", 50_000, "Users.")
  flags.DEFINE_integer("interactions_per_user", 40, "Mean interactions per user.")
  flags.DEFINE_integer("image_size", shapes["image_size"], "Image (and video frame) side, px.")
  flags.DEFINE_integer("video_frames", shapes["video_frames"], "Frames per video.")
  flags.DEFINE_integer("text_len", shapes["text_len"], "Tokens per item text.")
  flags.DEFINE_integer("vocab_size", shapes["vocab_size"], "Token ids are < this.")
  flags.DEFINE_integer("num_topics", 16, "Planted topics.")
  flags.DEFINE_integer("seed", 0, "Generator seed.")
  flags.DEFINE_list("protocols", ["loo"], f"Splits to write, of {list(PROTOCOLS)}.")
  flags.DEFINE_integer("chunk_items", 8, "Items drawn and handed to the writer at a time.")
  flags.DEFINE_bool("reuse_tfds", False,
                    "Keep TFDS items of the same settings already in out_dir.")


def main(argv: list[str]) -> int:
  f = cli.parsed_flags(argv)
  build(f.out_dir, num_items=f.num_items, num_users=f.num_users,
        interactions_per_user=f.interactions_per_user, image_size=f.image_size,
        video_frames=f.video_frames, text_len=f.text_len, vocab_size=f.vocab_size,
        num_topics=f.num_topics, seed=f.seed, protocols=tuple(f.protocols),
        chunk_items=f.chunk_items, reuse_tfds=f.reuse_tfds)
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
