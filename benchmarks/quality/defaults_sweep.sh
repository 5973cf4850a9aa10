#!/usr/bin/env bash
# Training-budget sweep (issue 18): ours with FedAvg at the headline cell (per-sample 0.5,
# α 0.5, 10 clients) on the built-in data and on the fabric swatches manifest dataset;
# accuracy and wall time per run. On 2 shared cores the full rounds {10,20} × local epochs
# {1,2,5} × lr {1e-3,2e-3,5e-3} × 3 seeds × 2 datasets (108 runs, ~4x the cost of the
# rest) does not fit 20 minutes, so it is trimmed: rounds × epochs at lr 2e-3, and the lr axis
# at 10 rounds × {1,5} epochs; seeds run one after another, so DEADLINE cuts whole seeds.
#   benchmarks/quality/defaults_sweep.sh [SEEDS...]   (default 0 1 2)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-.venv/bin/python}"
if [ $# -eq 0 ]; then set -- 0 1 2; fi
SEEDS=("$@")
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
run() {
    nice -n 10 "$PY" benchmarks/quality/run_axes.py defaults --workers 2 --num-cpus 2 \
        --no-progress --seeds "${SEEDS[@]}" --deadline-s "${DEADLINE:-540}" "$@"
}
for dataset in swatches builtin; do
    run --dataset "$dataset" --rounds-grid 10 20 --epochs-grid 1 2 5 --lr-grid 0.002
    run --dataset "$dataset" --rounds-grid 10 --epochs-grid 1 5 --lr-grid 0.001 0.005
done
