#!/usr/bin/env bash
# The mftune demo, on CPU in a few minutes: set up, build a tiny model, check the data, fine-tune it on
# four tasks at once, merge the adapter, and score every task on its held-out problems.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mftune=.venv/bin/mftune
step() { printf '\n== %s\n' "$*"; }

step "a tiny random-weight llama with the shipped tokenizer: runs/tiny-llama"
.venv/bin/python scripts/make_tiny_model.py runs/tiny-llama --hidden-size 128 --num-layers 4

step "mftune data validate configs/demo.yaml"
$mftune data validate configs/demo.yaml
step "mftune data inspect configs/demo.yaml --task arithmetic --index 1"
$mftune data inspect configs/demo.yaml --task arithmetic --index 1

step "mftune train configs/demo.yaml  (LoRA, loss 'task', 8 epochs)"
rm -rf runs/demo runs/demo-merged
$mftune train configs/demo.yaml

step "mftune merge runs/demo --out runs/demo-merged"
$mftune merge runs/demo --out runs/demo-merged

step "mftune eval runs/demo  (validation loss and held-out exact match per task)"
$mftune eval runs/demo --show 1
echo
echo "results: runs/demo/eval/results.json (per-sample: samples.jsonl, chart: scores.png)"
echo "plots: runs/demo/plots/tasks.png   metrics: runs/demo/metrics.jsonl   tensorboard --logdir runs/demo/tensorboard"
