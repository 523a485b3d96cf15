#!/usr/bin/env bash
# The whole GPU measurement as one command: install the wheels (install.sh), then run every
# part (run_gpu.py) under its budget. On the GPU machine, from the repo root, .whl carried:
#
#   bash bench/gpu/run.sh                    # writes into $OUT (the device tool's folder)
#   bash bench/gpu/run.sh [DIR] [run_gpu.py options, e.g. --budget 300 --only cache,distill]
#
# PYTHON (default python3) and WHL may be overridden, as for install.sh.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then  # a first argument that is not an option: the folder
    OUT=$1
    shift
fi
OUT=${OUT:?give an output folder or set OUT}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
t0=$(date +%s)
if bash "$REPO/bench/gpu/install.sh" "$SITE" > "$OUT/install.txt" 2>&1; then
    echo "install: ok ($(( $(date +%s) - t0 )) s, log in install.txt)"
else
    echo "install: FAILED or incomplete ($(( $(date +%s) - t0 )) s); going on, see install.txt:"
    grep -E "^(FAIL|error)" "$OUT/install.txt" | head -20
fi
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HIERDCTL_NO_PROGRESS=1
export MPLCONFIGDIR=${MPLCONFIGDIR:-/tmp/hierdctl-mpl}  # matplotlib's font cache, built once for every part
export GPU_RUN_COMMAND="bash bench/gpu/run.sh${*:+ $*}"
cd "$REPO" && exec "$PY" bench/gpu/run_gpu.py --out "$OUT" "$@"
