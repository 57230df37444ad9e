#!/usr/bin/env bash
# The README's performance rows on one GPU, in three calls of under 10 minutes made back to back on one
# machine (JSON lines and profiler tables in $OUT; e2e rows also appended to bench/results/e2e_*.jsonl):
#   bash bench/gpu_perf.sh llava   end to end on LLaVA-1.5-7B shapes: floor (compiled), hf_peft, vlm_lora,
#                                  vlm_lora_compile
#   bash bench/gpu_perf.sh family  the LoRA family on the step bench (floor, LoRA, DoRA, VeRA, DyLoRA, AdaLoRA,
#                                  QLoRA), profiled; then end to end E2E_SYSTEMS (default hf_peft_compile) on
#                                  the llava shapes (rows join llava's through bench/results/); none skips them
#   bash bench/gpu_perf.sh qwen    end to end on Qwen2.5-VL-7B shapes: hf_peft, vlm_lora, vlm_lora_compile (both
#                                  with the batched vision attention of the default), vlm_lora_per_chunk_vision
#   bash bench/gpu_perf.sh step    the LoRA step alone: floor, PEFT, vlm-lora (model's loss / labelled head), DoRA,
#                                  and regionally compiled floor and vlm-lora, every variant profiled; VARY=8 gives
#                                  the steps 8 sequence lengths in turn (a new length per step, as in a run)
# PROFILE=FIRST,COUNT (llava, qwen): every system's steps FIRST.. recorded with torch.profiler ($OUT/<system>_profile/:
# summary.json, ops.txt, trace.json.gz), the way `train.profile_steps` records a vlm-lora run.
# Batch sizes: the presets' (LLaVA 16, Qwen 32: an H200's memory), or LLAVA_BATCH / QWEN_BATCH (8 fits an H100).
# E2E_STEPS=200 (llava, family): the total-time comparison (steps of one epoch; default the preset's 24).
# STEP_STEPS: timed steps of the step bench (default 5).
# HF systems get as many DataLoader workers as vlm-lora's default (CPUs - 1, at most 8).
# Wheels the GPU image lacks (pydantic, ...) are installed from .whl/ when it is there.
# CPU analogue (tiny presets, same code paths): DEVICE=cpu bash bench/gpu_perf.sh llava
set -u
PROFILE_ARGS=${PROFILE:+--profile $PROFILE}
copy_profiles() {  # $1: e2e work folder
  for d in "$1"/run_*/profile; do
    [ -d "$d" ] || continue
    s=$(basename "$(dirname "$d")"); s=${s#run_}; mkdir -p "$OUT/profiles/$s"
    cp "$d"/summary.json "$d"/ops.txt "$OUT/profiles/$s/" 2>/dev/null
    gzip -c "$d"/trace.json > "$OUT/trace_$s.json.gz" 2>/dev/null
  done
}
# $OUT returns at most 8 files: everything but the traces travels as one results.tgz
pack_out() { (cd "$OUT" && tar czf /tmp/results.tgz --exclude='trace_*' . && find . -mindepth 1 ! -name 'trace_*' -delete \
  && mv /tmp/results.tgz .); }
trap pack_out EXIT
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TORCH_LOGS=${TORCH_LOGS:-recompiles}
MODE=${1:-llava}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/prof bench/results
DEVICE=${DEVICE:-cuda}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/.whl/site:$PWD  # .whl/site: unpacked packages (bitsandbytes, its CUDA 13 builds)
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "$DEVICE" = cuda ]; then
  LB=${LLAVA_BATCH:-16}; QB=${QWEN_BATCH:-32}
  STEP="--device cuda --preset llava-7b --batch $LB --steps ${STEP_STEPS:-5} --warmup 2"
  LLAVA="--device cuda --preset llava-7b --batch $LB --skip 4 ${E2E_STEPS:+--steps $E2E_STEPS}"; QWEN="--device cuda --preset qwen2.5-vl-7b --batch $QB --skip 4"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/gpu.txt"
else
  LB=4; QB=4; STEP="--preset tiny --steps 1 --warmup 0"; LLAVA="--preset tiny --skip 1"; QWEN="--preset qwen-tiny --skip 1"
fi
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
nproc | sed 's/^/cpus /' | tee -a "$OUT/gpu.txt"

case "$MODE" in
  llava)
    echo "== e2e ($LLAVA)"
    timeout ${E2E_TIMEOUT:-560} python3 bench/e2e.py $LLAVA $PROFILE_ARGS --systems ${E2E_SYSTEMS:-floor,hf_peft,vlm_lora,vlm_lora_compile} \
      --system-timeout ${SYSTEM_TIMEOUT:-260} --work /tmp/e2e_llava --results bench/results/e2e_llava_b$LB.jsonl \
      2>"$OUT/e2e_llava.err" | tee "$OUT/e2e_llava.log"
    cp bench/results/e2e_llava_b$LB.jsonl /tmp/e2e_llava/*.log "$OUT/" 2>/dev/null
    copy_profiles /tmp/e2e_llava
    ;;
  family)
    echo "== LoRA step, batch $LB: the LoRA family next to LoRA, profiled"
    timeout ${STEP_TIMEOUT:-270} python3 bench/lora_step.py $STEP --variants \
      ${VARIANTS:-floor,vlm_lora,vlm_lora_head,vlm_lora_dora,peft_vera,vlm_lora_vera,vlm_lora_dylora,vlm_lora_adalora,vlm_lora_qlora} \
      --profile-dir /tmp/prof 2>"$OUT/step.err" | tee "$OUT/step_family_b$LB.jsonl"
    for f in /tmp/prof/profile_*.txt; do echo "== $(basename "$f" .txt)"; cat "$f"; done > "$OUT/profiles.txt"
    [ "${E2E_SYSTEMS:-}" = none ] && { echo "== done"; exit 0; }
    echo "== e2e ${E2E_SYSTEMS:-hf_peft_compile} ($LLAVA)"
    timeout ${E2E_TIMEOUT:-300} python3 bench/e2e.py $LLAVA --systems ${E2E_SYSTEMS:-hf_peft_compile} \
      --system-timeout 280 --work /tmp/e2e_llava --results bench/results/e2e_llava_b$LB.jsonl \
      2>"$OUT/e2e_llava.err" | tee "$OUT/e2e_llava.log"
    cp bench/results/e2e_llava_b$LB.jsonl /tmp/e2e_llava/*.log "$OUT/" 2>/dev/null
    ;;
  qwen)
    echo "== e2e ($QWEN)"
    timeout ${E2E_TIMEOUT:-560} python3 bench/e2e.py $QWEN $PROFILE_ARGS --systems ${E2E_SYSTEMS:-hf_peft,vlm_lora,vlm_lora_compile,vlm_lora_per_chunk_vision} \
      --system-timeout ${SYSTEM_TIMEOUT:-170} \
      --work /tmp/e2e_qwen --results bench/results/e2e_qwen_b$QB.jsonl 2>"$OUT/e2e_qwen.err" | tee "$OUT/e2e_qwen.log"
    cp bench/results/e2e_qwen_b$QB.jsonl /tmp/e2e_qwen/*.log "$OUT/" 2>/dev/null
    copy_profiles /tmp/e2e_qwen
    ;;
  step)
    echo "== LoRA step, batch $LB: eager and regionally compiled, lm_head on every / labelled position, profiled"
    timeout ${STEP_TIMEOUT:-250} python3 bench/lora_step.py $STEP --variants \
      ${VARIANTS:-floor,peft,vlm_lora,vlm_lora_head,vlm_lora_dora,floor_compile,vlm_lora_compile,vlm_lora_compile_head} \
      --vary-length ${VARY:-1} --profile-dir /tmp/prof 2>"$OUT/step.err" | tee "$OUT/step_b${LB}_lengths${VARY:-1}.jsonl"
    for f in /tmp/prof/profile_*.txt; do echo "== $(basename "$f" .txt)"; cat "$f"; done > "$OUT/profiles.txt"
    ;;
  *) echo "unknown mode $MODE; valid: llava, family, qwen, step"; exit 2 ;;
esac
echo "== done"
