#!/usr/bin/env bash
# Everything this project measures on a lent GPU machine, in one call (outputs in $OUT):
# GPU tests, the LoRA step benchmark on LLaVA-1.5-7B shapes, and a DDP throughput run on 1 vs 2 GPUs.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__)" | tee -a "$OUT/gpu.txt"

echo "== GPU tests"; timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"

echo "== bench (llava-7b shapes)"
timeout 420 python3 bench/lora_step.py --device cuda --preset llava-7b 2>/dev/null | tee "$OUT/bench_gpu.jsonl"

NGPU=$(nvidia-smi -L | wc -l)
if [ "$NGPU" -ge 2 ]; then
  echo "== DDP throughput"
  python3 bench/make_llava_shaped.py /tmp/llava-shaped 2>&1 | tail -1
  common="--set model.path=/tmp/llava-shaped --set model.dtype=bfloat16 --set data.eval=null --set train.max_steps=40 --set train.batch_size=16 --set train.log_steps=10 --set train.save_steps=null --set train.mixed_precision=bf16"
  timeout 200 python3 -m vlm_lora finetune recipes/quickstart.yaml $common --set output_dir=/tmp/ddp1 2>&1 | grep -E "done:|Error|error" | tee "$OUT/ddp1.txt"
  timeout 200 python3 -m accelerate.commands.launch --num_processes 2 --multi_gpu -m vlm_lora finetune recipes/quickstart.yaml $common --set output_dir=/tmp/ddp2 2>&1 | grep -E "done:|rank|Error|error" | tee "$OUT/ddp2.txt"
  cp /tmp/ddp1/metrics.jsonl "$OUT/ddp1_metrics.jsonl" 2>/dev/null; cp /tmp/ddp2/metrics.jsonl "$OUT/ddp2_metrics.jsonl" 2>/dev/null
fi
echo "== done"
