r"""Convert Hugging Face checkpoints into a RecFusion encoder checkpoint.

  python -m recfusion_jax.convert --hf /path/to/all-MiniLM-L6-v2 --out /ckpt/minilm
  python -m recfusion_jax.convert --hf bert_dir --hf vit_dir --trunk_from text --out DIR
  python -m recfusion_jax.convert --hf clip_dir --modality image --out DIR

Writes DIR/params (Orbax), DIR/encoder.json (encoder config + conversion reports) and
DIR/tokenizer; point a training config's ``init_from`` at DIR.
"""

from __future__ import annotations

from absl import app
from absl import flags

from recfusion_jax.convert.checkpoint import convert_hf, save_converted

_HF = flags.DEFINE_multi_string(
    "hf", None, "HF or sentence-transformers folder; repeat to combine checkpoints (each "
    "modality from one of them); required.")
_OUT = flags.DEFINE_string("out", None, "Output directory; required.")
_MODALITY = flags.DEFINE_multi_enum("modality", None, ["text", "image"],
                                    "Import only these towers (repeatable; default: all).")
_UNIFIED = flags.DEFINE_bool(
    "unified", None, "One shared trunk (default) or separate towers (--nounified; the default "
    "for a two-tower CLIP folder).")
_TRUNK_FROM = flags.DEFINE_enum(
    "trunk_from", None, ["text", "image"], "Unified: which modality's tower becomes the shared "
    "trunk (default: the first checkpoint's first tower).")
_MAX_LEN = flags.DEFINE_integer(
    "max_len", None, "Text positions to keep (default: all of the checkpoint's); the rest of "
    "the position table is dropped and reported.")
_FORCE = flags.DEFINE_bool("force", False, "Overwrite DIR/params.")


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  # Checked here, not with required=True: a required flag would fail the flag parsing of
  # any other CLI imported into the same process (the tests parse several).
  if not _HF.value or not _OUT.value:
    raise app.UsageError("--hf and --out are required")
  converted = convert_hf(_HF.value, modalities=_MODALITY.value, unified=_UNIFIED.value,
                         trunk_from=_TRUNK_FROM.value, max_len=_MAX_LEN.value)
  out = save_converted(converted, _OUT.value, force=_FORCE.value)
  for report in converted.reports:
    print(report.summary())
  for path in converted.not_filled:
    print(f"starts from scratch: {path}")
  print(f"wrote {out} (modalities {list(converted.modalities)}, "
        f"unified={converted.config.unified})")
  return 0


if __name__ == "__main__":
  app.run(main)
