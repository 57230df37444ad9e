#!/usr/bin/env bash
# Second GPU pass: the full bench (gradient checkpointing now in train mode) with torch.profiler tables.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_lora_layer.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
timeout 330 python3 bench/lora_step.py --device cuda --preset llava-7b 2>/dev/null | tee "$OUT/bench_gpu.jsonl"
mkdir -p /tmp/prof
timeout 60 python3 bench/lora_step.py --device cuda --preset llava-7b --variants floor,peft,vlm_lora --steps 3 --warmup 2 --profile-dir /tmp/prof 2>/dev/null | tail -1
cat /tmp/prof/profile_floor.txt /tmp/prof/profile_peft.txt /tmp/prof/profile_vlm_lora.txt > "$OUT/profiles.txt" 2>/dev/null
head -30 /tmp/prof/profile_vlm_lora.txt | cut -c1-160
