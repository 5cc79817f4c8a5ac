#!/usr/bin/env bash
# MNIST FID with the standard extractor (issue 43 item 6): MAE encoder, training, then FID over N samples (the
# issue asks for N=10000) against N test images (a fixed random subset when N < 10000), at alpha 1 and at a guided
# scale: ALPHA, or with SELECT=1 the best of SEL_ALPHAS by a cheaper N_SEL-sample FID. One CPU thread throughout.
# Needs: python -m drift_policy.image prep-mnist (into DATA/mnist/mnist.pkl.gz) and the TF-2015 Inception
# TorchScript (docs/image_track.md, "FID"). Budget (env): STEPS (training steps), GUARD_MIN (a time guard that
# ends training early; the record says the steps reached), MAE_STEPS. About 0.25 s of one EPYC core per image
# goes into the Inception: N=10000 at two scales is 30,000 images, about 2 hours.
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
RUNS=${RUNS:-runs/image}
DATA=${DATA:-}                       # empty: DRIFT_POLICY_DATA_ROOT
INCEPTION=${INCEPTION:-$HOME/fid/default_1.pt}
STEPS=${STEPS:-2000}
GUARD_MIN=${GUARD_MIN:-0}
MAE_STEPS=${MAE_STEPS:-1000}
N=${N:-10000}
SELECT=${SELECT:-0}
ALPHA=${ALPHA:-1.5}
N_SEL=${N_SEL:-1000}
SEL_ALPHAS=${SEL_ALPHAS:-[1.25,1.5,2.0]}
BATCH=${BATCH:-100}
RES=eval/results/mnist/default/fid
PY="python -m drift_policy.image"
COMMON="data.root=$DATA encoder.path=$RUNS/encoder_mnist_fid.pt train.out=$RUNS/mnist_fid"

date -u +"encoder %T"
$PY encoder mnist_fid $COMMON encoder.mae_max_steps=$MAE_STEPS
date -u +"train %T"
# resume: a rerun (e.g. with another N) finds the finished run and trains no further
$PY train mnist_fid $COMMON train.steps=$STEPS train.minutes=$GUARD_MIN train.resume=true
REF="ref=test pad=32 ref_out=$RUNS/mnist_test_pad32_n$N.npz"
if [ "$N" -lt 10000 ]; then REF="$REF ref_n=$N"; fi
if [ "$SELECT" = 1 ]; then
  date -u +"select %T"
  # the reference statistics are computed once here and kept for the N-sample evaluation
  $PY fid $RUNS/mnist_fid inception=$INCEPTION $REF n=$N_SEL "alphas=$SEL_ALPHAS" batch=$BATCH \
      out=$RES/select_${N_SEL}.json
  ALPHA=$(python -c "import json; a = json.load(open('$RES/select_${N_SEL}.json'))['alphas']; \
print(min((v['fid'], k) for k, v in a.items())[1])")
  REF="ref=$RUNS/mnist_test_pad32_n$N.npz pad=32"
fi
date -u +"fid %T (alpha 1 and $ALPHA)"
$PY fid $RUNS/mnist_fid inception=$INCEPTION $REF n=$N "alphas=[1.0,$ALPHA]" batch=$BATCH out=$RES/fid$N.json
cp $RUNS/mnist_fid/history.jsonl $RES/history.jsonl
python - <<PYEOF   # sample grids (one class per row, EMA weights), the noise of seed 0
import torch
from drift_policy.image.evaluate import generate, save_grid
from drift_policy.image.train import load_generator
model, _ = load_generator("$RUNS/mnist_fid")
for a in (1.0, $ALPHA):
    with torch.no_grad():
        save_grid(generate(model, torch.arange(10).repeat_interleave(10), a, seed=0), f"$RES/samples_alpha{a:g}.png", 10)
PYEOF
date -u +"done %T"
