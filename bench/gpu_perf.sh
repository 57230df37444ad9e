#!/usr/bin/env bash
# Performance on one GPU, in one call of at most ~8 minutes (JSON lines; copies in $OUT):
#   1. end to end, LLaVA-1.5-7B shapes: HF Trainer + PEFT vs vlm-lora (padded, packed, compiled, Liger)
#   2. the LoRA step under each gradient checkpointing mode, twice (run-to-run stability)
# Wheels the GPU image lacks (pydantic, liger-kernel, ...) are installed from .whl/ when it is there.
# CPU analogue (small presets, same code paths): DEVICE=cpu bash bench/gpu_perf.sh
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
if [ "$DEVICE" = cuda ]; then
  E2E="--device cuda --preset llava-7b"; STEP="--device cuda --preset llava-7b"; T_E2E=320; T_STEP=90
  LIGER=$(python3 -c "import liger_kernel" 2>/dev/null && echo ,vlm_lora_liger)
  SYSTEMS=${SYSTEMS:-hf_peft,vlm_lora$LIGER,vlm_lora_packed,vlm_lora_compile}  # most wanted first: a timeout cuts the tail
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
else
  E2E="--preset tiny --steps 4 --skip 1"; STEP="--preset tiny --steps 1 --warmup 0"; T_E2E=1200; T_STEP=600
  SYSTEMS=${SYSTEMS:-hf_peft,vlm_lora,vlm_lora_packed}
fi
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"

echo "== e2e ($E2E)"
timeout $T_E2E python3 bench/e2e.py $E2E --systems $SYSTEMS --work /tmp/e2e_$DEVICE 2>"$OUT/e2e.err" | tee "$OUT/e2e.jsonl"

for run in 1 2; do
  echo "== lora step, checkpointing modes, run $run"
  timeout $T_STEP python3 bench/lora_step.py $STEP --variants checkpointing 2>>"$OUT/step.err" | tee "$OUT/step_checkpointing_$run.jsonl"
done
echo "== done"
