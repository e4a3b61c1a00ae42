#!/usr/bin/env bash
# The 60-minute English→Indonesian run quoted in the READMEs: `translate train` with its default
# CPU recipe (no model or optimiser flag: the recipe is what the command does) on every pair in
# ../shared/data/en-id except the OPUS-100 dev split, for at most 60 minutes of wall time, then
# greedy and beam-4 output on that dev split scored with sacreBLEU and chrF, from the best
# checkpoint (validation loss) and from the average of the last five (§6.1). Beam search takes the
# length penalty the recipe records in the run (decoding.json: α 1.2 for the CPU recipe).
# Run it alone on the machine: minutes shared with other work are worth less.
# Usage: bench/translate_enid_60min.sh [OUT [TRAIN FLAG ...]]: flags after OUT go to `translate
# train` (an ablation of the recipe at the same hour, e.g. `--dtype bfloat16`).
# STEPS=N bench/translate_enid_60min.sh ...: bounded by N optimizer steps instead of the clock (the
# cooldown then spans the last fifth of the steps), to set a change beside an hour at equal steps
# on a machine of another speed, or beside other work.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${FROMSCRATCH_DATA:-../shared/data}/en-id
OUT=${1:-runs/enid-60min}
shift || true
PY=.venv/bin/python
$PY -m fromscratch translate train --train $(ls $D/*.en | sed 's/\.en$//' | grep -v opus100-dev) \
    --valid $D/opus100-dev --out "$OUT" --bleu-samples 100 --seed 0 \
    $([ -n "${STEPS:-}" ] && echo "--max-steps $STEPS" || echo "--max-steps 1000000 --max-minutes 60") "$@"
for beam in 1 4; do
    $PY -m fromscratch translate eval --checkpoint "$OUT" --test $D/opus100-dev --beam $beam \
        --output "$OUT/opus100-dev.beam$beam.id" | tee "$OUT/eval-beam$beam.log"
    $PY -m fromscratch translate eval --checkpoint "$OUT" --average 5 --test $D/opus100-dev --beam $beam \
        --output "$OUT/opus100-dev.average5.beam$beam.id" | tee "$OUT/eval-average5-beam$beam.log"
done
