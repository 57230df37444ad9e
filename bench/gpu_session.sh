#!/usr/bin/env bash
# Everything this project measures on a lent GPU machine, in one call (outputs in $OUT).
#   bash bench/gpu_session.sh           GPU tests, the LoRA step benchmark on LLaVA-1.5-7B shapes, then "scaling"
#   bash bench/gpu_session.sh scaling   only the multi-GPU part (2 GPUs, under 8 minutes): bench/scaling.py rows
#                                       (1 GPU, DDP 2 with and without the host's threads, FSDP 2, FSDP+QLoRA 2)
#                                       on the 1.3B LLaVA-shaped model, then an FSDP run with eval, checkpoints
#                                       and --resume, an FSDP+QLoRA run with eval, and the accelerate FSDP config
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
MODE=${1:-all}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__)" | tee -a "$OUT/gpu.txt"

if [ "$MODE" = all ]; then
  echo "== GPU tests"; timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
  echo "== bench (llava-7b shapes)"
  timeout 420 python3 bench/lora_step.py --device cuda --preset llava-7b 2>/dev/null | tee "$OUT/bench_gpu.jsonl"
fi

NGPU=$(nvidia-smi -L | wc -l)
if [ "$NGPU" -ge 2 ]; then
  echo "== scaling (1.3B LLaVA-shaped, batch 16 per GPU)"
  python3 bench/make_llava_shaped.py /tmp/llava-shaped 2>&1 | tail -1
  timeout 280 python3 bench/scaling.py --preset llava-1b --model /tmp/llava-shaped --timeout 90 \
    --setups 1proc,ddp2,ddp2_1thread,fsdp2,fsdp2_qlora | tee "$OUT/scaling.jsonl"

  echo "== FSDP / FSDP+QLoRA with eval, checkpoints and resume"
  run="python3 -m torch.distributed.run --nproc_per_node 2 -m vlm_lora finetune recipes/quickstart.yaml"
  common="--set model.path=/tmp/llava-shaped --set model.dtype=bfloat16 --set train.mixed_precision=bf16 --set train.batch_size=16 --set train.max_steps=20 --set train.save_steps=10 --set train.eval_steps=10 --set train.eval_samples=32 --set train.eval_base=false --set train.max_new_tokens=16 --set train.log_steps=10 --set train.fsdp=true --overwrite"
  for variant in fsdp qlora; do
    extra=""; [ "$variant" = qlora ] && extra="--set model.quantization.bits=4"
    dir=/tmp/run_$variant
    timeout 75 $run $common $extra --set output_dir=$dir 2>&1 | grep -E "done|error|Error" | tail -3
    cp -r $dir/adapter_last /tmp/${variant}_uninterrupted 2>/dev/null
    [ "$variant" = fsdp ] && timeout 60 $run $common $extra --set output_dir=$dir --resume 2>&1 | grep -E "resuming|done|error|Error" | tail -3
    python3 - "$variant" "$dir" <<'EOF' | tee -a "$OUT/fsdp_checks.jsonl"
import json, sys
from safetensors.torch import load_file
variant, run = sys.argv[1], sys.argv[2]
try:
    a, b = load_file(f"/tmp/{variant}_uninterrupted/adapter_model.safetensors"), load_file(f"{run}/adapter_last/adapter_model.safetensors")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a) if variant == "fsdp" else None  # resumed
    evals = json.load(open(f"{run}/eval.json"))
    print(json.dumps({"check": f"{variant}_eval_checkpoint", "tensors": len(a), "resume_max_abs_diff": diff,
                      "adapted": {k: evals["adapted"].get(k) for k in ("cider", "n", "best_step")}}))
except Exception as error:  # report and go on: the other rows still print
    print(json.dumps({"check": f"{variant}_eval_checkpoint", "error": repr(error)}))
EOF
  done
  echo "== accelerate FSDP config"
  timeout 60 python3 -m accelerate.commands.launch --config_file recipes/accelerate/fsdp.yaml -m vlm_lora finetune recipes/quickstart.yaml \
    $common --set train.max_steps=10 --set output_dir=/tmp/run_yaml 2>&1 | grep -E "done|error|Error" | tail -3 | tee "$OUT/fsdp_yaml.txt"
fi
echo "== done"
