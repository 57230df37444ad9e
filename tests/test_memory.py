"""Memory per rank: the estimate's parts against bytes counted by hand, ``plan --gpus``, the CPU peak."""

import resource

import pytest

from conftest import REPO


@pytest.fixture
def quickstart():
    from vlm_lora.recipe import load_recipe

    return lambda *overrides: load_recipe(REPO / "recipes" / "quickstart.yaml", list(overrides))


def _bytes(model, prefix: str = "", per_param: float = 4) -> float:
    return sum(p.numel() * per_param for n, p in model.named_parameters() if n.startswith(prefix))


def test_estimate_counts_weights_units_and_state(tiny_llava, quickstart):
    from vlm_lora.planner import plan
    from vlm_lora.train.memory import ADAM_BYTES, estimate_memory

    recipe = quickstart("train.max_length=64")
    result = plan(tiny_llava, recipe.strategy, recipe.components)
    one = estimate_memory(tiny_llava, result, recipe, gpus=1)
    base = _bytes(tiny_llava) - _bytes(tiny_llava, "model.multi_modal_projector.")  # the connector trains fully
    assert one.weights == base and one.gathered == 0
    assert one.trainable == result.trainable_params * ADAM_BYTES
    assert estimate_memory(tiny_llava, result, recipe, gpus=4).total == one.total  # DDP: every GPU holds it all

    sharded = estimate_memory(tiny_llava, result, quickstart("train.max_length=64", "train.fsdp=true"), gpus=4)
    largest = max(_bytes(layer) for layer in [*tiny_llava.model.language_model.layers,
                                               *tiny_llava.model.vision_tower.encoder.layers])
    assert sharded.weights == base / 4 and sharded.trainable == one.trainable / 4
    assert sharded.gathered == 2 * largest and sharded.activations == one.activations

    longer = estimate_memory(tiny_llava, result, quickstart("train.max_length=128"), gpus=1)
    assert longer.activations > one.activations
    quantized = estimate_memory(tiny_llava, result, quickstart("train.max_length=64", "model.quantization.bits=4"), 1)
    decoder_linears = sum(p.numel() for n, p in tiny_llava.model.language_model.layers.named_parameters()
                          if p.dim() == 2)
    assert quantized.weights == pytest.approx(one.weights - decoder_linears * (4 - 0.5 - 4 / 64))


def test_plan_prints_the_estimate_per_gpu(quickstart, capsys):
    from vlm_lora.cli import build_parser

    args = build_parser().parse_args(["plan", str(REPO / "recipes" / "quickstart.yaml"), "--meta", "--gpus", "2",
                                      "--set", "train.fsdp=true", "--set", "train.max_length=64"])
    args.func(args)
    out = capsys.readouterr().out
    assert "memory estimate per GPU (FSDP over 2 GPUs; batch 16 x 64 tokens, float32" in out
    for part in ("base weights", "gathered FSDP units", "LoRA + optimizer state", "activations", "total per GPU"):
        assert part in out


def test_cpu_peak_is_the_max_resident_set():
    import torch

    from vlm_lora.train.memory import peak_mib, rank_peaks, reset_peak

    before = peak_mib("cpu")
    assert 0 < before <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + 1
    block = torch.ones(int(before * 2 ** 20 / 4))  # a resident block as large as the peak so far
    assert peak_mib("cpu") > 1.5 * before
    del block
    assert rank_peaks("cpu") == [round(peak_mib("cpu"), 1)]  # one process: its own
    reset_peak("cpu")  # the new peak starts at the resident set now
    current = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) / 1024
    assert abs(peak_mib("cpu") - current) < 5
