#!/usr/bin/env bash
# One run on a lent GPU machine, under 6 minutes on an H100: the GPU tests, then benchmarks/gpu_bench.py --quick.
# Everything it prints lands in $OUT (the device tool's folder) or, elsewhere, in benchmarks/results/.
#
# The device image has torch, triton, transformers, tokenizers, safetensors, httpx and pytest; phi4 also needs
# llguidance, carried as a wheel in .whl/ (ignored by git). Before the run, on the dev machine:
#   bash benchmarks/device_prepare.sh
# then call the device tool with carry [".whl"] and command `bash benchmarks/device_check.sh`.
# It checks its environment first and stops with one line naming what is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${OUT:-benchmarks/results}
mkdir -p "$results"
export PYTHONPATH=$PWD/src PHI4_CACHE=/tmp/phi4-cache PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
python3 - <<'PY' 2>&1 | tee "$results/environment.txt" || { echo "device_check: the environment is incomplete (see above); run benchmarks/device_prepare.sh and carry .whl"; exit 1; }
import importlib, sys
missing = []
for name in ("torch", "triton", "transformers", "tokenizers", "safetensors", "httpx", "jinja2", "numpy", "pytest",
             "llguidance"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except ImportError as exc:
        missing.append(f"{name} ({exc})")
try:
    import phi4.engine.engine  # noqa: F401 - everything the engine imports
except Exception as exc:  # noqa: BLE001
    missing.append(f"phi4 ({type(exc).__name__}: {exc})")
import torch
if not torch.cuda.is_available():
    missing.append("a CUDA device (torch.cuda.is_available() is False)")
if missing:
    print("device_check: missing: " + "; ".join(missing))
    sys.exit(1)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$results/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$results/device.txt"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py tests/test_triton_kernels.py 2>&1 \
    | tee "$results/gpu_tests.txt"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '_' | sed 's/_$//')
timeout 330 python3 benchmarks/gpu_bench.py --quick --output "$results/gpu_bench_${gpu}.json" 2>&1 \
    | tee "$results/gpu_bench_log.txt"
