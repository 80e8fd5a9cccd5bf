#!/usr/bin/env bash
# Everything a lent GPU machine (one H200, no network) should run, in one call of the device tool:
#   run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=580)
# It installs the carried wheels (.whl/, see bench/README.md), prints the versions, then runs,
# each under its own limit:
#   1. bench/gpu_step3.py                 OPT-1.3B + OPT-350M step 3, dynamic KV cache -> gpu_step3.json
#   2. bench/gpu_step3.py --cache static  the same with the compiled decode step        -> gpu_step3_static.json
#   3. pytest -m gpu tests/test_gpu.py    every stage of the demo on CUDA in bf16
#   4. bench/memory.py --gpu              the planner's memory model vs torch's peak    -> memory_gpu.json
# Everything printed also goes to $OUT/device_check.log (6 files come back in all). Exits non-zero
# if any part failed. Record afterwards, here:
#   python bench/gpu_step3.py --record <files_at>/gpu_step3.json   (and gpu_step3_static.json)
set -uo pipefail
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
tee_pid=$!
export PYTHONUNBUFFERED=1 PIPELINE_PROGRESS=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY'
import importlib.metadata as m
for name in ("torch", "transformers", "peft", "accelerate", "deepspeed", "hydra-core", "omegaconf", "datasets",
             "pyarrow", "fsspec", "numpy"):
    try:
        print(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name} MISSING")
PY

failed=()
part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s) ==="
    timeout "$limit" "$@" || { echo "=== $name FAILED (exit $?) ==="; failed+=("$name"); }
}
part gpu_step3 190 python3 bench/gpu_step3.py --out "$OUT"
part gpu_step3_static 190 python3 bench/gpu_step3.py --out "$OUT" --cache static --steps 2
part pytest_gpu 100 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
part memory_gpu 60 python3 bench/memory.py --gpu --json "$OUT/memory_gpu.json"
echo "failed: ${failed[*]:-none}"
status=$(( ${#failed[@]} > 0 ))
exec 1>&- 2>&-
wait "$tee_pid"  # the log is complete before the call returns
exit "$status"
