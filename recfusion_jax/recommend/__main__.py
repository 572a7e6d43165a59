r"""Recommendations from a trained model, with the gate's reasons: ``python -m recfusion_jax.recommend``.

From a training workdir (its latest checkpoint, opened read-only) or from an export directory:

  python -m recfusion_jax.recommend --config configs/tiny.py --workdir RUN --users 3,7
  python -m recfusion_jax.recommend --export_dir RUN/export --liked 12,40,41 --k 5
  python -m recfusion_jax.recommend --config configs/movielens.py:size=small --workdir RUN \
      --new_item_text plot.txt --new_item_image poster.jpg --format json

  --users ID,...        training users (dense ids): their top-k items, known items excluded
  --liked ID,...        a user who is not in training, given by the items they liked (oldest
                        first): their top-k items
  --new_item_text FILE / --new_item_text_ids ID,... / --new_item_image FILE /
  --new_item_features MODALITY=FILE.npy,...   a new item from its content (cold start): its
                        nearest catalogue items by content and the users most likely to want it

Every recommended item comes with its score (the model's logit) and the gate's weights over its
sources (text / image / video / id): how much each source made the score, i.e. why it was
recommended. Items are shown by name (MovieLens titles, MMRec product ids, "item <i>" for
synthetic data). ``--format json`` prints one JSON object instead of text.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

from recfusion_jax import serving
from recfusion_jax.data.types import MODALITIES, RecDataset
from recfusion_jax.recommend import new_item as new_item_lib

NEW_ITEM_FLAGS = ("new_item_text", "new_item_text_ids", "new_item_image", "new_item_features")


def item_names_for(config: Any) -> list[str] | None:
  """Names of the catalogue's items: the build's titles (MovieLens, ``tfds``), MMRec asins; None
  for synthetic data."""
  if config.data.source in ("movielens", "tfds"):
    data_dir = epath.Path(config.data.dir)   # local or gs://
    item_map = json.loads((data_dir / "manifest.json").read_text())["item_map"]
    with (data_dir / item_map).open() as f:
      header = f.readline().rstrip("\n").split("\t")
      rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return [row[header.index("title")] for row in rows]
  if config.data.source == "mmrec":
    from recfusion_jax.data import mmrec  # pylint: disable=import-outside-toplevel
    return mmrec.read_item_names(config.data.dir)
  return None


def _text_context(config: Any) -> tuple[dict[str, Any] | None, int | None]:
  """(tokenizer {'file', 'build_len'} or None, the text stem's vocabulary size or None)."""
  text = config.model.encoder.get("text")
  if "text" not in config.model.modalities or text is None or text.get("stem") == "features":
    return None, None
  tokenizer = None
  if config.data.source == "movielens":
    path, build_len = new_item_lib.movielens_text_settings(config.data.dir)
    tokenizer = {"file": path, "build_len": build_len} if path else None
  return tokenizer, int(text.vocab_size)


def load_workdir(config: Any, workdir: str | os.PathLike, step: int | None = None
                 ) -> tuple[Any, RecDataset, int, dict[str, Any]]:
  """(model restored read-only onto the config's mesh, its data set, step, context)."""
  from recfusion_jax.data import sources  # pylint: disable=import-outside-toplevel
  from recfusion_jax import score_terms  # pylint: disable=import-outside-toplevel
  from recfusion_jax.recommend import restore  # pylint: disable=import-outside-toplevel
  from recfusion_jax.recommend.inference import content_inputs  # pylint: disable=import-outside-toplevel
  dataset = sources.load_dataset(config)
  model, step = restore.restore_model(config, workdir, dataset, step=step)
  # The fixed score terms' weights, chosen on valid after training (score_terms.FILE).
  terms = score_terms.apply_saved(model, workdir, dataset, config)
  tokenizer, vocab = _text_context(config)
  context = {"item_names": item_names_for(config), "tokenizer": tokenizer,
             "text_vocab_size": vocab,
             "content_spec": new_item_lib.content_spec(
                 content_inputs(dataset.catalogue, np.arange(1))),
             "source": {"workdir": str(workdir), "step": step, "data": dataset.name,
                        **({"score_terms": terms} if terms else {})}}
  return model, dataset, step, context


def from_workdir(config: Any, workdir: str | os.PathLike, *, k: int = 10,
                 step: int | None = None) -> tuple[serving.Recommendations, dict[str, Any]]:
  """Recommendations of a training workdir's checkpoint, computed in this process."""
  from recfusion_jax.recommend import service  # pylint: disable=import-outside-toplevel
  model, dataset, _, context = load_workdir(config, workdir, step)
  rec = service.recommendations(model, dataset, history_len=config.model.user.history_len,
                                k=k, item_names=context["item_names"],
                                chunk=config.eval_block_size)
  return rec, context


def from_export(export_dir: str) -> tuple[serving.Recommendations, dict[str, Any]]:
  """Recommendations served from an export directory (``serving.Recommendations.load``)."""
  rec = serving.Recommendations.load(export_dir)
  manifest = rec.manifest
  tokenizer = manifest.get("tokenizer")
  if tokenizer:
    # Local like the export itself (Recommendations.load memory-maps it).
    tokenizer = dict(tokenizer, file=os.path.join(export_dir, tokenizer["file"]))
  context = {"item_names": rec.item_names, "tokenizer": tokenizer,
             "text_vocab_size": manifest.get("text_vocab_size"),
             "content_spec": {key: (dtype, tuple(shape))
                              for key, (dtype, shape) in manifest["content_inputs"].items()},
             "source": {"export_dir": str(export_dir), "step": manifest.get("checkpoint_step"),
                        "data": manifest.get("data"),
                        **({"score_terms": manifest["score_terms"]}
                           if manifest.get("score_terms") else {})}}
  return rec, context


def _why(sources: Sequence[str], weights: np.ndarray) -> dict[str, float]:
  return {name: round(float(w), 4) for name, w in zip(sources, weights)}


def _ranked_items(rec: serving.Recommendations, out: Mapping[str, np.ndarray], row: int
                  ) -> list[dict[str, Any]]:
  found = []
  for items, score, weights in zip(out["items"][row], out["scores"][row], out["weights"][row]):
    if not np.isfinite(score):
      break   # fewer candidates than k: the rest are excluded items
    found.append({"rank": len(found) + 1, "item": int(items), "name": rec.item_name(int(items)),
                  "score": round(float(score), 4), "why": _why(rec.sources, weights)})
  return found


def run(rec: serving.Recommendations, context: Mapping[str, Any], *,
        users: Sequence[int] = (), liked: Sequence[int] | None = None,
        new_item: Mapping[str, Any] | None = None, k: int = 10) -> dict[str, Any]:
  """The answers as one JSON-ready dict (what ``--format json`` prints)."""
  result: dict[str, Any] = {"source": dict(context["source"]), "sources": list(rec.sources),
                            "k": k}
  if users:
    out = rec.for_users(users, k)
    result["users"] = [{"user": int(u), "known_items": int(rec.known(int(u)).size),
                        "recommendations": _ranked_items(rec, out, row)}
                       for row, u in enumerate(users)]
  if liked:
    out = rec.for_histories([list(liked)], k)
    result["liked"] = {"items": [{"item": int(i), "name": rec.item_name(int(i))} for i in liked],
                       "recommendations": _ranked_items(rec, out, 0)}
  if new_item:
    tokenizer = context.get("tokenizer") or {}
    content = new_item_lib.new_item_content(
        context["content_spec"], text=new_item.get("text"), text_ids=new_item.get("text_ids"),
        image=new_item.get("image"), features=new_item.get("features"),
        tokenizer_file=tokenizer.get("file"), build_len=tokenizer.get("build_len"),
        vocab_size=context.get("text_vocab_size"))
    out = rec.for_new_items(content, k)
    presence = content["presence"][0]
    result["new_item"] = {
        "modalities": [m for m, on in zip(MODALITIES, presence) if on],
        "nearest_items": [{"rank": r + 1, "item": int(i), "name": rec.item_name(int(i)),
                           "similarity": round(float(s), 4)}
                          for r, (i, s) in enumerate(zip(out["nearest"][0], out["similarity"][0]))],
        "likely_users": [{"rank": r + 1, "user": int(u), "score": round(float(s), 4),
                          "why": _why(rec.sources, w)}
                         for r, (u, s, w) in enumerate(zip(out["users"][0], out["user_scores"][0],
                                                           out["user_weights"][0]))]}
  return result


def _why_text(why: Mapping[str, float]) -> str:
  return " ".join(f"{name} {w:.2f}" for name, w in why.items())


def _terms_text(terms: Mapping[str, Sequence[float]]) -> str:
  from recfusion_jax import score_terms  # pylint: disable=import-outside-toplevel
  return ", ".join(f"{key} " + " ".join(f"{name} {value:g}" for name, value in
                                        zip(score_terms.setting_names(key), setting))
                   for key, setting in terms.items())


def format_text(result: Mapping[str, Any]) -> str:
  """The human-readable form of ``run``'s result."""
  src = result["source"]
  where = src.get("workdir") or src.get("export_dir")
  lines = [f"model: {where} (step {src.get('step')}, data {src.get('data')}); "
           f"'why' = the gate's weights over {', '.join(result['sources'])}"]
  if src.get("score_terms"):
    # The fixed terms add to every score; the gate's 'why' covers the trained part.
    lines.append(f"score terms chosen on valid: {_terms_text(src['score_terms'])}")

  def items_block(recs):
    width = max((len(r["name"]) for r in recs), default=0)
    return [f"  {r['rank']:2d}. {r['name']:<{width}}  score {r['score']:8.3f}   why: "
            f"{_why_text(r['why'])}" for r in recs] or ["  (no item left to recommend)"]

  for user in result.get("users", []):
    lines.append(f"user {user['user']} ({user['known_items']} known items, not recommended again):")
    lines += items_block(user["recommendations"])
  if "liked" in result:
    liked = result["liked"]
    lines.append("a user who liked " + "; ".join(i["name"] for i in liked["items"]) + ":")
    lines += items_block(liked["recommendations"])
  if "new_item" in result:
    new = result["new_item"]
    lines.append(f"new item ({', '.join(new['modalities'])}), nearest catalogue items by content:")
    width = max((len(r["name"]) for r in new["nearest_items"]), default=0)
    lines += [f"  {r['rank']:2d}. {r['name']:<{width}}  similarity {r['similarity']:6.3f}"
              for r in new["nearest_items"]]
    lines.append("users most likely to want it (scored from its content alone, no ID):")
    lines += [f"  {r['rank']:2d}. user {r['user']:<6d} score {r['score']:8.3f}   why: "
              f"{_why_text(r['why'])}" for r in new["likely_users"]]
  return "\n".join(lines)


def _new_item_from_flags(values: Any) -> dict[str, Any] | None:
  spec: dict[str, Any] = {}
  if values.new_item_text:
    spec["text"] = epath.Path(values.new_item_text).read_text()
  if values.new_item_text_ids:
    spec["text_ids"] = [int(x) for x in values.new_item_text_ids]
  if values.new_item_image:
    spec["image"] = values.new_item_image
  if values.new_item_features:
    pairs = [item.split("=", 1) for item in values.new_item_features]
    if any(len(p) != 2 for p in pairs):
      raise ValueError("--new_item_features takes MODALITY=FILE.npy,...")
    spec["features"] = dict(pairs)
  return spec or None


def main(argv: Sequence[str]) -> None:
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  values = flags.FLAGS
  if bool(values.export_dir) == bool(values.workdir):
    raise app.UsageError("give --export_dir, or --config and --workdir")
  if values.workdir and values.config is None:
    raise app.UsageError("--workdir needs --config (the run's training configuration)")
  users = [int(u) for u in values.users or []]
  liked = [int(i) for i in values.liked or []]
  new_item = _new_item_from_flags(values)
  if not users and not liked and not new_item:
    raise app.UsageError("nothing to do: give --users, --liked or a --new_item_* flag")
  if values.export_dir:
    rec, context = from_export(values.export_dir)
  else:
    from recfusion_jax import config_lib  # pylint: disable=import-outside-toplevel
    # The training run's protocol fields (main applied them), so the model matches its checkpoint.
    config = config_lib.config_from_flag("config")
    rec, context = from_workdir(config, values.workdir, k=values.k, step=values.step)
  result = run(rec, context, users=users, liked=liked, new_item=new_item, k=values.k)
  print(json.dumps(result, indent=1) if values.format == "json" else format_text(result))


def define_flags() -> None:
  """The CLI's flags (kept off import: importing this module never collides with another CLI's
  flags in one process). Flags another CLI already defined (export: config, workdir, step, k)
  are shared."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  def define(name, fn, *args):
    if name not in flags.FLAGS:
      fn(name, *args)

  define("config", config_flags.DEFINE_config_file, None, "Training configuration of --workdir.")
  define("workdir", flags.DEFINE_string, None, "Training run directory (checkpoints read-only).")
  define("export_dir", flags.DEFINE_string, None,
         "Export directory (python -m recfusion_jax.export).")
  define("step", flags.DEFINE_integer, None, "Checkpoint step of --workdir (default: the latest).")
  define("users", flags.DEFINE_list, [], "Training user ids (dense, 0-based).")
  define("liked", flags.DEFINE_list, [], "Item ids a user not in training liked, oldest first.")
  define("new_item_text", flags.DEFINE_string, None, "Text file of a new item.")
  define("new_item_text_ids", flags.DEFINE_list, [],
         "A new item's token ids (data without a tokenizer).")
  define("new_item_image", flags.DEFINE_string, None, "Image file of a new item.")
  define("new_item_features", flags.DEFINE_list, [],
         "MODALITY=FILE.npy feature vectors of a new item.")
  define("k", flags.DEFINE_integer, 10, "How many items / users to return.")
  define("format", flags.DEFINE_enum, "text", ["text", "json"], "Output format.")


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  define_flags()
  _app.run(main)
