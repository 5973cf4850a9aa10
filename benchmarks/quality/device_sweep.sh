#!/usr/bin/env bash
# The full quality sweep on a lent 16-core machine with no network and no crossfed install:
# wheels carried in .whl (pydantic, diffusers, ray, ...), crossfed's namespace assembled in
# /tmp/pkg from the checkout (setup.py's folder mapping), the records (one JSON line per run)
# under $OUT. The grid runs on the simulator, whose backend is Ray: the ray wheel (~80 MB)
# must be among the carried wheels (it does not fit a 64 MiB carry; without it pass
# QUALITY_BACKEND=inline, which runs every client of every run one after another).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg/crossfed/v1
cp -r crossfed/. /tmp/pkg/crossfed/
cp -r common /tmp/pkg/crossfed/common
cp -r server /tmp/pkg/crossfed/server
cp -r client /tmp/pkg/crossfed/client
cp -r protos/crossfed/v1/. /tmp/pkg/crossfed/v1/
# CPU only: a CUDA build of torch initialised in the parent breaks the forked workers.
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=""
(cd /tmp && python3 -c "import crossfed.client.local_trainer, crossfed.simulation.experiment_run") || exit 1
nproc
timeout "${QUALITY_TIMEOUT:-395}" python3 benchmarks/quality/run_quality.py \
    --backend "${QUALITY_BACKEND:-ray}" \
    --workers "${QUALITY_WORKERS:-16}" --deadline-s "${QUALITY_DEADLINE:-320}" \
    --embeddings benchmarks/results/.cache/quality-embeddings-10000.safetensors \
    --results-dir /tmp/quality-results --records "$OUT/quality_records.jsonl" \
    --benchmarks-md /tmp/quality-results/BENCHMARKS.md --no-progress "$@" 2>&1 \
    | tee "$OUT/quality_log.txt"
echo "exit $?"; wc -l "$OUT/quality_records.jsonl"
# Only the records come back (the tool returns at most 8 files); rebuild the report here with
#   python benchmarks/quality/run_quality.py --report-only --records <them> --note "..."
