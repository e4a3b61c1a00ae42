#!/usr/bin/env bash
# Everything a session lent a GPU runs, as one command of under ten minutes:
#   - bench/gpu_checks.py: each model on the GPU against the CPU, bfloat16, torch.compile, SDPA kernels;
#   - bench/vlm_results.py --device cuda: the VLM's four experiments (the same commands as on the CPU);
#   - bench/moe_balance.sh with DEVICE=cuda: the MoE's three balancing runs (steps, not time, fixed);
#   - bench/translate_enid_gpu.sh: the GPU recipe of `translate train` for MINUTES minutes, then the
#     greedy and beam-4 scores on opus100-dev.
# The VLM and MoE jobs and the checks run beside the translation run (one GPU, 16 CPU cores).
# Results are packed into OUT: results.tgz (every log and JSON, no weights) and vlm_NAME.tgz (each
# VLM run's best model weights, to evaluate again elsewhere). bench/results/gpu/ holds what was
# kept of them (no weights).
#
#     OUT=/tmp/gpu PY=python3 FROMSCRATCH_DATA=.devdata bench/gpu_run.sh      # on the GPU machine
#     QUICK=1 VLM_DEVICE=cpu OUT=/tmp/gpu WORK=/tmp/gpu-work bench/gpu_run.sh  # a smoke test of the VLM part and the packing
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
MINUTES=${MINUTES:-4.5}
VLM_SECONDS=${VLM_SECONDS:-500}
PY=${PY:-.venv/bin/python}
WORK=${WORK:-runs/gpu-work}
export PY PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
nvidia-smi -L; $PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"

$PY bench/gpu_checks.py --out "$WORK/gpu_checks.json" > "$WORK/gpu_checks.log" 2>&1 &
for name in easy-vqa scenes vqa-rad vqa-rad-blind; do
    timeout "$VLM_SECONDS" $PY bench/vlm_results.py "$name" --device "${VLM_DEVICE:-cuda}" --results "$WORK" \
        $( [ -n "${QUICK:-}" ] && echo --quick ) > "$WORK/vlm-$name.log" 2>&1 &
done
(OUT="$WORK/moe_balance" DEVICE=cuda timeout "$VLM_SECONDS" bash bench/moe_balance.sh > "$WORK/moe-balance.log" 2>&1) &
timeout "$VLM_SECONDS" bash bench/translate_enid_gpu.sh "$WORK/enid-gpu" "$MINUTES" > "$WORK/translate.log" 2>&1
echo "translate_enid_gpu.sh: exit $?"
wait
tail -n 3 "$WORK"/*.log

# Pack: every log and JSON (no checkpoints), and each VLM run's best model weights.
(cd "$WORK" && find . -name '*.safetensors' -prune -o -type f -print | grep -v '/checkpoints/' |
    tar czf "$OUT/results.tgz" -T -)
for run in "$WORK"/vlm_*/run; do
    [ -f "$run/checkpoints.json" ] || continue
    best=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['best'])" "$run/checkpoints.json")
    name=$(basename "$(dirname "$run")")
    (cd "$WORK" && tar czf "$OUT/$name.tgz" "$name/run/checkpoints/$best/model.safetensors" \
        "$name/run/checkpoints/$best/trainer_state.json" "$name/run/checkpoints.json")
done
ls -la "$OUT"
