"""The LoRA step benchmark runs and prints its documented format (no timing assertions)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO


def test_bench_smoke_prints_one_json_line_per_variant_and_ratios(tmp_path):
    variants = ["floor", "peft", "vlm_lora", "vlm_lora_dora", "floor_gc", "vlm_lora_gc"]
    result = subprocess.run([sys.executable, str(REPO / "bench" / "lora_step.py"), "--preset", "tiny", "--steps", "1",
                             "--warmup", "0", "--variants", ",".join(variants)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in rows[:-1]] == variants
    for row in rows[:-1]:
        assert {"step_s", "tokens_per_s", "peak_mib", "trainable", "preset", "batch", "seq"} <= set(row)
        assert row["step_s"] > 0 and row["trainable"] > 0
    by_name = {r["variant"]: r for r in rows[:-1]}
    assert by_name["peft"]["trainable"] == by_name["vlm_lora"]["trainable"]  # same targets and ranks
    assert set(rows[-1]["ratios"]) == {"peft", "vlm_lora", "vlm_lora_dora", "vlm_lora_gc"}
    (tmp_path / "r.jsonl").write_text(result.stdout)
    plot = subprocess.run([sys.executable, str(REPO / "bench" / "plot_results.py"), str(tmp_path / "r.jsonl"),
                           str(tmp_path / "chart.png")], capture_output=True, text=True)
    assert plot.returncode == 0, plot.stderr[-2000:]
    assert (tmp_path / "chart.png").stat().st_size > 10_000


@pytest.mark.slow
def test_bench_qwen_preset_runs_floor_peft_and_vlm_lora_side_by_side():
    """The Qwen2.5-VL path of the bench (flattened patches, image_grid_thw, fused-qkv vision LoRA) on tiny shapes."""
    variants = ["floor", "peft", "vlm_lora", "floor_vision", "peft_vision", "vlm_lora_vision"]
    result = subprocess.run([sys.executable, str(REPO / "bench" / "lora_step.py"), "--preset", "qwen-tiny", "--steps",
                             "1", "--warmup", "0", "--variants", ",".join(variants)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["variant"]: r for r in map(json.loads, result.stdout.splitlines()[:-1])}
    assert list(rows) == variants and rows["floor"]["seq"] == 1 + 4 + 8  # vision start + 4 image + 8 text tokens
    assert rows["peft"]["trainable"] == rows["vlm_lora"]["trainable"] > rows["floor"]["trainable"]
    assert rows["vlm_lora_vision"]["trainable"] > rows["vlm_lora"]["trainable"]


def test_quantizing_after_a_variant_leaves_no_full_precision_copy_of_the_decoder():
    """The step bench quantizes the base after the eager variants; were their layers still alive, the old
    linears' weights would stay allocated and count in the QLoRA row's memory."""
    import gc
    import weakref
    from types import SimpleNamespace

    pytest.importorskip("bitsandbytes")
    sys.path.insert(0, str(REPO / "bench"))
    import lora_step

    preset = lora_step.PRESETS["tiny"]
    model = lora_step.build_model(preset, "cpu", torch.float32)
    arch = lora_step.ARCH[preset.get("arch", "llava")]
    batch = lora_step.make_batch(preset, model, "cpu", torch.float32)
    old = [weakref.ref(m.weight) for n, m in model.named_modules()
           if n.startswith("model.language_model") and type(m) is torch.nn.Linear]
    args = SimpleNamespace(device="cpu", profile_dir=None)
    assert lora_step.run_variant(model, "vlm_lora", arch, [batch], args, None, 1, 0)["step_s"] > 0
    lora_step.quantize_language_decoder(model)
    gc.collect()
    assert old and all(ref() is None for ref in old)


@pytest.mark.parametrize("preset", ["tiny", "qwen-tiny"])
def test_shorter_batches_keep_the_image_tokens_and_cut_every_per_token_tensor(preset):
    """``--vary-length``: each shorter batch loses text tokens only, and every per-token tensor alike."""
    sys.path.insert(0, str(REPO / "bench"))
    import lora_step

    p = lora_step.PRESETS[preset]
    model = lora_step.build_model(p, "cpu", torch.float32)
    batch = lora_step.make_batch(p, model, "cpu", torch.float32)
    image = model.config.image_token_id
    shorter = lora_step.shorter_batch(batch, 3)
    assert shorter["input_ids"].shape[1] == batch["input_ids"].shape[1] - 3
    assert (shorter["input_ids"] == image).sum() == (batch["input_ids"] == image).sum()
    for key, value in shorter.items():
        same = batch[key]
        per_token = same.dim() >= 2 and same.shape[:2] == batch["input_ids"].shape
        assert torch.equal(value, same[:, :-3] if per_token else same), key
    assert lora_step.shorter_batch(batch, 0) is batch
    model.train()(**shorter).loss.backward()  # the model accepts it


def test_vision_attention_bench_counts_fewer_attention_calls_when_batched():
    result = subprocess.run([sys.executable, str(REPO / "bench" / "vision_attention.py"), "--pixels", "224",
                             "--images", "2", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    per_chunk, batched, ratio = (json.loads(line) for line in result.stdout.strip().splitlines())
    # 224 px: 16 x 16 patches, 2 x 2 windows of 8 x 8 per image; 28 windowed layers, 4 full-attention ones
    assert per_chunk["attention_calls"] == 28 * 2 * 4 + 4 * 2 and batched["attention_calls"] == 32
    assert ratio["speedup"] > 0


def test_the_profiled_steps_do_not_create_the_optimizer_state(tmp_path, monkeypatch):
    """The step bench's profile records steady steps: AdamW fills its zeroed moments (a memset per tensor
    on CUDA) in an unrecorded step first, so the recorded ones show no one-time state creation."""
    sys.path.insert(0, str(REPO / "bench"))
    import lora_step

    steps_seen = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            steps_seen.append((torch.autograd._profiler_enabled(), len(self.state)))
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    preset = lora_step.PRESETS["tiny"]
    model = lora_step.build_model(preset, "cpu", torch.float32)
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    batch = lora_step.make_batch(preset, model, "cpu", torch.float32)
    lora_step.profile_variant(model, [batch], "cpu", None, str(tmp_path / "ops.txt"))
    recorded = [state for profiled, state in steps_seen if profiled]
    assert len(recorded) == 2 and all(state > 0 for state in recorded), steps_seen
