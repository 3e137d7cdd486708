#!/usr/bin/env bash
# One check of the platform on a machine with one CUDA GPU (docs/gpu.md), about 8 minutes:
#   1. bench/model_speed.py at paper size      2. scbert pretrain on Ray Train, then resumed
#   3. Ray Serve with a GPU replica under load  4. scbert annotate --distributed, 20,000 cells
# Writes OUT/report.json and OUT/report.md; exits 1 when a part that ran failed (a part whose
# dependencies are missing is "skipped", with the reason).
#
#   bash bench/gpu_check.sh [--device cuda|cpu] [--quick] [--out DIR]
#   PYTHON=python3 bash bench/gpu_check.sh --device cuda   # a Python without the .venv
#
# --quick: tiny sizes, a smoke run of every part (--device cpu --quick: under 2 minutes on
# 2 CPUs; make bench runs it: tests/test_gpu_check.py). --out: default a new folder under $TMPDIR.
# PYTHON: the interpreter (default: the repo's .venv, else python3); the repo is put on its
# PYTHONPATH, so it needs no install. GPU_CHECK_TIMEOUTS: seconds per part,
# "speed,train,serve,annotate" (the prep step gets train's).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE=cuda
QUICK=0
OUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --device=*) DEVICE="${1#*=}"; shift ;;
        --quick) QUICK=1; shift ;;
        --out) OUT="$2"; shift 2 ;;
        --out=*) OUT="${1#*=}"; shift ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device cuda or cpu" >&2; exit 2 ;; esac
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ -z "$OUT" ]]; then OUT="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"; fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
rm -rf "$OUT/parts" "$OUT/logs" "$OUT/work" "$OUT/report.json" "$OUT/report.md"
mkdir -p "$OUT/parts" "$OUT/logs" "$OUT/work"

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import scbert_platform" 2>/dev/null; then
    # no editable install: the import names of platform/, serve/ and tune/ (pyproject's
    # package-dir) as links in a folder first on PYTHONPATH
    SHIM="$OUT/work/shim"
    mkdir -p "$SHIM"
    for pair in scbert_platform:platform scbert_serve:serve scbert_tune:tune; do
        ln -sfn "$REPO/${pair#*:}" "$SHIM/${pair%%:*}"
    done
    export PYTHONPATH="$SHIM:$PYTHONPATH"
fi
unset RAY_ADDRESS  # each part starts a local Ray of its own on 127.0.0.1, never joins one
export PYTHONUNBUFFERED=1

# quick: generous, for 2 CPUs with other work running (about 100 s when idle)
if [[ $QUICK == 1 ]]; then TIMEOUTS="${GPU_CHECK_TIMEOUTS:-150,300,150,150}"; else TIMEOUTS="${GPU_CHECK_TIMEOUTS:-200,150,90,80}"; fi
IFS=, read -r T_SPEED T_TRAIN T_SERVE T_ANNOTATE <<<"$TIMEOUTS"
FLAGS=(--out "$OUT" --device "$DEVICE")
[[ $QUICK == 1 ]] && FLAGS+=(--quick)

# Every step runs under timeout(1), which gives it a process group of its own; on exit (a
# failure, Ctrl-C) the groups still running are ended, and with them the local Ray each step
# started (Ray's processes die with the driver that started them). No `ray stop`: it would end
# every Ray on the machine, other users' too.
cleanup() {
    local pid
    for pid in $(cat "$OUT/parts/pids" 2>/dev/null); do
        kill -TERM -- "-$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() {  # step NAME TIMEOUT ARGS...: never fails; the status is in parts/NAME.json
    local name="$1" limit="$2" rc=0 pid
    shift 2
    timeout --kill-after=15 "$limit" "$PYTHON" "$REPO/bench/gpu_check.py" "$@" "${FLAGS[@]}" \
        >"$OUT/logs/$name.step" 2>&1 &
    pid=$!
    echo "$pid" >>"$OUT/parts/pids"
    wait "$pid" || rc=$?
    echo "$rc $limit" >"$OUT/parts/$name.rc"
    if [[ -f "$OUT/parts/$name.json" ]]; then
        tail -n 1 "$OUT/logs/$name.step"
    else
        echo "$name: failed (exit $rc, timeout $limit s; see $OUT/logs/$name.step)"
    fi
}

echo "gpu check on $DEVICE$([[ $QUICK == 1 ]] && echo ' (quick)'), python $PYTHON; report in $OUT"
START=$SECONDS
if [[ $QUICK == 1 ]]; then
    # a smoke run: the model-speed subprocesses beside preparing and training (its figures
    # are not comparable then); the Ray parts one after another, so that a loaded machine does
    # not push one past its timeout
    step speed "$T_SPEED" part speed &
    SPEED=$!
    step prep "$T_TRAIN" prep
    step train "$T_TRAIN" part train
    wait "$SPEED"
    step serve "$T_SERVE" part serve
    step annotate "$T_ANNOTATE" part annotate
else
    # one part at a time, so that each has the GPU and the CPUs to itself
    step speed "$T_SPEED" part speed
    step prep "$T_TRAIN" prep
    step train "$T_TRAIN" part train
    step serve "$T_SERVE" part serve
    step annotate "$T_ANNOTATE" part annotate
fi
status=0
"$PYTHON" "$REPO/bench/gpu_check.py" report "${FLAGS[@]}" --wall-s "$((SECONDS - START))" || status=$?
echo "report: $OUT/report.md and $OUT/report.json"
exit "$status"
