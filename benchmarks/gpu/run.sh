#!/usr/bin/env bash
# The one command for a GPU machine (no network, its own Python and packages): installs, from the
# carried benchmarks/gpu/wheels/ (fill it with wheelhouse.sh first), only the pure-Python packages of
# packages.txt whose import fails there, into a folder of its own (the machine's environment is left
# as it is), then runs `flame bench gpu` in full mode under a hard 540 s limit. Figures:
# $OUT/gpu.json (rewritten after every part, so a run cut short keeps what it measured), console:
# $OUT/gpu.log. OUT defaults to bench-out/ in the checkout; extra arguments go to flame bench gpu.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root" || exit 1
py=${PYTHON:-python3}
out=${OUT:-$root/bench-out}
mkdir -p "$out"
site=${FLAME_BENCH_SITE:-/tmp/flame-bench-site}
missing=()
while read -r module dist; do
  case "$module" in ''|'#'*) continue ;; esac
  "$py" -c "import $module" 2>/dev/null || missing+=("$dist")
done < benchmarks/gpu/packages.txt
export PYTHONPATH="$root/src"
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing from benchmarks/gpu/wheels: ${missing[*]}"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    --find-links benchmarks/gpu/wheels "${missing[@]}" || { echo "run.sh: the wheels are missing: run benchmarks/gpu/wheelhouse.sh here and carry benchmarks/gpu/wheels"; exit 3; }
  export PYTHONPATH="$PYTHONPATH:$site"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$out/nvidia-smi.csv" 2>&1 || true
timeout 540 "$py" -m flame bench gpu --json "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.log"
code=${PIPESTATUS[0]}
[ "$code" = 124 ] && echo "run.sh: stopped at the 540 s limit; $out/gpu.json holds the parts that finished" | tee -a "$out/gpu.log"
exit "$code"
