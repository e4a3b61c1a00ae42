#!/usr/bin/env bash
# The lr 0.5 screen, resumed at step 2,599 as a run bounded by the recipe's seed-0 hour's steps
# (17,102; the cooldown over its last fifth, steps 13,682-17,102, as in that hour) instead of the clock.
set -euo pipefail
D=/work/shared/data/en-id
OUT=runs/lr05
PY=.venv/bin/python
$PY -m fromscratch translate train --train $(ls $D/*.en | sed 's/\.en$//' | grep -v opus100-dev) \
    --valid $D/opus100-dev --out "$OUT" --max-steps 17102 --bleu-samples 100 --seed 0 --lr 0.5 --keep-last 10 --resume
for beam in 1 4; do
    $PY -m fromscratch translate eval --checkpoint "$OUT" --test $D/opus100-dev --beam $beam \
        --output "$OUT/opus100-dev.beam$beam.id" | tee "$OUT/eval-beam$beam.log"
    $PY -m fromscratch translate eval --checkpoint "$OUT" --average 5 --test $D/opus100-dev --beam $beam \
        --output "$OUT/opus100-dev.average5.beam$beam.id" | tee "$OUT/eval-average5-beam$beam.log"
done
