#!/usr/bin/env bash
# Every row of the README's performance section on one H200, in three calls of under ~8 minutes made
# back to back on one machine (JSON lines and profiler tables in $OUT):
#   bash bench/gpu_perf.sh step    GPU tests, then the LoRA step bench on LLaVA-1.5-7B shapes: every variant
#                                  (floor / PEFT / vlm-lora; vision, DoRA, checkpointing, QLoRA), profiled
#   bash bench/gpu_perf.sh llava   end to end vs HF Trainer + PEFT, LLaVA-1.5-7B shapes: padded, Liger, packed, compiled
#   bash bench/gpu_perf.sh qwen    end to end on Qwen2.5-VL-7B shapes, then the checkpointing step rows once more
#                                  (run-to-run stability) and the compiled step rows
# Wheels the GPU image lacks (pydantic, liger-kernel, ...) are installed from .whl/ when it is there.
# CPU analogue (small presets, same code paths): DEVICE=cpu bash bench/gpu_perf.sh llava
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
MODE=${1:-step}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
if [ "$DEVICE" = cuda ]; then
  STEP="--device cuda --preset llava-7b"; LLAVA="--device cuda --preset llava-7b"; QWEN="--device cuda --preset qwen2.5-vl-7b"
  LIGER=$(python3 -c "import liger_kernel" 2>/dev/null && echo ,vlm_lora_liger)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/gpu.txt"
else
  STEP="--preset tiny --steps 1 --warmup 0"; LLAVA="--preset tiny --steps 4 --skip 1"; QWEN="--preset qwen-tiny --steps 4 --skip 1"
  LIGER=""
fi
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
mkdir -p /tmp/prof

case "$MODE" in
  step)
    if [ "$DEVICE" = cuda ]; then
      echo "== GPU tests"; timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -4 | tee "$OUT/gpu_tests.txt"
    fi
    echo "== LoRA step, every variant, profiled"
    variants=floor,peft,vlm_lora,floor_vision,peft_vision,vlm_lora_vision,peft_dora,vlm_lora_dora,floor_gc,peft_gc,vlm_lora_gc
    variants=$variants,peft_qlora,vlm_lora_qlora
    timeout 380 python3 bench/lora_step.py $STEP --variants $variants --profile-dir /tmp/prof 2>"$OUT/step.err" | tee "$OUT/step.jsonl"
    for f in /tmp/prof/profile_*.txt; do echo "== $(basename "$f" .txt)"; cat "$f"; done > "$OUT/profiles.txt"
    ;;
  llava)
    echo "== e2e ($LLAVA)"
    timeout 420 python3 bench/e2e.py $LLAVA --systems hf_peft,vlm_lora$LIGER,vlm_lora_packed,vlm_lora_compile \
      --work /tmp/e2e_llava 2>"$OUT/e2e_llava.err" | tee "$OUT/e2e_llava.jsonl"
    ;;
  qwen)
    echo "== e2e ($QWEN)"
    timeout 300 python3 bench/e2e.py $QWEN --systems hf_peft,vlm_lora,vlm_lora_packed$LIGER \
      --work /tmp/e2e_qwen 2>"$OUT/e2e_qwen.err" | tee "$OUT/e2e_qwen.jsonl"
    echo "== LoRA step: checkpointing modes (second run), compiled decoder layers"
    variants=floor,vlm_lora,floor_gc,vlm_lora_gc,floor_gcsel,vlm_lora_gcsel,floor_gcoff,vlm_lora_gcoff,floor_compile,vlm_lora_compile
    timeout 220 python3 bench/lora_step.py $STEP --variants $variants 2>>"$OUT/step.err" | tee "$OUT/step_checkpointing_compile.jsonl"
    ;;
  *) echo "unknown mode $MODE; valid: step, llava, qwen"; exit 2 ;;
esac
echo "== done"
