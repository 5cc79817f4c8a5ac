#!/usr/bin/env bash
# BlockPush (Table 7): oracle data, then drift (G = 2 and 8) and diffusion at an equal generator sample-pass budget
# (steps x batch x samples per observation: drift batch * n_noise, diffusion batch), one CPU thread each, run one
# after another. Budget: 64 x 8 x 200 = 102,400 sample-passes. Usage: bash eval/results/blockpush_lowdim/default/blockpush_reproduce.sh
set -euo pipefail
cd "$(dirname "$0")/../../../.."
export OMP_NUM_THREADS=1
PY="${PY:-python}"
DATA="$PWD/datasets/blockpush/oracle_1000.zarr"
R=eval/results/blockpush_lowdim/default
M="${MACHINE:-2-core CPU shared with other jobs, 1 thread}"
COMMON=(task=blockpush_lowdim recipe=null "task.dataset=$DATA" policy.backbone=tiny train.batch_size=64 train.max_minutes=0
        train.eval_every_minutes=0 train.eval_every_steps=0 train.eval_episodes=50 train.eval_workers=0
        train.threads=1 train.seed=0)

[ -d "$DATA" ] || $PY -m drift_policy.data.blockpush generate --episodes 1000 --seed 0 --out "$DATA" \
    --record $R/blockpush_data.json
$PY -m drift_policy.data.blockpush oracle-eval --episodes 200 --out $R/blockpush_oracle.json

run() {  # name, overrides...
  local name=$1; shift
  [ -e runs/blockpush-$name/pretrained ] || $PY -m drift_policy train "${COMMON[@]}" "$@" train.run_dir=runs/blockpush-$name
  $PY -m drift_policy bench summary run=runs/blockpush-$name out=$R/blockpush_$name.json "machine=$M"
}
run drift_g2 policy=drift_unet policy.n_noise=2 train.max_steps=800 train.warmup_steps=80
# DDIM-10 at evaluation: DDPM-100 would cost ~10x the CPU (training is the same DDPM objective either way).
run diffusion policy=diffusion_unet policy.scheduler=ddim policy.num_inference_steps=10 train.max_steps=1600 \
    train.warmup_steps=160
run drift_g8 policy=drift_unet policy.n_noise=8 train.max_steps=200 train.warmup_steps=20
