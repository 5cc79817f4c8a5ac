#!/usr/bin/env bash
# MNIST FID with the standard extractor (issue 43 item 6): MAE encoder, training, CFG-scale selection on 1,000
# samples, then FID over 10,000 samples at alpha 1 and at the selected scale. One CPU thread throughout.
# Needs: python -m drift_policy.image prep-mnist (into DATA/mnist/mnist.pkl.gz) and the TF-2015 Inception
# TorchScript (docs/image_track.md, "FID"). Budget (env): STEPS (training steps), GUARD_MIN (a time guard that
# ends training early; the record says the steps reached), MAE_STEPS, N_SEL and SEL_ALPHAS (the selection).
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
RUNS=${RUNS:-runs/image}
DATA=${DATA:-}                       # empty: DRIFT_POLICY_DATA_ROOT
INCEPTION=${INCEPTION:-$HOME/fid/default_1.pt}
STEPS=${STEPS:-2000}
GUARD_MIN=${GUARD_MIN:-0}
MAE_STEPS=${MAE_STEPS:-1000}
N_SEL=${N_SEL:-1000}
SEL_ALPHAS=${SEL_ALPHAS:-[1.0,1.25,1.5,2.0]}
BATCH=${BATCH:-100}
RES=eval/results/mnist/default/fid10k
PY="python -m drift_policy.image"
COMMON="data.root=$DATA encoder.path=$RUNS/encoder_mnist_fid.pt train.out=$RUNS/mnist_fid"

date -u +"encoder %T"
$PY encoder mnist_fid $COMMON encoder.mae_max_steps=$MAE_STEPS
date -u +"train %T"
$PY train mnist_fid $COMMON train.steps=$STEPS train.minutes=$GUARD_MIN
date -u +"select %T"
# The 10,000 test images' statistics are computed once here (padded to 32) and kept for the 10k evaluation.
$PY fid $RUNS/mnist_fid inception=$INCEPTION ref=test pad=32 n=$N_SEL "alphas=$SEL_ALPHAS" batch=$BATCH \
    ref_out=$RUNS/mnist_test_pad32.npz out=$RES/select_${N_SEL}.json
BEST=$(python -c "import json; a = json.load(open('$RES/select_${N_SEL}.json'))['alphas']; \
print(min((v['fid'], k) for k, v in a.items() if float(k) != 1.0)[1])")
date -u +"fid10k %T (selected alpha $BEST)"
$PY fid $RUNS/mnist_fid inception=$INCEPTION ref=$RUNS/mnist_test_pad32.npz pad=32 n=10000 "alphas=[1.0,$BEST]" \
    batch=$BATCH out=$RES/fid10k.json
cp $RUNS/mnist_fid/history.jsonl $RES/history.jsonl
python - <<PYEOF   # sample grids (one class per row, EMA weights), the noise of seed 0
import torch
from drift_policy.image.evaluate import generate, save_grid
from drift_policy.image.train import load_generator
model, _ = load_generator("$RUNS/mnist_fid")
for a in (1.0, $BEST):
    with torch.no_grad():
        save_grid(generate(model, torch.arange(10).repeat_interleave(10), a, seed=0), f"$RES/samples_alpha{a:g}.png", 10)
PYEOF
date -u +"done %T"
