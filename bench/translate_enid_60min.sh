#!/usr/bin/env bash
# The 60-minute English→Indonesian run quoted in the READMEs: train `small` on every pair in
# ../shared/data/en-id except the OPUS-100 dev split, for at most 60 minutes of wall time on the
# CPU, then score greedy and beam-4 output on that dev split with sacreBLEU and chrF.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${FROMSCRATCH_DATA:-../shared/data}/en-id
OUT=${1:-runs/enid-60min}
PY=.venv/bin/python
$PY -m fromscratch translate train --train $(ls $D/*.en | sed 's/\.en$//' | grep -v opus100-dev) \
    --valid $D/opus100-dev --out "$OUT" --preset small --batch-tokens 3000 --lr 0.3 \
    --warmup-steps 400 --max-steps 100000 --eval-every 150 --save-every 100 --bleu-samples 100 \
    --seed 0 --max-minutes 60
for beam in 1 4; do
    $PY -m fromscratch translate eval --checkpoint "$OUT" --test $D/opus100-dev --beam $beam \
        --output "$OUT/opus100-dev.beam$beam.id" | tee "$OUT/eval-beam$beam.log"
done
