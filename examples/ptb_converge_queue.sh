#!/usr/bin/env bash
# Issue 21 part 3, "the orderings at convergence", as one idempotent queue.
#
# Zaremba's stateful BPTT (--carry-state) throughout: the 2 x LSTM(200)
# teacher trained to its plateau (SGD lr 35 = Zaremba's 1, halved when the
# validation perplexity improves by < 1% per epoch, stopped when it
# flattens; at most 20 epochs), the calibrated distillation coefficients,
# then the 10x students in order of how much they tell: LGP-Shuffle g=10
# and SVD rank 16 from the teacher's weights, the dense h=47 direct
# design, LGP-Shuffle and SVD from a random init, LowRank-LGP from both
# inits, and the coefficient grid at 1000 steps per cell. Every student logs its
# validation / test perplexity every 500 steps (--curve-every).
#
# Every command resumes where it stopped (results.json, backups) and skips
# the rows it has, so rerunning this script continues the queue; the
# report (examples/results/ptb_converge_*) is rewritten after each step.
# Each training holds $LOCK, so that one training runs at a time.
#
#   nohup examples/ptb_converge_queue.sh >> runs/ptb_conv.log 2>&1 &
#
# A later session may instead start a new run dir from this teacher:
#   python examples/ptb_word_lm.py ... --run-dir runs/other --reuse runs/ptb_conv
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python}
LOCK=${LOCK:-/work/notes/train.lock}
COMMON=(--data "${DATA:-../shared/data/ptb}" --run-dir "${RUN:-runs/ptb_conv}"
        --carry-state --optimizer sgd --lr 35 --clipnorm 0.143
        --teacher-schedule plateau --teacher-epochs 20 --calib-steps 80
        --student-lr 10 --student-schedule cosine --svd-rank 16
        --curve-every 500 --report-name ptb_converge)

step() {
    echo "== $(date -u +%FT%TZ) $*"
    flock "$LOCK" "$PY" examples/ptb_word_lm.py "${COMMON[@]}" "$@"
    "$PY" examples/ptb_word_lm.py "${COMMON[@]}" --stages report
}

step --stages teacher,calibrate
step --stages students --students lgp --student-steps 5000
step --stages students --students svd --student-steps 5000
step --stages students --students dense --student-steps 6000
for kind in lgp svd; do
    step --stages students --students "$kind" --student-init random \
        --student-steps 6000
done
step --stages students --students lowrank_lgp --student-steps 5000
step --stages students --students lowrank_lgp --student-init random \
    --student-steps 6000
step --stages grid --grid-steps 1000
echo "== $(date -u +%FT%TZ) queue done"
