#!/usr/bin/env bash
# One GPU session's evidence in one command, within a time budget (benchmarks/gpu_session.py says what):
#
#   bash benchmarks/gpu_session.sh              # on a GPU machine: ~8 minutes, report under $OUT
#   bash benchmarks/gpu_session.sh --smoke      # the same sequence on a CPU with tiny shapes
#
# On a machine without a package index, the wheels that scripts/fetch_gpu_wheels.sh put in .whl/ are
# installed first, into a folder of their own put in front of PYTHONPATH (the machine's own packages stay).
# mftune runs from this checkout's src/ when it is not installed. Extra flags go to gpu_session.py
# (--budget SECONDS, --out DIR, --workdir DIR); MFTUNE_COMMIT names the commit where git cannot.
set -uo pipefail
SECONDS=0
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && python=.venv/bin/python

smoke=
for arg in "$@"; do [ "$arg" = --smoke ] && smoke=1; done
wheels=(.whl/*.whl)
if [ -n "$smoke" ]; then
  echo "== wheels: not installed under --smoke (they are built for the GPU machine's Python)"
elif [ -e "${wheels[0]}" ]; then
  site=${MFTUNE_WHEEL_SITE:-/tmp/mftune-wheels}
  echo "== wheels: installing ${#wheels[@]} from .whl/ into $site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "${wheels[@]}" || echo "wheel install failed: the parts that need them will say what is missing"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "== wheels: no .whl/ folder, using the packages installed here"
fi
"$python" -c "import mftune" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" benchmarks/gpu_session.py --elapsed="$SECONDS" "$@"
