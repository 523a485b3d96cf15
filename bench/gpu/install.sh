#!/usr/bin/env bash
# On the GPU machine (no network): install the wheels of bench/gpu/wheels.txt from .whl/
# into a scratch site-packages, make the repo importable as the `hierdctl` package, and
# check every import hierdctl needs. run.sh calls it; by hand:
#
#   bash bench/gpu/install.sh [SITE]            # SITE defaults to /tmp/site
#   export PYTHONPATH=SITE:REPO
#
# PYTHON (default python3) and WHL (default REPO/.whl) may be overridden, e.g. for a
# rehearsal with a local venv and a wheel set fetched with PYVER=3.11.
#
# hierdctl itself is the repo, not a wheel: pyproject.toml installs the top-level stages/
# folder as hierdctl.stages, which a plain checkout on PYTHONPATH lacks. A symlink
# hierdctl/stages -> ../stages gives the checkout that same layout, so `import
# hierdctl.stages` works however the repo lands on sys.path (PYTHONPATH, the current
# folder of `python -m pytest`, or bench scripts that insert the repo root).
#
# Exit status: 0 when every import works, 1 otherwise (the list says which failed).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
SITE=${1:-/tmp/site}
PY=${PYTHON:-python3}
WHL=${WHL:-$REPO/.whl}
LIST=$REPO/bench/gpu/wheels.txt

norm() { echo "$1" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g'; }

find_wheel() {  # NAME VERSION -> the path of its wheel in $WHL, or nothing
    local want f base
    want="$(norm "$1")-$2"
    for f in "$WHL"/*.whl; do
        base=$(basename "$f")
        if [ "$(norm "${base%%-*}")-$(echo "$base" | cut -d- -f2)" = "$want" ]; then
            echo "$f"
            return
        fi
    done
}

echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
if [ ! -d "$WHL" ]; then
    echo "error: no wheel folder $WHL: run bench/gpu/fetch_wheels.sh where a registry is reachable and carry .whl"
    exit 1
fi

files=()
missing_wheels=0
while read -r spec mod when _; do
    case "$spec" in '' | '#'*) continue ;; esac
    [ "$when" = present ] && continue
    if [ "$when" = missing ] && env -u PYTHONPATH "$PY" -c "import $mod" 2>/dev/null; then
        echo "kept     $mod: the machine has it ($spec not installed)"
        continue
    fi
    f=$(find_wheel "${spec%%==*}" "${spec##*==}")
    if [ -z "$f" ]; then
        echo "error: no wheel for $spec in $WHL"
        missing_wheels=1
        continue
    fi
    echo "install  $(basename "$f")"
    files+=("$f")
done < "$LIST"

rm -rf "$SITE"
mkdir -p "$SITE"
if [ ${#files[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${files[@]}" \
        || { echo "error: pip install failed"; exit 1; }
fi

if [ -L "$REPO/hierdctl/stages" ] || [ -e "$REPO/hierdctl/stages" ]; then
    echo "hierdctl/stages exists: $(ls -ld "$REPO/hierdctl/stages" | awk '{print $NF}')"
else
    ln -s ../stages "$REPO/hierdctl/stages" && echo "linked   hierdctl/stages -> ../stages"
fi

# Every import of wheels.txt, then hierdctl's own modules, with the path each comes from.
mods=$(grep -vE '^\s*(#|$)' "$LIST" | awk '{print $2}' | tr '\n' ' ')
PYTHONPATH="$SITE:$REPO" "$PY" - $mods <<'EOF'
import importlib, sys

failed = []
for name in sys.argv[1:] + ["torchvision.ops", "hierdctl.cli", "hierdctl.stages.cache_teacher", "hierdctl.stages.distill",
                            "hierdctl.stages.eval_retrieval"]:
    try:
        m = importlib.import_module(name)
        print(f"ok       {name} {getattr(m, '__version__', '')} ({(getattr(m, '__file__', '') or '').rsplit('/', 2)[0]})")
    except Exception as e:  # noqa: BLE001 - report every failure, then exit 1
        failed.append(name)
        print(f"FAIL     {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
import torch

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
try:
    import faiss

    print(f"faiss {faiss.__version__}: {faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0} GPUs visible")
except Exception:
    pass
print("imports: all ok" if not failed else f"imports FAILED: {' '.join(failed)}")
sys.exit(1 if failed else 0)
EOF
status=$?
echo "export PYTHONPATH=$SITE:$REPO"
[ $status -eq 0 ] && [ $missing_wheels -eq 0 ]
