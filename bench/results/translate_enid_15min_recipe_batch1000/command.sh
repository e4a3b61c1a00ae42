#!/usr/bin/env bash
# The recipe with 1,000-token batches, bounded by the Zen 3 hour's target tokens (16.84M ≈ 18,800 steps of ~897), not the clock.
set -euo pipefail
D=/work/shared/data/en-id
OUT=runs/bt1000
PY=.venv/bin/python
$PY -m fromscratch translate train --train $(ls $D/*.en | sed 's/\.en$//' | grep -v opus100-dev) \
    --valid $D/opus100-dev --out "$OUT" --max-steps 18800 --bleu-samples 100 --seed 0 --batch-tokens 1000 --keep-last 10
for beam in 1 4; do
    $PY -m fromscratch translate eval --checkpoint "$OUT" --test $D/opus100-dev --beam $beam \
        --output "$OUT/opus100-dev.beam$beam.id" | tee "$OUT/eval-beam$beam.log"
    $PY -m fromscratch translate eval --checkpoint "$OUT" --average 5 --test $D/opus100-dev --beam $beam \
        --output "$OUT/opus100-dev.average5.beam$beam.id" | tee "$OUT/eval-average5-beam$beam.log"
done
