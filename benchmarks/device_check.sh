#!/usr/bin/env bash
# One run on a lent GPU machine, under 6 minutes on an H100: the GPU tests, then benchmarks/gpu_bench.py --quick.
# Everything it prints lands in $OUT (the device tool's folder) or, elsewhere, in benchmarks/results/.
#
# The device image has torch, triton, transformers, tokenizers, safetensors, httpx and pytest; phi4 also needs
# llguidance, carried as a wheel in .whl/ (ignored by git). Fetch it here, once, before the run:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl llguidance
# and call the device tool with carry [".whl"] and command `bash benchmarks/device_check.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${OUT:-benchmarks/results}
mkdir -p "$results"
export PYTHONPATH=$PWD/src PHI4_CACHE=/tmp/phi4-cache PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$results/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$results/device.txt"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py tests/test_triton_kernels.py 2>&1 \
    | tee "$results/gpu_tests.txt"
timeout 330 python3 benchmarks/gpu_bench.py --quick --output "$results/gpu_bench_h100.json" 2>&1 \
    | tee "$results/gpu_bench_log.txt"
