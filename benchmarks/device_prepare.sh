#!/usr/bin/env bash
# Before a run on a lent GPU machine (it reaches no package registry): download, here, the wheels phi4
# needs that the GPU image lacks, for its Python (CPython 3.12, x86_64 manylinux), into .whl/ — ignored by
# git, carried to the machine by the device tool (carry [".whl"]). Then run: bash benchmarks/device_check.sh
# The GPU image has torch, triton, transformers, tokenizers, safetensors, httpx, numpy, jinja2 and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
# phi4's own imports beyond the image (the engine and the structured-output code import llguidance).
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "llguidance>=1.0"
ls -l .whl
