#!/usr/bin/env bash
# The prepared GPU check of issue 18, for a lent GPU machine (nvidia-h200: python3 3.12 with torch+CUDA,
# transformers, safetensors, numpy, pytest; no package index). Run from the repository root, with .whl/ (made
# here by scripts/gpu/wheels.sh) carried along:
#     bash scripts/gpu/check.sh                 # on the GPU machine; results under $OUT (default ./gpu-out)
#     bash scripts/gpu/check.sh --cpu-dry-run   # here: the same steps on the CPU, a tiny shape (tests the script)
# Steps: install the wheels to /tmp/site (--no-index --no-deps), PYTHONPATH=src:/tmp/site; print nvidia-smi and
# torch's view of the device (facts.txt); run the GPU tests, `pytest -m gpu tests/gpu` (pytest.log); run
# `meshinfer bench gpu` (Llama-3-8B shape, bf16 + int4, batch 1 and 32, eager + graphed: bench-gpu.json,
# bench-gpu.log), then its fused mode (compiled block step under the graph; bf16, batch 1: bench-fused.json,
# bench-fused.log); summary.txt says what passed. Sized for at most ~8.5 minutes on an H200 (each step has a
# timeout; expected far less): 7 files under $OUT.
# Exit status: 0 when every step passed, else the number of failed steps.
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
dry=0
[[ "${1:-}" == "--cpu-dry-run" ]] && dry=1
out="${OUT:-$root/gpu-out}"
mkdir -p "$out"
py="${PYTHON:-python3}"
site="/tmp/site"
if (( dry )); then
    site="$(mktemp -d)/site"
    bench_args=(--device cpu --shape tiny --layers 2 --steps 3 --warmup 1 --context 16 --peak-bandwidth 100)
    batches=1,4
    test_timeout=120 bench_timeout=120 fused_timeout=60
else
    bench_args=(--device cuda --shape llama3-8b --layers 32 --steps 20 --warmup 3 --context 256)
    batches=1,32
    test_timeout=200 bench_timeout=170 fused_timeout=120
fi
export PYTHONUNBUFFERED=1
failed=0
summary="$out/summary.txt"
: >"$summary"
step() {  # step NAME STATUS: record one step's outcome
    echo "$1: $([[ $2 == 0 ]] && echo ok || echo "FAILED ($2)")" | tee -a "$summary"
    [[ $2 == 0 ]] || failed=$((failed + 1))
}
start=$SECONDS

# 1. the missing packages, from the carried wheels
shopt -s nullglob
wheels=(.whl/*.whl)
if (( ${#wheels[@]} == 0 && ! dry )); then
    echo "no wheels under .whl/: run scripts/gpu/wheels.sh first (and carry .whl)" | tee -a "$summary"
    exit 1
fi
if (( dry )); then  # the wheels are for CPython 3.12; here only check that they are whole, and use this venv
    "$py" -c 'import sys, zipfile; [zipfile.ZipFile(w).testzip() for w in sys.argv[1:]]' "${wheels[@]}"
    step "wheels (${#wheels[@]}, checked, not installed: dry run)" $?
    export PYTHONPATH="$root/src"
else
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
    step "wheels (${#wheels[@]} installed to $site)" $?
    export PYTHONPATH="$root/src:$site"
fi

# 2. the machine and torch's view of it
{
    date -u
    nvidia-smi 2>&1 || echo "(no nvidia-smi)"
    "$py" - <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
from importlib import metadata
for name in ("transformers", "safetensors", "tokenizers", "numpy", "protobuf", "triton", "hivemind", "msgspec"):
    try:
        print(name, metadata.version(name), end="; ")
    except metadata.PackageNotFoundError:
        print(name, "MISSING", end="; ")
print()
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "capability", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1), "bf16", torch.cuda.is_bf16_supported())
from meshinfer.models.device import device_facts, device_label, peak_bandwidth, resolve_device
d = resolve_device("auto")
print("meshinfer: auto ->", d, "|", device_label(d), "| peak bandwidth", peak_bandwidth(device_label(d)), "|",
      device_facts())
import meshinfer.p2p, meshinfer.server, meshinfer.gateway  # the carried packages import
print("meshinfer imports: ok")
PY
} >"$out/facts.txt" 2>&1
step "facts" $?
cat "$out/facts.txt"

# 3. the GPU tests (they skip without CUDA: the dry run checks that they collect and skip cleanly)
timeout "$test_timeout" "$py" -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rA >"$out/pytest.log" 2>&1
status=$?
tail -25 "$out/pytest.log"
step "pytest -m gpu tests/gpu" $status

# 4. the decode benchmark: eager and graphed, both formats, both batches; then the fused mode (it compiles)
bench() {  # bench NAME TIMEOUT ARGS...
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$py" -m meshinfer.cli.main bench gpu "${bench_args[@]}" "$@" --out "$out/$name.json" --json \
        >"$out/$name.log" 2>&1
    local status=$?
    grep -E "^\s*(building|  [a-z0-9]+\.b[0-9]+\.)" "$out/$name.log" | cut -c1-400
    step "$name" $status
}
bench bench-gpu "$bench_timeout" --formats bf16,int4 --batches "$batches" --modes "eager,graphed"
bench bench-fused "$fused_timeout" --formats bf16 --batches 1 --modes fused

echo "took $((SECONDS - start)) s; failed steps: $failed" | tee -a "$summary"
exit "$failed"
