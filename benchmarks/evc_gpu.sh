#!/usr/bin/env bash
# EVC on a GPU in one go: the CUDA tests, `evc bench` for EVC_SS/MM/LL at 768x512 and 1920x1080 (fp32, fp16, bf16,
# CUDA graphs), the fp16/bf16 precision study on a folder of images, and a GPU-encoded stream for a CPU decode check.
#
#   benchmarks/evc_gpu.sh OUT_DIR [IMAGES_DIR] [MODEL]      (defaults: ../shared/data/kodak, random:mini_EVC_SS)
#
# Every step has its own time limit and the script skips what is left once DEADLINE_S (default 420) seconds have
# passed, so a short GPU lease always gets the most important numbers first. Logs and JSON go to OUT_DIR; the JSON
# files are also packed into OUT_DIR/json.tar. Set DEVICE=cpu and SMALL=1 to dry-run the script on a CPU machine.
# SET=compile runs a shorter set instead: the CUDA tests, fp32 reference vs fast at the first size for EVC_SS and
# EVC_LL, then `--compile` (fp32 against the reference, fp16 alone, fp16 + CUDA graphs for comparison).
# Needs the installed package (make setup; PYTHON=.venv/bin/python); run it from the repository root.
set -u
OUT=${1:?usage: benchmarks/evc_gpu.sh OUT_DIR [IMAGES_DIR] [MODEL]}
IMAGES=${2:-../shared/data/kodak}
if [[ "${SET:-full}" != compile ]] && ! compgen -G "$IMAGES/*.png" > /dev/null; then  # fail before any GPU time
    echo "benchmarks/evc_gpu.sh: no PNG images in $IMAGES (pass a folder of PNGs as IMAGES_DIR)" >&2; exit 2
fi
MODEL=${3:-random:mini_EVC_SS}
DEVICE=${DEVICE:-cuda}
DEADLINE_S=${DEADLINE_S:-420}
PY=${PYTHON:-python3}
mkdir -p "$OUT/json"
export PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
START=$(date +%s)

step() {  # step NAME LIMIT_S CMD...: run CMD under a time limit unless the deadline has passed; log its status
    local name=$1 limit=$2; shift 2
    local now=$(( $(date +%s) - START ))
    if (( now > DEADLINE_S )); then echo "== $name: skipped (deadline, ${now}s)" | tee -a "$LOG"; return; fi
    echo "== $name (t=${now}s, limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -n 40
    echo "== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - START - now ))s" | tee -a "$LOG"
}

if [[ "${SMALL:-0}" == 1 ]]; then SIZES=(64x64); ARCHS=(mini_EVC_SS); RUNS=2; LIMIT_IMG=2
else SIZES=(768x512 1920x1080); ARCHS=(EVC_SS EVC_MM EVC_LL); RUNS=10; LIMIT_IMG=24; fi

step env 60 $PY -c "import torch, platform; print(platform.python_version(), torch.__version__, torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
[[ "$DEVICE" == cuda* ]] && step tests 180 $PY -m pytest -q -p no:cacheprovider tests/evc/test_evc_fast.py -k cuda -rs

bench() {  # bench TAG ARGS...
    local tag=$1; shift
    step "bench $tag" 150 $PY -m maskdecay_examples.evc bench --device "$DEVICE" --runs "$RUNS" --warmup 2 --json "$OUT/json/bench_$tag.json" "$@"
}
if [[ "${SET:-full}" == compile ]]; then
    for arch in "${ARCHS[0]}" "${ARCHS[-1]}"; do bench "${arch}_${SIZES[0]}_fp32" --arch "$arch" --size "${SIZES[0]}"; done
    step "bench compile fp32" 240 $PY -m maskdecay_examples.evc bench --device "$DEVICE" --runs "$RUNS" --warmup 2 --arch "${ARCHS[0]}" \
        --size "${SIZES[0]}" --compile --json "$OUT/json/bench_${ARCHS[0]}_${SIZES[0]}_fp32_compile.json"
    [[ "$DEVICE" == cuda* ]] && for extra in "--compile" "--cuda-graphs"; do
        bench "${ARCHS[0]}_${SIZES[0]}_fp16${extra/--/_}" --arch "${ARCHS[0]}" --size "${SIZES[0]}" --dtype fp16 \
            $extra --no-reference
    done
    tar -C "$OUT" -cf "$OUT/json.tar" json && rm -r "$OUT/json"
    echo "== done in $(( $(date +%s) - START ))s" | tee -a "$LOG"
    exit 0
fi
# fp32: reference and fast path interleaved (the speed-up and the identical-stream check), then the reduced
# precisions and CUDA graphs on the fast path alone.
for size in "${SIZES[@]}"; do
    for arch in "${ARCHS[@]}"; do
        bench "${arch}_${size}_fp32" --arch "$arch" --size "$size"
        [[ "$DEVICE" == cuda* ]] && bench "${arch}_${size}_fp16_graphs" --arch "$arch" --size "$size" --dtype fp16 \
            --cuda-graphs --no-reference
    done
    if [[ "$size" == "${SIZES[0]}" ]]; then
        step precision 240 $PY -m maskdecay_examples.evc.cli.precision --dataset "$IMAGES" --model "$MODEL" --device "$DEVICE" \
            --limit "$LIMIT_IMG" --json "$OUT/json/precision.json"
        first=$(ls "$IMAGES"/*.png | head -n 1)
        step "encode on $DEVICE" 60 $PY -m maskdecay_examples.evc encode "$first" "$OUT/gpu.evc" --model "$MODEL" --device "$DEVICE" \
            --rate-index 3
        step "decode on $DEVICE" 60 $PY -m maskdecay_examples.evc decode "$OUT/gpu.evc" "$OUT/gpu_decoded.png" --model "$MODEL" \
            --device "$DEVICE"
    fi
done
for arch in "${ARCHS[@]}"; do
    [[ "$DEVICE" == cuda* ]] && bench "${arch}_${SIZES[0]}_bf16_graphs" --arch "$arch" --size "${SIZES[0]}" \
        --dtype bf16 --cuda-graphs --no-reference
done
tar -C "$OUT" -cf "$OUT/json.tar" json && rm -r "$OUT/json"
echo "== done in $(( $(date +%s) - START ))s" | tee -a "$LOG"
