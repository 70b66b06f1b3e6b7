#!/usr/bin/env bash
# The mftune demo, on CPU in a few minutes: set up, build a tiny model, check the data, fine-tune it on
# four tasks at once, merge the adapter, and answer held-out prompts of every task.
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
rm -rf runs/demo
$mftune train configs/demo.yaml

step "mftune merge runs/demo --out runs/demo-merged"
$mftune merge runs/demo --out runs/demo-merged

step "mftune generate runs/demo-merged on the held-out prompts of every task"
cat examples/heldout/*.jsonl > runs/heldout.jsonl
$mftune generate runs/demo-merged --input runs/heldout.jsonl --output runs/heldout-answers.jsonl --max-new-tokens 32

step "what the demo learned"
.venv/bin/python scripts/demo_report.py runs/demo runs/heldout-answers.jsonl
echo
echo "plots: runs/demo/plots/tasks.png   metrics: runs/demo/metrics.jsonl   tensorboard --logdir runs/demo/tensorboard"
