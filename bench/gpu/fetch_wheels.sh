#!/usr/bin/env bash
# Download every wheel of bench/gpu/wheels.txt into .whl/ (git-ignored), for the GPU
# machine's python3 3.12 on x86-64 Linux; remove any other wheel there; print the sizes.
#
#   bash bench/gpu/fetch_wheels.sh                 # .whl/, cp312
#   PYVER=3.11 WHL=/tmp/whl311 bash bench/gpu/fetch_wheels.sh   # a set for a local 3.11 rehearsal
#
# Needs a package registry (here, not on the GPU machine). --no-deps: wheels.txt names
# every dependency itself.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
LIST="$REPO/bench/gpu/wheels.txt"
WHL=${WHL:-$REPO/.whl}
PYVER=${PYVER:-3.12}
PY=${PYTHON:-python3}
mkdir -p "$WHL"

# A wheel file's distribution name, normalised (PEP 503/427): lower case, runs of -_. -> _
norm() { echo "$1" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g'; }

specs=$(grep -vE '^\s*(#|$)' "$LIST" | awk '$3 != "present" {print $1}')
keep=""
for spec in $specs; do
    name=${spec%%==*}
    version=${spec##*==}
    plats=""
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        plats="$plats --platform $p"
    done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        $plats -d "$WHL" "$spec"
    keep="$keep $(norm "$name")-$version"
done

# Keep one version of each: drop every wheel that the list does not name.
for f in "$WHL"/*.whl; do
    base=$(basename "$f")
    id="$(norm "${base%%-*}")-$(echo "$base" | cut -d- -f2)"
    case " $keep " in
        *" $id "*) ;;
        *) echo "removing $base (not in wheels.txt)"; rm -f "$f" ;;
    esac
done

n=$(ls "$WHL"/*.whl | wc -l)
echo "$n wheels in $WHL (python $PYVER):"
ls -S -l "$WHL"/*.whl | awk '{printf "  %8.2f MB  %s\n", $5 / 1e6, $9}' | sed "s#$WHL/##"
du -cb "$WHL"/*.whl | tail -1 | awk '{printf "total %.1f MB\n", $1 / 1e6}'
# What the device run carries: the working tree (tracked + untracked, not ignored) and .whl.
tree=$(cd "$REPO" && git ls-files -z -co --exclude-standard | xargs -0 du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s}')
wheels=$(du -cb "$WHL"/*.whl | tail -1 | cut -f1)
awk -v t="$tree" -v w="$wheels" 'BEGIN {printf "working tree %.1f MB + wheels %.1f MB = %.1f MB of the 64 MiB (%.1f MB) a device run carries\n", t / 1e6, w / 1e6, (t + w) / 1e6, 64 * 1048576 / 1e6}'
