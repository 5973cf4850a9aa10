#!/usr/bin/env bash
# Strategy sweep (issue 18) on the built-in data, ours only:
#  1. per-client missingness, Dirichlet α 0.1, rates 0.3/0.5/0.7/0.9, plus the headline cell
#     (per-sample 0.5, α 0.5) for no-regression: FedAvg, the server optimizers and FedProx,
#     with the central unimodal ceilings as references;
#  2. 2 of 10 clients sending ×100-scaled, sign-flipped or withheld updates at the headline cell:
#     FedAvg beside the robust rules, each also clean.
# Runs the main grid already holds (benchmarks/results/quality_records.jsonl: FedAvg's ours
# and the central ceilings, same code path and settings) are copied, not rerun. Seeds run one
# after another, so DEADLINE (seconds per part) cuts whole seeds first. On the shared 2-core
# box (load 4-6) a run takes 30-60 s with two at a time: 6 strategies x 5 cells x 3 seeds are
# 75 new runs (~35 min), so the default list leaves out fedadagrad (STRATEGIES=... adds it);
# part 2 is 33 new runs (~15 min).
#   benchmarks/quality/strategy_sweep.sh [SEEDS...]   (default 0 1 2)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-.venv/bin/python}"
if [ $# -eq 0 ]; then set -- 0 1 2; fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
run() {
    nice -n 10 "$PY" benchmarks/quality/run_axes.py "$@" --workers 2 --num-cpus 2 \
        --no-progress --seeds "${SEEDS[@]}"
}
SEEDS=("$@")
REUSE=(--reuse benchmarks/results/quality_records.jsonl)
run strategies --deadline-s "${DEADLINE:-1500}" "${REUSE[@]}" \
    --strategies "${STRATEGIES:-fedavg,fedavgm,fedadam,fedyogi,fedprox}" \
    --proximal-mu "${PROXIMAL_MU:-0.01}" --alpha 0.1 --rates 0.3 0.5 0.7 0.9
run attacks --deadline-s "${ATTACK_DEADLINE:-900}" "${REUSE[@]}" \
    --strategies "${ROBUST:-fedavg,median,trimmed_mean,krum,multi_krum,anchored_mean}" \
    --attacks scale,sign_flip,withhold --attackers 2
