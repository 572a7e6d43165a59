# Gathers the current recipe's records into one workdir for `benchmark --merge`, which wrote
# docs/RESULTS.md (docs/TUNING.md §32). The runs' workdirs (/work/runs/...) are the 2-core VM's of
# 2026-12-05..07; the docs/results_* records it reads are in the repository. Then:
#   python -m recfusion_jax.benchmark --suite movielens --config configs/movielens.py:size=small \
#     --workdir NEW_WORKDIR --models <every model> --protocols <every protocol> --seeds 0,1,2,3,4 --merge
set -e
M=${1:?usage: docs/assemble_results.sh NEW_WORKDIR}
D=$(cd "$(dirname "$0")" && pwd)
if [ -n "$(ls -A "$M" 2>/dev/null)" ]; then echo "$M is not empty" >&2; exit 1; fi
mkdir -p "$M"
for W in /work/runs/s43/wa /work/runs/s43/loo /work/runs/s44/cm; do
  cp $W/results_per_seed.shard*.jsonl $W/command.shard*.txt $M/
done
cp /work/runs/s44/extra_id/results_per_seed.jsonl $M/results_per_seed.shard_extra_id.jsonl
head -1 /work/runs/s44/extra_commands.txt > $M/command.shard_extra_id.txt
for W in cm2a cm2b; do
  cp /work/runs/s44/$W/results_per_seed.jsonl $M/results_per_seed.shard_seed2_$W.jsonl
  cp /work/runs/s44/$W/command.txt $M/command.shard_seed2_$W.txt
done
python - $M $D <<'PY'
import json, sys, re
M, D = sys.argv[1:]
def page_command(page):
  line = next(l for l in open(f"{D}/{page}/RESULTS.md") if l.startswith("- command:"))
  return re.sub(r"^- command: `|`$", "", line.strip())
for page, name, keep in [("results_5seeds", "5seeds_cold", ("cold_items", "retrieval")),
                         ("results_cold_users", "cold_users", ("cold_users",))]:
  rows = [json.loads(l) for l in open(f"{D}/{page}/results_per_seed.jsonl") if l.strip()]
  rows = [r for r in rows if r["protocol"] in keep]
  with open(f"{M}/results_per_seed.shard_{name}.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  open(f"{M}/command.shard_{name}.txt", "w").write(
      f"(docs/{page}, its {', '.join(keep)} records) " + page_command(page) + "\n")
  print(page, len(rows))
PY
# Training curves: each record's metrics.jsonl where its workdir is kept.
python - $M <<'PY'
import json, glob, os, shutil, sys
M = sys.argv[1]
sources = ["/work/runs/s43/wa", "/work/runs/s43/loo", "/work/runs/s44/cm", "/work/runs/s44/cm2a", "/work/runs/s44/cm2b", "/work/runs/s44/extra_id",
           "/work/runs/s41/wa", "/work/runs/s42/loo"]
found = missing = 0
for path in glob.glob(f"{M}/results_per_seed.shard*.jsonl"):
  for line in open(path):
    run_dir = json.loads(line).get("run_dir")
    if not run_dir:
      continue
    src = next((f"{s}/{run_dir}/metrics.jsonl" for s in sources
                if os.path.exists(f"{s}/{run_dir}/metrics.jsonl")), None)
    if src is None:
      missing += 1
      continue
    os.makedirs(f"{M}/{run_dir}", exist_ok=True)
    shutil.copy(src, f"{M}/{run_dir}/metrics.jsonl")
    found += 1
print("curves found", found, "missing", missing)
PY
