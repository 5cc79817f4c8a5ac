#!/usr/bin/env bash
# Fashion-MNIST image track: encoder, classifier, main run, budget-matched ablations, evaluation.
# One CPU thread throughout. Budgets (env): MAIN_MIN (main run minutes), ABL_STEPS (ablation steps).
# Needs: sudo apt-get install -y dataset-fashion-mnist
set -euo pipefail
cd "$(dirname "$0")/../../../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
MAIN_MIN=${MAIN_MIN:-50}
ABL_STEPS=${ABL_STEPS:-300}
RUNS=${RUNS:-runs/image}
RES=${RES:-eval/results/fashion_mnist}   # default/: the main run and the summary; levers/: the ablations
EXTRA=${EXTRA:-}          # extra overrides for every command (smoke tests)
N_MAIN=${N_MAIN:-1000}    # generated samples per class for the main evaluation
N_ABL=${N_ABL:-300}
PY="python -m drift_policy.image"
COMMON="encoder.path=$RUNS/encoder_fmnist.pt eval.classifier=$RUNS/classifier_fmnist.pt $EXTRA"

MAIN_UNTIL=${MAIN_UNTIL:-}  # HH:MM (UTC): train the main run until then instead of MAIN_MIN minutes

date -u +"start %T"
$PY encoder fmnist $COMMON                              # MAE pretraining, cached (3 min)
$PY classifier fmnist $COMMON eval.classifier_minutes=30  # evaluation classifier (2 epochs), cached
if [ -n "$MAIN_UNTIL" ]; then
  MAIN_MIN=$(python -c "print(max(1.0, ($(date -u -d "$MAIN_UNTIL" +%s) - $(date -u +%s)) / 60))")
fi
date -u +"main %T ($MAIN_MIN min)"
$PY train fmnist $COMMON train.minutes=$MAIN_MIN train.out=$RUNS/fmnist_main "train.snapshot_steps=[$ABL_STEPS]"
$PY eval $RUNS/fmnist_main n_per_class=$N_MAIN "alphas=[1.0,1.5,2.0]" out=$RES/default/main
$PY eval $RUNS/fmnist_main/step$ABL_STEPS n_per_class=$N_ABL "alphas=[1.0,1.5]" out=$RES/levers/ablations/baseline
ABL_LATEST_START=${ABL_LATEST_START:-}   # HH:MM (UTC): skip ablations that would start later (time budget)
abl() {  # name, overrides...
  local name=$1; shift
  if [ -n "$ABL_LATEST_START" ] && [ "$(date -u +%H:%M)" \> "$ABL_LATEST_START" ]; then
    echo "skipping ablation $name: past $ABL_LATEST_START UTC"; return 0
  fi
  date -u +"ablation $name %T"
  $PY train fmnist $COMMON train.max_steps=$ABL_STEPS train.minutes=1000 train.out=$RUNS/abl_$name "$@"
  $PY eval $RUNS/abl_$name n_per_class=$N_ABL "alphas=[1.0,1.5]" out=$RES/levers/ablations/$name
}
abl attraction1.5 drift.attraction=1.5
abl tau0.05_only "drift.temperatures=[0.05]"
abl raw_pixels encoder.use=false
abl paper_stats "encoder.stages=[0,1,2]"
date -u +"done %T"
python - <<PYEOF
from drift_policy.image.evaluate import summarize
main = summarize({"main": "$RES/default/main"}, alphas=(1.0, 1.5, 2.0))
abl = summarize({k: f"$RES/levers/ablations/{k}" for k in ["baseline", "attraction1.5", "tau0.05_only", "raw_pixels", "paper_stats"]})
open("$RES/default/summary.md", "w").write("## main\n\n" + main + "\n\n## ablations ($ABL_STEPS steps each)\n\n" + abl + "\n")
print(open("$RES/default/summary.md").read())
PYEOF
