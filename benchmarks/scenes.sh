#!/usr/bin/env bash
# The scene benchmark: the generator's JSONL and `hae eval`, nothing else (issue 35).
#
#   bash benchmarks/scenes.sh TASK SEED ITEMS [hae eval options...]
#   bash benchmarks/scenes.sh ask 2 300 --budgets 0.1,0.05 --fewer-crops 1     # report on the test seed
#   bash benchmarks/scenes.sh ask 1 100 --budgets 0.1:separators=with_row      # tune on seed 1
#
# Writes the data to $SCENES_DATA (default: ~/.cache/hae/scenes) and the run to
# benchmarks/results/scenes_TASK_seedSEED[_TAG]/: summary.json, accuracy.png and conditions.json
# (commit, load average before and after, the command, and whether a training run was going).
# Resumable: the same command again continues the run (hae eval --resume).
set -euo pipefail
cd "$(dirname "$0")/.."
task=${1:?task: ask, chat or story}; seed=${2:?seed}; items=${3:?items}; shift 3
data=${SCENES_DATA:-$HOME/.cache/hae/scenes}/${task}_seed${seed}_${items}
out=benchmarks/results/scenes_${task}_seed${seed}${TAG:+_$TAG}
runs=${SCENES_RUNS:-$HOME/.cache/hae/scenes_runs}/$(basename "$out")
[ -f "$data/data.jsonl" ] || python scripts/make_scenes.py --seed "$seed" --out "$data" --items "$items" --task "$task"
mkdir -p "$(dirname "$runs")"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
training=$(pgrep -f "train_(demo|scenes)_model.py" >/dev/null && echo yes || echo no)
resume=(); [ -f "$runs/results.jsonl" ] && resume=(--resume)
start=$(date +%s)
hae eval "$data/data.jsonl" --task "$task" --model "${MODEL:-scenes}" --out "$runs" --quiet "${resume[@]}" "$@" \
  | tee "$runs.txt"
mkdir -p "$out"
cp "$runs/summary.json" "$out/"
[ -f "$runs/accuracy.png" ] && cp "$runs/accuracy.png" "$out/"
cp "$runs.txt" "$out/tables.txt"
python - "$out/conditions.json" "$load_before" "$training" "$start" "$*" <<'EOF'
import json, subprocess, sys, time
path, load_before, training, start, options = sys.argv[1:]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout)
json.dump({"commit": commit + ("+changes" if dirty else ""), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "seconds": round(time.time() - int(start)), "load_before": load_before,
           "load_after": open("/proc/loadavg").read().split()[:3], "training_running": training == "yes",
           "hae_eval_options": options}, open(path, "w"), indent=2)
EOF
echo "results in $out"
