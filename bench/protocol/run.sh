#!/bin/bash
# Issue 27's protocol, the training half: local_small at its shipped 3000 steps; defaults on both worlds,
# tune on the demo's data, its best.yaml on the holdout world, tune on the holdout world and its best. One
# training at a time. bench/quality_protocol.py then scores every setting on a test split and writes the tables
# (it reuses the run folders trained here: runs/protocol/<world>/<setting>_s<seed>).
#   bash bench/protocol/run.sh [defaults]   (from the repository root; data/holdout_small must exist)
# With `defaults`: only the defaults' runs of both worlds.
# Trials per tune: the number in runs/protocol/trials when the tune starts (default 8).
set -euo pipefail -f  # -f: the data globs are for heavyranker, not the shell
R=$PWD/runs/protocol; C=configs/local_small.yaml; S=bench/protocol/space.yaml
export OMP_NUM_THREADS=1
HR="/work/main/.venv/bin/python -m heavyranker"
data() { echo "--set train_data.inputs=$1/train/*.gz --set validation_data.validation.inputs=$1/validation/*.gz" \
              "--set validation_data.validation_downsampled.inputs=$1/validation_downsampled/*.gz"; }
DEMO=$(data ${DEMO_DATA:-/work/main/data/local_small}); HOLDOUT=$(data $PWD/data/holdout_small)
train() {  # world config setting seed data...
  local dir=$R/$1/$3_s$4; shift 4 || true
  [ -f $dir/checkpoints/step_3000.pt ] && return
  echo "$(date -u +%T) train $dir"
  $HR train --config $CONFIG "$@" --set training.seed=$SEED --set training.save_dir=$dir > $dir.log 2>&1
}
three() {  # world config setting data...
  local world=$1 setting=$3; CONFIG=$2; shift 3
  for SEED in 0 1 2; do train $world $CONFIG $setting $SEED "$@"; done
}
tune() {  # world data...
  local out=$R/$1/tune TRIALS; shift
  TRIALS=$(cat $R/trials 2>/dev/null || echo 8)
  echo "$(date -u +%T) tune $out ($TRIALS trials)"
  $HR tune --config $C "$@" --space $S --trials $TRIALS --out $out > $out.log 2>&1
  $HR tune --report --out $out > $out.report.txt 2>&1
}
mkdir -p $R/demo $R/holdout
three demo $C defaults $DEMO
three holdout $C defaults $HOLDOUT
[ "${1:-}" = defaults ] && exit 0
tune demo $DEMO
three holdout $R/demo/tune/best.yaml demo_tuned $HOLDOUT
tune holdout $HOLDOUT
three holdout $R/holdout/tune/best.yaml holdout_tuned $HOLDOUT
echo "$(date -u +%T) DONE"
