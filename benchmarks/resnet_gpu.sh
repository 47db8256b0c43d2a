#!/usr/bin/env bash
# ResNet-56 pruning on one GPU within a short lease (examples/resnet/configs/resnet56_gpu.yaml), in two calls:
#
#   benchmarks/resnet_gpu.sh start OUT_DIR   # set up, CUDA tests, start the study detached, follow it until WAIT_S
#   benchmarks/resnet_gpu.sh wait OUT_DIR    # follow it to the end (or WAIT_S), report, pack the results
#
# The study runs detached (setsid) in $WORK (default /tmp/resnet56_gpu), so it survives between the two calls and a
# command limit shorter than the run; it resumes from its last epoch if restarted. Inputs travel with the working
# tree: .gpudata/{train,test}.tar.gz (the CIFAR-10 tars, gzipped: `make gpu-prep`) and .whl/ (the wheels the GPU
# machine lacks, e.g. torch-pruning). OUT_DIR gets log.txt, study.log and results.tgz (teacher, students, JSON,
# report, plots). DEVICE=cpu SMALL=1 dry-runs the whole thing on a CPU at a tiny scale.
set -u
MODE=${1:?usage: benchmarks/resnet_gpu.sh start|wait OUT_DIR}
OUT=${2:?usage: benchmarks/resnet_gpu.sh start|wait OUT_DIR}
WORK=${WORK:-/tmp/resnet56_gpu}
WAIT_S=${WAIT_S:-540}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1
START=$(date +%s)
say() { echo "== $* (t=$(( $(date +%s) - START ))s)" | tee -a "$LOG"; }

setup_python() {  # wheels the machine lacks, and the two packages of this checkout, without installing it
    local site="$WORK/site"
    mkdir -p "$site"
    if compgen -G ".whl/*.whl" > /dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
            2>&1 | tail -n 3 | tee -a "$LOG"
    fi
    ln -sfn "$PWD/examples" "$site/maskdecay_examples"
    export PYTHONPATH="$site:$PWD"
}

ARGS=(--config examples/resnet/configs/resnet56_gpu.yaml --set "out=$WORK/study" --set "data.path=$WORK/cifar10"
      --set data.cache=false --set "device=$DEVICE")
if [[ "${SMALL:-0}" == 1 ]]; then
    ARGS+=(--set arch=resnet8 --set teacher.epochs=1 --set data.train_subset=2000 --set data.test_subset=500
           --set fit_minutes=6 --set threads=1 --set channels_last=false --set amp=false --set teacher.batch_size=32 --set prune.batch_size=32)
fi

running() { [[ -f "$WORK/pid" ]] && kill -0 "$(cat "$WORK/pid")" 2> /dev/null; }

follow() {  # until the study ends or WAIT_S passes
    while running && (( $(date +%s) - START < WAIT_S )); do sleep 10; done
    cp "$WORK/study.log" "$OUT/study.log" 2> /dev/null
    tail -n 5 "$WORK/study.log" | tee -a "$LOG"
}

pack() {
    local d="$WORK/study"
    [[ -d "$d" ]] || { say "no results yet"; return; }
    (cd "$d" && tar czf "$OUT/results.tgz" --exclude='state' --exclude='cut.pt' --exclude='cache' .)
    say "packed $(du -h "$OUT/results.tgz" | cut -f1) of results"
}

setup_python
case "$MODE" in
start)
    say "env"
    $PY -c "import torch, torch_pruning, platform; print(platform.python_version(), torch.__version__,
torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')" 2>&1 | tee -a "$LOG"
    mkdir -p "$WORK/cifar10"
    for s in train test; do gunzip -c ".gpudata/$s.tar.gz" > "$WORK/cifar10/$s.tar" || exit 2; done
    say "data unpacked"
    if [[ "$DEVICE" == cuda ]]; then
        timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_decay.py -k synchronise 2>&1 | tail -n 3 | tee -a "$LOG"
        say "CUDA tests"
    fi
    setsid nohup $PY -m maskdecay_examples.resnet study "${ARGS[@]}" > "$WORK/study.log" 2>&1 < /dev/null &
    echo $! > "$WORK/pid"
    say "study started (pid $(cat "$WORK/pid"))"
    follow
    ;;
wait)
    follow
    if running; then say "still running"; else
        $PY -m maskdecay_examples.resnet study-report "$WORK/study" --no-latency 2>&1 | tail -n 40 | tee -a "$LOG"
    fi
    pack
    ;;
*) echo "benchmarks/resnet_gpu.sh: MODE is start or wait, not $MODE" >&2; exit 2 ;;
esac
