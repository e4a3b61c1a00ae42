#!/usr/bin/env bash
# Variants of the GPU recipe of `translate train`, trained side by side on one GPU for MINUTES
# minutes each (bench/translate_enid_gpu.sh with extra flags), then scored greedy and beam 4 on
# opus100-dev. The three share the GPU, so each sees about a third of it: compare them with each
# other, not with a run alone. Logs and scores (no checkpoints) are packed into OUT/variants.tgz.
#
#     OUT=/tmp/gpu PY=python3 FROMSCRATCH_DATA=.devdata bench/gpu_translate_variants.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
MINUTES=${MINUTES:-3}
WORK=${WORK:-runs/gpu-variants}
export PY=${PY:-.venv/bin/python} PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
declare -A VARIANTS=(
    [paper-warmup1000]="--warmup-steps 1000 --eval-every 300"
    [prenorm-8k-dropout0.3]="--norm-first --warmup-steps 1000 --batch-tokens 8000 --dropout 0.3 --eval-every 300"
    [prenorm-25k-dropout0.3]="--norm-first --warmup-steps 1000 --dropout 0.3 --eval-every 300"
)
for name in "${!VARIANTS[@]}"; do
    # shellcheck disable=SC2086
    timeout "${SECONDS_EACH:-420}" bash bench/translate_enid_gpu.sh "$WORK/$name" "$MINUTES" ${VARIANTS[$name]} \
        > "$WORK/$name.log" 2>&1 &
done
wait
for name in "${!VARIANTS[@]}"; do
    echo "$name (${VARIANTS[$name]}):"; grep -h "^BLEU\|stopped by" "$WORK/$name.log"
done
(cd "$WORK" && find . -type f -not -path '*/checkpoints/*' -not -name '*.safetensors' | tar czf "$OUT/variants.tgz" -T -)
