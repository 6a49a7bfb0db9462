#!/usr/bin/env bash
# The GPU proof in one command (bench/gpu_check.py: the equivalence tests on the device, the
# self-check, throughput and MFU, bf16 against fp32; one JSON file), for a GPU machine as it is:
# its own python3 with torch, transformers, pyarrow and pytest, and no network. What ln-ray needs
# beyond those travels as wheels in .whl/ (`make gpu-wheels` downloads them for Python 3.12;
# WHEELS=folder names another), installed into a temporary folder for this run only: the
# machine's own packages are never touched.
#
#   bash scripts/gpu_check.sh --out /some/where/gpu.json      # on the GPU machine
#   bash scripts/gpu_check.sh --device cpu --quick --out x.json   # the dry run, anywhere
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
    --target "$site" "$wheels"/*.whl ||
    echo "gpu_check: the wheels in $wheels/ do not install on $("$python" -V); going on without them"
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$python" -m bench.gpu_check "$@"
