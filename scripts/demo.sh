#!/usr/bin/env bash
# The mftune demo, on CPU: set up, build a tiny model, then check and look at the multi-task data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mftune=.venv/bin/mftune
echo "== a tiny random-weight llama with the shipped tokenizer: runs/tiny-llama"
.venv/bin/python scripts/make_tiny_model.py runs/tiny-llama
echo "== mftune data validate configs/demo.yaml"
$mftune data validate configs/demo.yaml
echo "== mftune data inspect configs/demo.yaml --task arithmetic --index 1"
$mftune data inspect configs/demo.yaml --task arithmetic --index 1
