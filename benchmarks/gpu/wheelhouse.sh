#!/usr/bin/env bash
# Fill benchmarks/gpu/wheels/ with the pure-Python wheels of packages.txt, at the versions in
# constraints.txt, for run.sh to install on a GPU machine that has no network. Run it here (PyPI
# reachable); the folder is ignored by git, so the device call carries it (carry: benchmarks/gpu/wheels).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
py=${PYTHON:-python3}
[ -x "$root/.venv/bin/python" ] && py=${PYTHON:-$root/.venv/bin/python}
rm -rf "$here/wheels"
mkdir -p "$here/wheels"
specs=()
while read -r module dist; do
  case "$module" in ''|'#'*) continue ;; esac
  pin=$(grep -i -E "^${dist//-/[-_]}==" "$root/constraints.txt" || true)
  specs+=("${pin:-$dist}")
done < "$here/packages.txt"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform any \
  --implementation py -d "$here/wheels" "${specs[@]}"
ls "$here/wheels"
