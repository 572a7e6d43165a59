r"""Convert Hugging Face checkpoints into a RecFusion encoder checkpoint.

  python -m recfusion_jax.convert --hf /path/to/all-MiniLM-L6-v2 --out /ckpt/minilm
  python -m recfusion_jax.convert --hf bert_dir --hf vit_dir --trunk_from text --out DIR
  python -m recfusion_jax.convert --hf clip_dir --modality image --out DIR

Writes DIR/params (Orbax), DIR/encoder.json (encoder config + conversion reports) and
DIR/tokenizer; point a training config's ``init_from`` at DIR.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from recfusion_jax.convert.checkpoint import convert_hf, save_converted


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m recfusion_jax.convert",
      description="Hugging Face BERT / ViT / CLIP folder(s) -> RecFusion encoder checkpoint.")
  parser.add_argument("--hf", action="append", required=True, metavar="PATH",
                      help="HF or sentence-transformers folder; repeat to combine checkpoints "
                           "(each modality from one of them)")
  parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
  parser.add_argument("--modality", action="append", choices=("text", "image"),
                      help="import only these towers (repeatable; default: all)")
  parser.add_argument("--unified", action=argparse.BooleanOptionalAction, default=None,
                      help="one shared trunk (default) or separate towers (--no-unified; the "
                           "default for a two-tower CLIP folder)")
  parser.add_argument("--trunk_from", choices=("text", "image"),
                      help="unified: which modality's tower becomes the shared trunk "
                           "(default: the first checkpoint's first tower)")
  parser.add_argument("--max_len", type=int,
                      help="text positions to keep (default: all of the checkpoint's); the "
                           "rest of the position table is dropped and reported")
  parser.add_argument("--force", action="store_true", help="overwrite DIR/params")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  converted = convert_hf(args.hf, modalities=args.modality, unified=args.unified,
                         trunk_from=args.trunk_from, max_len=args.max_len)
  out = save_converted(converted, args.out, force=args.force)
  for report in converted.reports:
    print(report.summary())
  for path in converted.not_filled:
    print(f"starts from scratch: {path}")
  print(f"wrote {out} (modalities {list(converted.modalities)}, "
        f"unified={converted.config.unified})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
