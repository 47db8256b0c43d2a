#!/usr/bin/env bash
# The CPU table of docs/performance.md in one go: `evc bench` (reference and fast path interleaved, all stages)
# for EVC_SS/MM/LL at 768x512 and 1920x1080, then the markdown table of the rows (`python -m maskdecay_examples.evc.cli.tables`).
#
#   benchmarks/evc_cpu.sh OUT_DIR          (most of an hour on a 2-core CPU; run it on an otherwise idle machine)
#
# Env: THREADS (default 2), RUNS_SMALL (timed runs at 768x512, default 5), RUNS_LARGE (at 1920x1080, default 3),
# SMALL=1 for a dry run (mini model at 64x64, 1 run). One JSON per row in OUT_DIR, the log in OUT_DIR/log.txt, the
# table in OUT_DIR/table.md. Needs the installed package (make setup; PYTHON=.venv/bin/python).
set -u -o pipefail
OUT=${1:?usage: benchmarks/evc_cpu.sh OUT_DIR}
PY=${PYTHON:-python3}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
if [[ "${SMALL:-0}" == 1 ]]; then ROWS=("mini_EVC_SS 64x64 1"); else
    RS=${RUNS_SMALL:-5}; RL=${RUNS_LARGE:-3}
    # "split": both engines in one process need more memory than a small machine has, so the row is two runs: the
    # forward with both paths, then every stage on the fast path alone
    ROWS=("EVC_SS 768x512 $RS" "EVC_MM 768x512 $RS" "EVC_LL 768x512 $RS"
          "EVC_SS 1920x1080 $RL" "EVC_MM 1920x1080 $RL" "EVC_LL 1920x1080 $RL split")
fi
status=0
FILES=()
bench() {  # bench JSON ARGS...
    local json=$1; shift
    echo "== $* ($THREADS threads) $(date -u +%H:%M:%S)" | tee -a "$LOG"
    $PY -m maskdecay_examples.evc bench --threads "$THREADS" --json "$json" "$@" 2>&1 | tr '\r' '\n' | grep -v '^bench:' \
        | tee -a "$LOG" || status=1
    FILES+=("$json")
}
for row in "${ROWS[@]}"; do
    read -r arch size runs split <<< "$row"
    if [[ -n "$split" ]]; then
        bench "$OUT/${arch}_${size}_forward.json" --arch "$arch" --size "$size" --runs "$runs" --stages forward
        bench "$OUT/${arch}_${size}_fast.json" --arch "$arch" --size "$size" --runs "$runs" --no-reference
    else
        bench "$OUT/${arch}_${size}.json" --arch "$arch" --size "$size" --runs "$runs"
    fi
done
$PY -m maskdecay_examples.evc.cli.tables "${FILES[@]}" | tee "$OUT/table.md" || status=1
exit $status
