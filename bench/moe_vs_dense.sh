#!/usr/bin/env bash
# MoE against its dense twin: the MoE preset `small` (8 experts of 256, top-2) and a dense Llama
# with the same active parameters per token (one SwiGLU of 2·256, same attention, embeddings and
# depth: bench/moe_results.py dense-twin), on the same TinyStories data with the same tokenizer,
# each for the same wall-clock budget (--max-minutes, 25 by default). Then validation loss
# against training FLOPs and against training time, both plotted:
# bench/results/moe_vs_dense/vs_dense.png and vs_dense.json.
#
#     bench/moe_vs_dense.sh                     # the measured run (alone on the machine, ~1 hour)
#     MINUTES=0.1 PRESET=tiny BATCH=4 SEQ_LEN=32 DATA=../shared/data/text/tinystories-cased-200kb.txt \
#         OUT=/tmp/moe_vs_dense bench/moe_vs_dense.sh      # a smoke test
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-${FROMSCRATCH_DATA:-../shared/data}/text/tinystories-lowercase-4mb.txt}
OUT=${OUT:-bench/results/moe_vs_dense}
MINUTES=${MINUTES:-25}
PRESET=${PRESET:-small}
BATCH=${BATCH:-16}
SEQ_LEN=${SEQ_LEN:-256}
VOCAB=${VOCAB:-4096}
EVERY=${EVERY:-50}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
# Both runs stop on the clock (--max-minutes), not on the step count.
COMMON=(--seq-len "$SEQ_LEN" --batch-size "$BATCH" --max-steps 1000000 --max-minutes "$MINUTES"
        --eval-every "$EVERY" --save-every "$EVERY" --seed 0 --device cpu)
$PY -m fromscratch moe train --data "$DATA" --out "$OUT/moe" --preset "$PRESET" --vocab-size "$VOCAB" \
    "${COMMON[@]}" 2>&1 | tee "$OUT/moe.log"
$PY bench/moe_results.py dense-twin --moe-preset "$PRESET" --data "$DATA" --out "$OUT/dense" \
    --tokenizer "$OUT/moe/tokenizer.model" "${COMMON[@]}" 2>&1 | tee "$OUT/dense.log"
$PY bench/moe_results.py vs-dense "$OUT/moe" "$OUT/dense" --out "$OUT/vs_dense.png"
