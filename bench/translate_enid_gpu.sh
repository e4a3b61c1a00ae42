#!/usr/bin/env bash
# The GPU recipe of `translate train` (the paper's `base`, bfloat16, torch.compile; see
# transformer/training.py RECIPES) on the same data as translate_enid_60min.sh, for a few minutes
# of one GPU (default 10, first argument after the run directory), then greedy and beam-4 scores on
# the OPUS-100 dev split. Needs a CUDA device; on a CPU the recipe would fall back to the CPU one.
# The paper warms up for 4,000 of 100,000 steps; a run of minutes (~8 steps/s of 25,000 tokens)
# reaches the paper's peak learning rate (7·10⁻⁴ for d_model 512) at step 1,000 instead:
# --warmup-steps 1000 --lr 0.5 (later flags override them).
set -euo pipefail
cd "$(dirname "$0")/.."
D=${FROMSCRATCH_DATA:-../shared/data}/en-id
OUT=${1:-runs/enid-gpu}
MINUTES=${2:-10}
shift $(( $# < 2 ? $# : 2 ))  # the rest: `translate train` flags over the recipe's (bench/gpu_translate_variants.sh)
PY=${PY:-.venv/bin/python}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'translate_enid_gpu.sh: no CUDA device')"
$PY -m fromscratch translate train --train $(ls $D/*.en | sed 's/\.en$//' | grep -v opus100-dev) \
    --valid $D/opus100-dev --out "$OUT" --max-steps 1000000 --max-minutes "$MINUTES" --seed 0 \
    --warmup-steps 1000 --lr 0.5 "$@"
for beam in 1 4; do
    $PY -m fromscratch translate eval --checkpoint "$OUT" --test $D/opus100-dev --beam $beam \
        --output "$OUT/opus100-dev.beam$beam.id" | tee "$OUT/eval-beam$beam.log"
done
