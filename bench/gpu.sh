#!/usr/bin/env bash
# The GPU figures of issues 11, 12 and 15 in one run (real M3 shapes, random weights, bf16), for a session lent a GPU.
# The device machine lacks transformers >= 5.24, pydicom and nibabel (shared/gpu/README.md): download their wheels here
# (`pip download --no-deps -d .whl transformers==5.25.0 tokenizers huggingface_hub pydicom nibabel torchao==0.18.0
# prometheus_client ...`), carry `.whl`, and run there:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:src \
#       OUT=$OUT bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")"
out=${OUT:-/tmp/gpu-bench}
mkdir -p "$out"
run() { echo "== $*" | tee -a "$out/gpu.txt"; timeout 900 python "$@" 2>&1 | grep -v "Loading weights" | tee -a "$out/gpu.txt"; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
run decode.py --device cuda --variant m3 --dtype bfloat16 --batch 1 32 --prompt-tokens 640 --new-tokens 128 --repeats 2
run generate_image.py --device cuda --variant m3 --dtype bfloat16 --batches 1 8
run fused_router.py --device cuda
run quantize.py --device cuda --variant m3
