#!/usr/bin/env bash
# Create .venv (if missing) and install mftune into it with its development extras.
#
# PyTorch is installed first, so pip never pulls a build the machine cannot use:
#   - already importable in .venv: kept as it is (a CUDA build you installed stays);
#   - MFTUNE_TORCH set: installed as given, e.g. MFTUNE_TORCH="torch==2.11.0";
#   - a GPU visible (nvidia-smi): the default PyPI build, which carries CUDA;
#   - otherwise: torch==2.13.0, the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${MFTUNE_TORCH:-}" ]; then
    # shellcheck disable=SC2086
    "${pip[@]}" install $MFTUNE_TORCH
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" install torch
  else
    "${pip[@]}" install torch==2.13.0
  fi
fi
"${pip[@]}" install -e ".[dev]"
echo "mftune installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
