#!/usr/bin/env bash
# Issue 16's 25x table (the paper's abstract: doped KP, pruning, HMD, LMF at
# 25x on PTB) on the carried-state plateau teacher of runs/ptb_conv, with
# longer student runs than the 1000-step rows of runs/ptb_dope (whose
# teacher was the 2.5-epoch zero-state one). Adam at lr 1e-2 with a cosine
# decay: on this teacher it brought LGP-Shuffle past the teacher in 1000
# steps (ptb_1000_step_sweep.sh), where SGD lr 10 needed ~3000 of a 5000-step
# run; every row takes the same recipe. One student per command, so
# each finished row is reported; resumable (finished rows are skipped,
# backups every 200 steps); holds the training lock.
#
#   nohup examples/ptb_doping_conv_queue.sh >> runs/ptb_dope_conv.log 2>&1 &
#
# CMR_RATES (default 0.5) gives the 'dope' row one run per co-matrix
# dropout rate, e.g. KINDS=dope CMR_RATES="0.1 0.25" for the CMR sweep.
# Longer runs in their own run directory and report, e.g.
#   STEPS=3000 RUN_DIR=runs/ptb_dope_conv3k REPORT=ptb_doping_conv_3000 \
#   KINDS="dope_nocmr dope" examples/ptb_doping_conv_queue.sh
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python}
LOCK=${LOCK:-/work/notes/train.lock}
STEPS=${STEPS:-1500}
COMMON=(--data "${DATA:-../shared/data/ptb}" --run-dir "${RUN_DIR:-runs/ptb_dope_conv}"
        --reuse "${SOURCE:-runs/ptb_conv}" --carry-state --optimizer adam
        --lr 35 --clipnorm 0.143 --teacher-schedule plateau
        --teacher-epochs 20 --calib-steps 80 --student-lr 1e-2
        --student-schedule cosine --student-steps "$STEPS" --curve-every 500
        --dope-reductions 25 --report-name "${REPORT:-ptb_doping_conv}"
        --stages students,report)

for kind in ${KINDS:-dope prune lmf hmd dope_nocmr kp}; do
    rates=(0.5)
    [ "$kind" = dope ] && read -ra rates <<< "${CMR_RATES:-0.5}"
    for rate in "${rates[@]}"; do
        label=$kind
        [ "$kind" = dope ] && label="$kind (CMR $rate)"
        echo "== $(date -u +%FT%TZ) $label"
        flock "$LOCK" "$PY" examples/ptb_word_lm.py "${COMMON[@]}" \
            --students "$kind" --cmr-rate "$rate"
    done
done
echo "== $(date -u +%FT%TZ) queue done"
