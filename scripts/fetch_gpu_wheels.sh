#!/usr/bin/env bash
# Fill .whl/ with the wheels of benchmarks/gpu-wheels.txt, for a GPU machine that has no package index
# (benchmarks/gpu_session.sh installs them there). Run it where PyPI is reachable:
#
#   bash scripts/fetch_gpu_wheels.sh            # CPython 3.12 on x86-64 Linux
#   MFTUNE_WHEEL_PYTHON=3.11 bash scripts/fetch_gpu_wheels.sh .whl
#
# DeepSpeed has no wheel on PyPI: it is built here as a pure-Python wheel, its ops compiled on first use.
# The total must stay under MFTUNE_WHEEL_LIMIT_MIB (default 56), so that wheels and checkout together
# fit the 64 MiB that travels to such a machine.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
limit_mib=${MFTUNE_WHEEL_LIMIT_MIB:-56}
pyver=${MFTUNE_WHEEL_PYTHON:-3.12}
python=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && python=.venv/bin/python
pip=("$python" -m pip --disable-pip-version-check -q)

pins=$(sed 's/#.*//; /^[[:space:]]*$/d; s/[[:space:]]//g' benchmarks/gpu-wheels.txt)
deepspeed=$(grep '^deepspeed==' <<<"$pins")
platforms=()
for tag in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 \
  manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  platforms+=(--platform "${tag}_x86_64")
done

mkdir -p "$dest"
rm -f "$dest"/*.whl
# shellcheck disable=SC2046
"${pip[@]}" download --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${platforms[@]}" -d "$dest" $(grep -v '^deepspeed==' <<<"$pins")
# Building DeepSpeed imports torch: use an environment that has it (the .venv of scripts/setup.sh).
"${pip[@]}" wheel --no-deps --no-build-isolation -w "$dest" "$deepspeed"

ls -l "$dest"/*.whl | awk '{printf "%8.1f MiB  %s\n", $5 / 1048576, $NF}'
total=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
wanted=$(wc -l <<<"$pins")
found=$(ls "$dest"/*.whl | wc -l)
awk -v n="$found" -v pins="$wanted" -v bytes="$total" -v limit="$limit_mib" \
  'BEGIN { printf "%d wheels (%d pinned), %.1f MiB in all (limit %d MiB)\n", n, pins, bytes / 1048576, limit }'
if [ "$found" -ne "$wanted" ]; then
  echo "expected one wheel per pin in benchmarks/gpu-wheels.txt" >&2
  exit 1
fi
if [ "$total" -gt $((limit_mib * 1048576)) ]; then
  echo "over the limit: carry fewer wheels or raise MFTUNE_WHEEL_LIMIT_MIB" >&2
  exit 1
fi
