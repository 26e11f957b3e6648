#!/usr/bin/env bash
# Every GPU measurement that docs/benchmarks.md reports, in one go (sized for well under 10 minutes on one H100),
# after the tests that only run on CUDA (fp16 grad scaler, GPU decoding):
#   1. float32 loss/gradient parity of the naive and the default step, for every pair (the paper's three
#      and DINOv3 ViT-B/16 -> ViT-S/16);
#   2. img/s and peak memory of naive, default and floor for every pair (batch 256, 224 px, bf16);
#   3. the default step under torch.compile (inductor) for ViT-S/16 -> ViT-T/16;
#   4. profiles of the default and the compiled step of that pair (where the time goes);
#   5. one run with 1, 2, 3 students of one teacher against one run per student (ViT-S/16 -> ViT-T/16,
#      batch 128, bf16), with peak memory;
#   6. the input pipeline on 4,096 ImageNet-sized JPEGs, batch 256: PIL workers (1, 4 and every core, to
#      show how they scale) and GPU decoding;
#   7. the large teacher's memory: a DINOv3 ViT-7B/16 (random weights) in float32 and bfloat16, replicated
#      and sharded with FSDP2 over one process, with peak memory and img/s of its teacher step (batch 16,
#      224 px; sized for about a minute and a half);
#   8. a distillation epoch from a teacher-target cache against the online teacher, per pair (512 JPEGs,
#      batch 64, 224 px; the caching timed too);
#   9. bench/report.py: the tables and every target checked, as Markdown.
# Each stage prints how long it took, so the next run can be sized.
#
#   bench/run_gpu.sh [RESULTS_DIR]      (default bench/results)
#
# Writes RESULTS_DIR/<date>-<device>{,-compile,-students,-data,-teacher,-cache}.json, and the printed output plus
# report.md under RESULTS_DIR/logs-<date>-<device>/. PYTHON picks the interpreter (default python3);
# WORKERS the largest worker count of the input benchmark (default: every core). REHEARSAL=1 runs the same
# stages on the CPU with tiny models and a few small images, to check the script itself where no GPU is at
# hand.
set -uo pipefail  # one failing stage does not stop the others; the exit status reports it
cd "$(dirname "$0")/.." || exit
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
results=${1:-bench/results}
workers=${WORKERS:-$(nproc)}
if [ "${REHEARSAL:-0}" = 1 ]; then
    device=cpu
    step_args=(--device cpu --tiny --threads 1 --batch_size 2 --image_size 32 --warmup 1 --steps 1 --check_batch 2)
    compile_args=(--compile_backend aot_eager)
    data_args=(--device cpu --num_images 8 --width 64 --height 48 --image_size 16 --batch_size 4 --warmup_epochs 0)
    students_args=(--sizes tiny --threads 1 --warmup 0 --steps 1)
    teacher_args=(--teacher tiny --device cpu --ranks 2 --image_size 32 --batch_size 2 --warmup 0 --steps 1)
    cache_args=(--device cpu --tiny --pairs s16-t16 --num_images 8 --image_size 32 --batch_size 4)
    workers=2
else
    device=cuda
    step_args=()
    compile_args=(--compile_backend inductor)
    data_args=(--num_images 4096 --batch_size 256 --epochs 2)
    students_args=(--sizes paper --batch_size 128 --bf16 --warmup 3 --steps 10)
    # One process: NCCL takes one GPU per process (the 7B: 27 GB in float32, 13.4 GB in bfloat16).
    teacher_args=(--teacher vit7b16 --device cuda --ranks 1 --batch_size 16 --image_size 224 --warmup 1 --steps 3
        --timeout 300)
    cache_args=(--device cuda --num_images 512 --batch_size 64)
fi
tag="$(date +%F)-$("$python" -c "import sys, torch
sys.path.insert(0, 'bench')
from bench_step import device_name, slug
print(slug(device_name(torch.device('$device'))))")" || exit
logs="$results/logs-$tag"
mkdir -p "$logs"
failed=0
stage() {  # stage NAME LOG COMMAND...: run, tee to LOG, print the wall time, remember a failure
    local name=$1 log=$2 start=$SECONDS
    shift 2
    echo "== $name"
    "$@" 2>&1 | tee "$log" || failed=1
    echo "== $name: $((SECONDS - start)) s" | tee -a "$logs/stages.txt"
}
"$python" -c 'import torch, torchvision, transformers, accelerate
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(name, "torch", torch.__version__, "torchvision", torchvision.__version__,
      "transformers", transformers.__version__, "accelerate", accelerate.__version__)' | tee "$logs/versions.txt"
stage "CUDA-only tests" "$logs/cuda-tests.txt" "$python" -m pytest -q -rs \
    "tests/test_skipping.py::test_fp16_on_cuda_scales_the_loss_and_skips_a_poisoned_update" \
    "tests/test_gpu_augment.py::test_cuda_decode_matches_the_cpu_fallback"
stage "loss parity + naive/default/floor" "$logs/step.txt" "$python" bench/bench_step.py --check_loss \
    --modes naive,default,floor "${step_args[@]}" --json "$results/$tag.json"
stage "default+compile" "$logs/step-compile.txt" "$python" bench/bench_step.py --pairs s16-t16 \
    --modes default+compile "${compile_args[@]}" "${step_args[@]}" --json "$results/$tag-compile.json"
for mode in default default+compile; do
    stage "profile $mode" "$logs/profile-${mode/+/-}.txt" "$python" bench/bench_step.py --pairs s16-t16 \
        --profile "$mode" "${compile_args[@]}" "${step_args[@]}" --no_json
done
stage "several students" "$logs/students.txt" "$python" bench/bench_students.py "${students_args[@]}" \
    --json "$results/$tag-students.json"
counts=1  # worker counts 1, 4 and $workers, each once and none above $workers
for n in 4 "$workers"; do [ "$n" -gt "${counts##*,}" ] && [ "$n" -le "$workers" ] && counts+=",$n"; done
stage "input pipeline" "$logs/data.txt" "$python" bench/bench_data.py --num_workers "$counts" \
    "${data_args[@]}" --json "$results/$tag-data.json"
stage "large teacher memory" "$logs/teacher.txt" "$python" bench/bench_teacher_memory.py "${teacher_args[@]}" \
    --json "$results/$tag-teacher.json"
stage "teacher-target cache" "$logs/cache.txt" "$python" bench/bench_cache.py "${cache_args[@]}" \
    --json "$results/$tag-cache.json"
stage "report" "$logs/report-stdout.txt" "$python" bench/report.py --output "$logs/report.md" \
    "$results/$tag.json" "$results/$tag-compile.json" "$results/$tag-data.json"
exit $failed
