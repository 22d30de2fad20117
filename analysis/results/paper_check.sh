#!/usr/bin/env bash
# The paper's claims checked on real MNIST: the exact commands that made analysis/results/paper_check/.
# Usage: bash analysis/results/paper_check.sh [MNIST_DIR] [SWEEPS_DIR]      (about an hour on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
MNIST=${1:-../shared/datasets/mnist}
SWEEPS=${2:-sweeps/paper_check}
COMMON=(--seeds 3 --jobs 2 --quiet --set "data.dir='$MNIST'")

for model in mlp cnn; do
  file=scenarios/paper_mnist_$model.toml
  if [ $model = mlp ]; then deadlines=0.11,0.14,0.2,0.3,0.6; else deadlines=0.1,0.15,0.2,0.3,0.6; fi
  # deadline policies across deadlines from about 90% stragglers to none
  fedsim sweep $file "${COMMON[@]}" --out $SWEEPS/$model/deadline \
    --grid policy.name=salf,drop,partial,heterofl --grid policy.deadline_s=$deadlines
  # deadline-free policies: wait; overselect keeps the first K = 23 of ceil(1.3 x 23) = 30 devices
  fedsim sweep $file "${COMMON[@]}" --out $SWEEPS/$model/free --grid policy.name=wait
  fedsim sweep $file "${COMMON[@]}" --out $SWEEPS/$model/overselect --grid policy.k=23 --set policy.name=overselect
  # asynchronous FL with a simulated-time budget of 50 s
  fedsim sweep $file "${COMMON[@]}" --out $SWEEPS/$model/async --grid policy.buffer_size=10 \
    --set policy.name=fedbuff --set policy.duration_s=50 --set policy.eval_every_s=0.5 --set run.rounds=10000000
done

# each model's four sweeps are one folder: fedsim plot paper-check DIR reads them all
fedsim plot paper-check $SWEEPS/mlp --out analysis/results/paper_check/mlp --budget-s 11 --target 0.85
fedsim plot paper-check $SWEEPS/cnn --out analysis/results/paper_check/cnn --budget-s 10 --target 0.85
