#!/usr/bin/env bash
# One shot on a GPU machine (about 6-8 minutes on one H100): install the wheels that
# ../shared/device/make-wheels.sh collected into .whl/, then in one run
#   1. the gpu-qwen preset (Qwen2.5-1.5B -> 0.5B shapes, random weights) for naive, Liger and dsdistill
#      at 8,192 and 16,384 tokens per optimizer step: tokens/s, peak GiB, MFU, ratios to naive;
#   2. the head alone, one profiled step: naive, fused eager, fused compiled (bench/head_profile.py);
#   3. the bytes per logit outside the GEMMs (bench/traffic.py, the eager count).
# Tables go to stdout and JSON to $OUT (default /tmp/dsdistill-gpu, or the device tool's $OUT).
#   bash bench/gpu.sh                     # PEAK_TFLOPS=989 (H100 bf16 dense), STEPS=4
set -euo pipefail
cd "$(dirname "$0")/.."
PEAK="${PEAK_TFLOPS:-989}"
STEPS="${STEPS:-4}"
OUT="${OUT:-/tmp/dsdistill-gpu}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__, '| cuda', torch.version.cuda)"
for tokens in 8192 16384; do
  echo "== gpu-qwen, $tokens tokens per step, $STEPS timed steps"
  timeout 240 python3 -m dsdistill.bench --preset gpu-qwen --tokens-per-step "$tokens" --steps "$STEPS" \
    --methods naive,liger,dsdistill,dsdistill-compiled --peak-tflops "$PEAK" --timeout 200 \
    --out "$OUT/bench-$tokens.json" || echo "(gpu-qwen at $tokens: failed or timed out)"
done
echo "== the head alone, one profiled step"
timeout 120 python3 bench/head_profile.py --repeat 3 --top 10 | tee "$OUT/head_profile.txt" || echo "(head profile: failed)"
echo "== bytes per logit outside the GEMMs (eager)"
timeout 60 python3 bench/traffic.py --vocab 151936 --rows 1024 | tee "$OUT/traffic.txt" || echo "(traffic: failed)"
