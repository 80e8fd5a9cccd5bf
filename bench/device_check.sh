#!/usr/bin/env bash
# Everything a lent GPU machine (one H200, no network) should run, in one call of the device tool:
#   run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=560)
# It installs the carried wheels (.whl/, see bench/README.md), then runs, each under its own limit:
#   1. bench/gpu_step3.py   OPT-1.3B + OPT-350M step 3: roofline, MFU, s/step  -> $OUT/gpu_step3.json
#   2. pytest -m gpu         every stage of the demo on CUDA in bf16             -> $OUT/pytest_gpu.log
#   3. bench/memory.py --gpu the planner's memory model vs torch's peak          -> $OUT/memory_gpu.json
# and exits non-zero if any of them failed. Record afterwards, here:
#   python bench/gpu_step3.py --record <files_at>/gpu_step3.json
set -uo pipefail
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PIPELINE_PROGRESS=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD

{
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
} 2>&1 | tee "$OUT/versions.txt"

failed=()
timeout 330 python3 bench/gpu_step3.py --out "$OUT" 2>&1 | tee "$OUT/gpu_step3.log" || failed+=(gpu_step3)
timeout 120 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" \
    || failed+=(pytest_gpu)
timeout 90 python3 bench/memory.py --gpu --json "$OUT/memory_gpu.json" 2>&1 | tee "$OUT/memory_gpu.log" \
    || failed+=(memory_gpu)
echo "failed: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
