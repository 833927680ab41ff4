#!/usr/bin/env bash
# Download into .whl/ the wheels (CPython 3.12, manylinux x86_64) of every dependency the GPU machine's image lacks,
# for scripts/gpu/check.sh to install there (it cannot reach a package index). Run here, on a machine with pip and
# network access, from any directory; pass a Python (default: the project's .venv, whose installed versions are
# the ones pinned) as PYTHON=... The missing set is computed by scripts/gpu/wheels.py. Exits 1 above 60 MiB.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    for candidate in "$root/.venv/bin/python" "$(git -C "$root" rev-parse --path-format=absolute --git-common-dir 2>/dev/null)/../.venv/bin/python" python3; do
        if [[ -x "$candidate" ]] || command -v "$candidate" >/dev/null 2>&1; then py="$candidate"; break; fi
    done
fi
rm -rf "$root/.whl"
exec "$py" "$root/scripts/gpu/wheels.py" --dest "$root/.whl" "$@"
