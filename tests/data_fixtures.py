"""Tiny data sets in the real on-disk formats, shared by the tests that read or train on them:
a MovieLens raw directory (with one of every bad input the build must count) and an MMRec set."""

import csv
import io
import os

import numpy as np

# ----------------------------------------------------------------------------- MovieLens


def jpeg(color, size=(12, 18)) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "toy", "story", "movie", "a", "the", "."]

EXTRA = list(range(10, 22))  # ordinary items: description + poster
PLACEHOLDER = ("It looks like we don't have any Plot Summaries for this title yet.\n"
               "Be the first to contribute!")


def write_movielens_raw(root) -> dict:
  """Writes a tiny raw directory with one of each bad input; returns expected facts."""
  ml = root / "ml-100k"
  ml.mkdir(parents=True)
  items = [
      (1, "Toy Story", "1995", "Animation Children's Comedy"),
      (2, "Usual Suspects, The", "1995", "Crime Thriller"),
      (3, "Seven (Se7en)", "1995", "Crime Thriller"),
      (4, "Postino, Il", "1994", "Drama Romance"),
      (5, "Horseman on the Roof, The (Hussard sur le toit, Le)", "1995", "Drama"),
      (6, "Cérémonie, La", "1995", "Drama"),
      (7, "Good Morning", "1971", "unknown"),
      (8, "Land Before Time III: The Time of the Great Giving (1995)", "V", "Animation"),
      (9, "unkonwn", "unkonwn", "unknown"),
  ] + [(i, f"Movie Number {i}", "1990", "Drama") for i in EXTRA]
  with open(ml / "ml-100k.item", "w", encoding="utf-8") as f:
    f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
    f.writelines(f"{i}\t{t}\t{y}\t{g}\n" for i, t, y, g in items)
  users = list(range(1, 9))
  with open(ml / "ml-100k.user", "w", encoding="utf-8") as f:
    f.write("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n")
    f.writelines(f"{u}\t30\tM\tother\t00000\n" for u in users)

  rng = np.random.default_rng(0)
  item_ids = [i for i, *_ in items]
  rows = []
  for u in users:
    for t, i in enumerate(rng.choice(item_ids, size=12, replace=False).tolist()):
      rows.append((u, i, int(rng.integers(1, 6)), 1000 * u + t))
  dup_user, dup_item, _, dup_t = rows[0]
  good = len(rows)
  rows.append((dup_user, dup_item, 5, dup_t + 5000))  # duplicate, later: this one is kept
  rows.append((99, 1, 4, 5))                            # unknown user
  rows.append((1, 999, 4, 5))                           # unknown item
  with open(ml / "ml-100k.inter", "w", encoding="utf-8") as f:
    f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
    f.writelines(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)
    f.write("x\t1\t3\t5\n")                             # malformed

  details = root / "ml-100k-details"
  details.mkdir()
  desc = {1: "A cowboy doll is threatened by a new spaceman toy.",
          2: "A sole survivor tells of the twisty events.",
          3: "Two detectives hunt a serial killer.", 4: "A postman learns to love poetry.",
          5: PLACEHOLDER, 6: "   "}
  desc.update({i: f"The story of movie {i}." for i in EXTRA})
  buf = io.StringIO(newline="")
  writer = csv.writer(buf)
  writer.writerow(["movie_genres", "movie_id", "movie_title", "description", "year"])
  for i, d in desc.items():
    writer.writerow(["[1]", i, f"title {i}", d, "1995.0"])
  writer.writerow(["[1]", 999, "not in ml-100k", "An unknown movie.", "1990.0"])
  writer.writerow(["[1]", 1, "again", "A duplicate row.", "1995.0"])
  data = buf.getvalue().encode("utf-8")
  data += b'"[1]",7,"Good Morning","Two brothers \xff\xfe want a TV.","1971.0"\r\n'
  (details / "movielens100k_details.csv").write_bytes(data)

  posters = root / "ml-1m-posters" / "posters"
  posters.mkdir(parents=True)
  ml1m = [(11, "Toy Story (1995)"), (12, "Usual Suspects, The (1995)"), (13, "Se7en (1995)"),
          (14, "Postino, Il (1995)"), (15, "Hussard sur le toit, Le (1995)"),
          (16, "Cérémonie, La (1995)"),
          (18, "Land Before Time III: The Time of the Great Giving (1995)"),
          (50, "Something Else (1980)")] + [(i + 100, f"Movie Number {i} (1990)") for i in EXTRA]
  with open(root / "ml-1m-posters" / "movies.dat", "wb") as f:
    for mid, title in ml1m:
      f.write(f"{mid}::{title}::Drama\n".encode("latin-1"))  # like the original file
  colours = {}
  for mid in [11, 12, 16, 18] + [i + 100 for i in EXTRA]:
    colours[mid] = tuple(int(c) for c in rng.integers(0, 256, size=3))
    (posters / f"{mid}.jpg").write_bytes(jpeg(colours[mid]))
  (posters / "13.jpg").write_bytes(b"\x00garbage, not a jpeg" * 20)
  (posters / "14.jpg").write_bytes(jpeg((1, 2, 3), size=(64, 96))[:300])
  (posters / "50.jpg").write_bytes(jpeg((9, 9, 9)))
  return {"items": len(items), "users": len(users), "interactions": good,
          "dup": (dup_user, dup_item, dup_t + 5000), "colours": colours, "raw": str(root)}


# ----------------------------------------------------------------------------- MMRec

TEXT_DIM, IMAGE_DIM = 8, 12


def write_mmrec_files(root, name="baby", num_users=48, num_items=40, seed=0):
  """A planted-topic set written the way MMRec's preprocessing writes it (pandas to_csv with
  sep='\\t', index=False): users like one topic; labels by global time quantiles 0.7 / 0.8.

  Planted oddities: item 0 has an all-zero image row (missing image), item 1 a NaN text row,
  the last user appears only in test (a cold user MMRec drops), the last item only in test.
  """
  rng = np.random.default_rng(seed)
  topics = 4
  item_topic = np.arange(num_items) % topics
  text = rng.normal(size=(topics, TEXT_DIM))[item_topic] + 0.3 * rng.normal(size=(num_items, TEXT_DIM))
  image = rng.normal(size=(topics, IMAGE_DIM))[item_topic] + 0.3 * rng.normal(
      size=(num_items, IMAGE_DIM))
  image[0] = 0.0
  text[1] = np.nan
  rows = []
  for u in range(num_users - 1):
    liked = np.flatnonzero(item_topic == u % topics)
    liked = liked[liked != num_items - 1]
    for i in rng.choice(liked, size=6, replace=False):
      rows.append((u, int(i), float(rng.integers(1, 6)), int(1_400_000_000 + rng.integers(0, 10**7))))
  times = np.asarray([r[3] for r in rows])
  cut = np.quantile(times, [0.7, 0.8])
  label = np.where(times < cut[0], 0, np.where(times < cut[1], 1, 2))
  late = int(times.max()) + 1
  rows += [(num_users - 1, 3, 5.0, late), (0, num_items - 1, 4.0, late)]
  label = np.r_[label, 2, 2]
  data_dir = os.path.join(root, name)
  os.makedirs(data_dir)
  with open(os.path.join(data_dir, f"{name}.inter"), "w") as f:
    f.write("userID\titemID\trating\ttimestamp\tx_label\n")
    for (u, i, r, t), x in zip(rows, label):
      f.write(f"{u}\t{i}\t{r}\t{t}\t{x}\n")
  np.save(os.path.join(data_dir, "text_feat.npy"), text.astype(np.float32))
  np.save(os.path.join(data_dir, "image_feat.npy"), image.astype(np.float32))
  with open(os.path.join(data_dir, "i_id_mapping.csv"), "w") as f:
    f.write("asin\titemID\n" + "".join(f"B00{i:05d}\t{i}\n" for i in range(num_items)))
  with open(os.path.join(data_dir, "u_id_mapping.csv"), "w") as f:
    f.write("user_id\tuserID\n" + "".join(f"A{u:06d}X\t{u}\n" for u in range(num_users)))
  return data_dir, rows, label
