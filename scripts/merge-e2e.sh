#!/usr/bin/env bash
# End-to-end merging check (issue 6; needs `cargo build --release -p rime-cli` and scripts/fetch-models.sh): three short LoRA fine-tunes on disjoint slices of fine_foods/train, merged by
# every method, each evaluated with `rime eval` on 500 test rows.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
R=$ROOT/target/release/rime
D=${1:-/tmp/rime-merge-e2e}; mkdir -p $D
M=$ROOT/models/all-minilm-l6-v2
cd $D
sed -n '1,1000p' $ROOT/data/fine_foods/train.jsonl > t0.jsonl
sed -n '1001,2000p' $ROOT/data/fine_foods/train.jsonl > t1.jsonl
sed -n '2001,3000p' $ROOT/data/fine_foods/train.jsonl > t2.jsonl
sed -n '3501,3800p' $ROOT/data/fine_foods/train.jsonl > val.jsonl
sed -n '1,500p' $ROOT/data/fine_foods/test.jsonl > test.jsonl
for i in 0 1 2; do
  [ -f ft$i/best/adapter_config.json ] || $R train --model $M --train t$i.jsonl --eval val.jsonl --seed $i --lr 3e-3 --out ft$i --save-every 0 2>ft$i.log
done
ev() { $R eval --model $M --adapter $1 --data test.jsonl --json 2>/dev/null; }
for i in 0 1 2; do echo "ingredient$i $(ev ft$i/best)"; done
A=ft0/best,ft1/best,ft2/best
s=$(date +%s.%N); $R merge --combine-lora $A --combination cat --weights 0.3333333,0.3333333,0.3333333 --out soup --force 2>/dev/null; e=$(date +%s.%N)
echo "uniform_soup $(ev soup) merge_s $(echo "$e - $s" | bc)"
$R merge --combine-lora $A --combination cat --weights 0.5,0.5,0.5 --out ta --force 2>/dev/null
echo "task_arithmetic_lambda0.5 $(ev ta)"
$R merge --combine-lora $A --combination ties --density 0.5 --weights 1,1,1 --out ties --force 2>/dev/null
echo "ties_d0.5 $(ev ties)"
cat > greedy.yaml <<Y
merge_method: greedy_soup
base_model: $M
models:
  - model: $D/ft0/best
  - model: $D/ft1/best
  - model: $D/ft2/best
parameters:
  eval_data: $D/val.jsonl
  combination: cat
Y
$R merge greedy.yaml --out greedy --force 2> greedy.log
echo "greedy_soup $(ev greedy)"
cat > atlas.yaml <<Y
merge_method: atlas
base_model: $M
models:
  - model: $D/ft0/best
  - model: $D/ft1/best
  - model: $D/ft2/best
parameters:
  train_data: $D/val.jsonl
  eval_data: $D/val.jsonl
Y
$R merge atlas.yaml --out atlas --force 2> atlas.log
echo "atlas $($R eval --model $D/atlas --adapter $D/atlas/head --data test.jsonl --json 2>/dev/null)"
for f in soup/merge_report.json greedy/merge_report.json atlas/merge_report.json; do echo "$f: $(head -c 600 $f)"; done
