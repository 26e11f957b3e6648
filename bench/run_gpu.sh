#!/usr/bin/env bash
# Every GPU measurement that docs/benchmarks.md reports, in one go (sized for well under 10 minutes on one H100),
# after the tests that only run on CUDA (fp16 grad scaler, GPU decoding and augmentation):
#   1. float32 loss/gradient parity of the naive and the default step, for the three pairs;
#   2. img/s and peak memory of naive, default and floor for the three pairs (batch 256, 224 px, bf16);
#   3. the default step under torch.compile (inductor) for ViT-S/16 -> ViT-T/16;
#   4. profiles of the default and the compiled step of that pair (where the time goes);
#   5. the input pipeline: PIL workers vs GPU decoding, 4,096 ImageNet-sized JPEGs, batch 256.
# JSON rows go to bench/results/<date>-<gpu>[-compile|-data].json; the printed output to LOG_DIR.
#
#   bench/run_gpu.sh [LOG_DIR]        (default LOG_DIR: bench/results/logs-<date>-<gpu>)
#
# PYTHON picks the interpreter (default python3); WORKERS the CPU workers of the input benchmark
# (default: every core).
set -uo pipefail  # one failing part does not stop the others; the exit status reports it
cd "$(dirname "$0")/.." || exit
failed=0
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
tag="$(date +%F)-$("$python" -c 'import sys, torch
sys.path.insert(0, "bench")
from bench_step import device_name, slug
print(slug(device_name(torch.device("cuda"))))')"
logs=${1:-bench/results/logs-$tag}
workers=${WORKERS:-$(nproc)}
mkdir -p "$logs"
"$python" -c 'import torch, transformers; print(torch.cuda.get_device_name(), torch.__version__, transformers.__version__)' \
    | tee "$logs/versions.txt"
"$python" -m pytest -q -rs tests/test_trainer.py tests/test_gpu_augment.py 2>&1 | tee "$logs/cuda-tests.txt" || failed=1
"$python" bench/bench_step.py --check_loss --modes naive,default,floor --json "bench/results/$tag.json" \
    2>&1 | tee "$logs/step.txt" || failed=1
"$python" bench/bench_step.py --pairs s16-t16 --modes default+compile --json "bench/results/$tag-compile.json" \
    2>&1 | tee "$logs/step-compile.txt" || failed=1
for mode in default default+compile; do
    "$python" bench/bench_step.py --pairs s16-t16 --profile "$mode" --no_json 2>&1 | tee "$logs/profile-${mode/+/-}.txt" || failed=1
done
"$python" bench/bench_data.py --num_images 4096 --batch_size 256 --num_workers "$workers" \
    --json "bench/results/$tag-data.json" 2>&1 | tee "$logs/data.txt" || failed=1
exit $failed
