"""bench/scale.py on CPU: the Qwen2.5-VL-72B path (random weights made per shard, FSDP and FSDP + QLoRA)
with 2 decoder layers, 2 vision blocks and widths / 64, on 2 gloo processes."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_scale_bench_runs_both_setups_on_cpu():
    pytest.importorskip("bitsandbytes")
    sys.path.insert(0, str(REPO / "bench"))
    from scale import qwen_config

    from vlm_lora.train.sharded_load import meta_model

    expected = sum(p.numel() for p in meta_model(qwen_config(2, 2, 64), "float32").parameters())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(REPO / "bench" / "scale.py"), "--layers", "2", "--vision-layers", "2", "--shrink", "64",
                             "--batch", "1", "--length", "32", "--steps", "1", "--dtype", "float32"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["setup"]: row for row in map(json.loads, (l for l in result.stdout.splitlines() if l.startswith("{")))}
    assert set(rows) == {"fsdp", "fsdp_qlora"}
    for row in rows.values():
        assert row["world"] == 2 and row["text_layers"] == 2 and row["params_b"] == round(expected / 1e9, 3)
        assert row["steps_per_s"] > 0 and row["tokens_per_s"] > 0 and row["mfu"] is None  # no peak FLOPs on CPU
        assert len(row["peak_mem_mib"]) == 2
    assert rows["fsdp"]["linears_4bit"] == 0 and rows["fsdp_qlora"]["linears_4bit"] == 2 * 7  # q k v o gate up down
