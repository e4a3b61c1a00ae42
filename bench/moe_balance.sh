#!/usr/bin/env bash
# Does balancing work? The same MoE (preset `small`: 8 experts, top-2, 4 sparse blocks) trained on
# TinyStories three times, for the same steps from the same seed and tokenizer, with
# --balance none (expect the load to collapse onto a few experts), aux (Switch's loss) and bias
# (DeepSeek-V3's expert bias); then the busiest expert's load over the mean against the step,
# and the final validation losses: bench/results/moe_balance/balance.png and balance.json.
#
#     bench/moe_balance.sh                      # the measured run (alone on the machine)
#     STEPS=3 PRESET=tiny BATCH=4 SEQ_LEN=32 DATA=../shared/data/text/tinystories-cased-200kb.txt \
#         OUT=/tmp/moe_balance bench/moe_balance.sh        # a smoke test, seconds
#
# A run already in OUT is resumed (--resume), so the script can be started again after a stop.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-${FROMSCRATCH_DATA:-../shared/data}/text/tinystories-lowercase-4mb.txt}
OUT=${OUT:-bench/results/moe_balance}
STEPS=${STEPS:-1500}
PRESET=${PRESET:-small}
BATCH=${BATCH:-16}
SEQ_LEN=${SEQ_LEN:-256}
VOCAB=${VOCAB:-4096}
DEVICE=${DEVICE:-cpu}  # the losses and loads do not depend on it; bench/gpu_run.sh runs it on a GPU
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
for BALANCE in none aux bias; do
    RUN=$OUT/$BALANCE
    TOKENIZER=()
    [ -f "$OUT/none/tokenizer.model" ] && TOKENIZER=(--tokenizer "$OUT/none/tokenizer.model")  # one for all three
    RESUME=()
    [ -f "$RUN/checkpoints.json" ] && RESUME=(--resume)
    $PY -m fromscratch moe train --data "$DATA" --out "$RUN" --preset "$PRESET" --balance "$BALANCE" \
        --vocab-size "$VOCAB" "${TOKENIZER[@]}" --seq-len "$SEQ_LEN" --batch-size "$BATCH" --max-steps "$STEPS" \
        --eval-every $(( STEPS < 100 ? STEPS : 100 )) --save-every $(( STEPS < 100 ? STEPS : 100 )) \
        --seed 0 --device "$DEVICE" "${RESUME[@]}" 2>&1 | tee "$RUN.log"
done
$PY bench/moe_results.py balance "$OUT/none" "$OUT/aux" "$OUT/bias" --out "$OUT/balance.png"
