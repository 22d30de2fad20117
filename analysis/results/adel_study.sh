#!/usr/bin/env bash
# SALF, ADEL-FL's deadlines and the baselines at equal simulated time: the exact commands that made
# analysis/results/adel_study/. Every run stops at the same simulated-time budget (run.time_budget_s).
# Usage: bash analysis/results/adel_study.sh [MNIST_DIR] [SWEEPS_DIR]      (about an hour on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
MNIST=${1:-../shared/datasets/mnist}
SWEEPS=${2:-sweeps/adel_study}
BUDGET=6
DEADLINES=0.04,0.05,0.06,0.08,0.12
ROUNDS=150,120,100,75,50         # ADEL-FL's R: the budget over each constant deadline, so it gets the same choice
ADEL="policy.deadline_s={ optimize = \"adel\", total_s = $BUDGET, min_s = 0.02 }"

# timing-driven straggler models, on one scenario file:
#   iid_exponential    ADEL-FL's: every layer's backward time exponential, i.i.d. per device, round and layer
#   persistent_speeds  speeds lognormal across devices, a per-round background slowdown, no per-layer noise
timing_study() {    # MODEL SCENARIO EXTRA_SET...
  local model=$1 scenario=$2; shift 2
  local out=$SWEEPS/$(basename "$scenario" .toml)/$model
  local common=(--seeds 3 --jobs 2 --quiet --set "data.dir='$MNIST'" --set run.time_budget_s=$BUDGET "$@")
  fedsim sweep "$scenario" "${common[@]}" --set run.rounds=100000 --out "$out/constant" \
    --grid policy.name=salf,drop,partial --grid policy.deadline_s=$DEADLINES
  fedsim sweep "$scenario" "${common[@]}" --set run.rounds=100000 --set policy.name=salf --out "$out/salf_all" \
    --grid policy.aggregation=all --grid policy.deadline_s=$DEADLINES
  fedsim sweep "$scenario" "${common[@]}" --set run.rounds=100000 --out "$out/wait" --grid policy.name=wait
  fedsim sweep "$scenario" "${common[@]}" --set "$ADEL" --out "$out/adel" --grid run.rounds=$ROUNDS
  fedsim plot equal-time "$out" --out "analysis/results/adel_study/$(basename "$scenario" .toml)/$model" \
    --budget-s $BUDGET --target 0.85
}

MLP=scenarios/adel_mnist_mlp.toml
timing_study iid_exponential $MLP
timing_study persistent_speeds $MLP --set "fleet.classes[0].layer_time=1" \
  --set 'fleet.classes[0].speed_flops={ dist = "lognormal", median = 1.0e8, sigma = 0.5 }' \
  --set 'fleet.classes[0].slowdown={ dist = "uniform", low = 1.0, high = 2.0 }'

# the SALF authors' straggler model: each round 90% of the participants stop at a depth drawn uniformly from
# 1..L, whatever their speed (fleet.depth_model); the deadline (1 s) cuts nobody, so a round lasts until the
# last device has done its drawn work. Only salf and drop accept the model; wait runs without it (no
# stragglers); ADEL-FL's deadlines have nothing to act on when depths do not depend on time.
out=$SWEEPS/adel_mnist_mlp/depth_drawn
common=(--seeds 3 --jobs 2 --quiet --set "data.dir='$MNIST'" --set run.time_budget_s=$BUDGET --set run.rounds=100000)
fedsim sweep $MLP "${common[@]}" --set 'fleet.depth_model={ stragglers = 0.9, depth = "uniform" }' \
  --set policy.deadline_s=1.0 --out $out/drawn --grid policy.name=salf,drop --grid policy.aggregation=mean,all
fedsim sweep $MLP "${common[@]}" --out $out/wait --grid policy.name=wait
fedsim plot equal-time $out --out analysis/results/adel_study/adel_mnist_mlp/depth_drawn --budget-s $BUDGET --target 0.85

timing_study iid_exponential scenarios/adel_mnist_cnn.toml --set run.eval_every=2
