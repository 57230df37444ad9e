"""train.batched_vision_attention: the Qwen-VL vision towers' chunked attention, batched by chunk length, gives
the per-chunk path's outputs and gradients (windows and images of several lengths, in mixed order)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlm_lora.train.vision_attention import ChunkPlan, PlanCache, batch_vision_attention, chunked_attention


def _tower_outputs_and_grads(model, batch):
    visual = model.model.visual
    visual.zero_grad(set_to_none=True)
    out = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    merged = out.pooler_output if hasattr(out, "pooler_output") else out
    (merged.float() ** 2).sum().backward()
    return merged.detach(), {n: p.grad.clone() for n, p in visual.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_batched_chunks_give_the_per_chunk_outputs_and_gradients(tmp_path, family):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_lora.architectures.tiny_processors import save_tiny_family
    from vlm_lora.data.collate import ChatCollator
    from vlm_lora.data.datasets import CaptionExample

    folder = save_tiny_family(family, tmp_path / family)
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa").train()
    items = [(Image.new("RGB", size, (60 * i, 90, 200)), CaptionExample(f"{i}.png", ["a cell"], row=i))
             for i, size in enumerate([(40, 64), (48, 48), (64, 40)])]
    batch = ChatCollator(AutoProcessor.from_pretrained(folder))(items)
    grid = batch["image_grid_thw"]
    assert len({tuple(g) for g in grid.tolist()}) == 3  # three image sizes: chunks of several lengths, interleaved
    cu_seqlens = torch.tensor([0, *torch.cumsum(grid.prod(-1), 0).tolist()])
    assert ChunkPlan(cu_seqlens).order is not None  # the per-image (full attention) chunks need regrouping
    torch.manual_seed(0)
    plain_out, plain_grads = _tower_outputs_and_grads(model, batch)
    assert batch_vision_attention(model) == len(model.model.visual.blocks)
    batched_out, batched_grads = _tower_outputs_and_grads(model, batch)
    torch.testing.assert_close(batched_out, plain_out, atol=1e-6, rtol=1e-5)
    assert plain_grads.keys() == batched_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(batched_grads[name], grad, atol=1e-6, rtol=1e-5)


def test_a_plan_groups_chunks_by_length_and_restores_the_order():
    cu_seqlens = torch.tensor([0, 4, 6, 10, 12, 15])  # lengths 4, 2, 4, 2, 3
    plan = ChunkPlan(cu_seqlens)
    assert plan.groups == [(4, 2), (2, 2), (3, 1)]
    assert plan.order.tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 4, 5, 10, 11, 12, 13, 14]
    assert ChunkPlan(torch.tensor([0, 3, 6])).order is None  # equal chunks: no gather
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 15, 8, generator=g) for _ in range(3))
    out = chunked_attention(query, key, value, plan, 8 ** -0.5)  # [15, heads, d]
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        expected = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], scale=8 ** -0.5)
        torch.testing.assert_close(out[start:end], expected[0].transpose(0, 1))


def test_the_plan_cache_never_matches_a_new_tensor():
    cache = PlanCache()
    first = torch.tensor([0, 2, 4])
    assert cache.get(first) is cache.get(first)
    plan = cache.get(first)
    del first
    other = torch.tensor([0, 3, 4])
    assert cache.get(other).groups == [(3, 1), (1, 1)] and cache.get(other) is not plan


def test_the_option_is_refused_for_a_model_without_chunked_vision_attention(tiny_llava):
    from types import SimpleNamespace

    from vlm_lora.train.speed import SpeedOptionError, apply_speed_options

    cfg = SimpleNamespace(kernels="none", gradient_checkpointing="none", compile=False, batched_vision_attention=True)
    with pytest.raises(SpeedOptionError, match="train.batched_vision_attention: this model has no chunked"):
        apply_speed_options(tiny_llava, cfg)


def test_the_recipe_switch_batches_every_vision_layer_of_a_qwen_model():
    from types import SimpleNamespace

    from vlm_lora.architectures.tiny_families import tiny_family_model
    from vlm_lora.train.speed import apply_speed_options

    model = tiny_family_model("qwen2_5_vl")
    cfg = SimpleNamespace(kernels="none", gradient_checkpointing="none", compile=False, batched_vision_attention=True)
    apply_speed_options(model, cfg)
    assert all(block.attn.forward.__func__.__name__ == "_batched_forward" for block in model.model.visual.blocks)


@pytest.mark.parametrize("release, batched", [((5, 25), True), ((5, 17), True), ((5, 26), False), ((4, 57), False)])
def test_auto_batches_qwen_vision_only_for_checked_transformers_releases(monkeypatch, caplog, release, batched):
    """The default (auto) batches a Qwen tower when the installed transformers is a release the replaced
    forward was checked against, and otherwise leaves transformers' forward and says why."""
    from types import SimpleNamespace

    from vlm_lora.architectures.tiny_families import tiny_family_model
    from vlm_lora.recipe import TrainConfig
    from vlm_lora.train import vision_attention
    from vlm_lora.train.speed import apply_speed_options

    assert TrainConfig().batched_vision_attention == "auto"
    monkeypatch.setattr(vision_attention, "transformers_release", lambda: release)
    model = tiny_family_model("qwen2_5_vl")
    cfg = SimpleNamespace(kernels="none", gradient_checkpointing="none", compile=False, batched_vision_attention="auto")
    with caplog.at_level("INFO", logger="vlm_lora.train.vision_attention"):
        apply_speed_options(model, cfg)
    names = {block.attn.forward.__func__.__name__ for block in model.model.visual.blocks}
    assert names == ({"_batched_forward"} if batched else {"forward"})
    assert ("outside the checked releases" in caplog.text) is not batched


def test_auto_keeps_an_eager_attention_tower_as_it_is():
    """auto changes only SDPA towers: a model loaded with attn_implementation="eager" keeps its kernels."""
    from types import SimpleNamespace

    from vlm_lora.architectures.tiny_families import tiny_family_model
    from vlm_lora.train.speed import apply_speed_options

    model = tiny_family_model("qwen2_5_vl")
    model.model.visual.config._attn_implementation = "eager"
    cfg = SimpleNamespace(kernels="none", gradient_checkpointing="none", compile=False, batched_vision_attention="auto")
    apply_speed_options(model, cfg)
    assert {block.attn.forward.__func__.__name__ for block in model.model.visual.blocks} == {"forward"}


def test_auto_leaves_a_model_without_chunked_vision_attention_alone(tiny_llava):
    from types import SimpleNamespace

    from vlm_lora.train.speed import apply_speed_options

    cfg = SimpleNamespace(kernels="none", gradient_checkpointing="none", compile=False, batched_vision_attention="auto")
    assert apply_speed_options(tiny_llava, cfg) is tiny_llava


def test_compiled_batched_blocks_match_the_per_chunk_path_and_break_only_at_the_plan(tmp_path):
    """train.compile with train.batched_vision_attention: every vision block compiles with one break, at the
    plan lookup (the host read of the chunk lengths), and the tower's outputs and gradients stay those of
    the eager per-chunk path."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_lora.architectures.tiny_processors import save_tiny_family
    from vlm_lora.data.collate import ChatCollator
    from vlm_lora.data.datasets import CaptionExample
    from vlm_lora.train.speed import checkpointable_layers, compile_decoder_layers

    folder = save_tiny_family("qwen2_5_vl", tmp_path / "qwen")
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa").train()
    items = [(Image.new("RGB", size, (60 * i, 90, 200)), CaptionExample(f"{i}.png", ["a cell"], row=i))
             for i, size in enumerate([(40, 64), (48, 48)])]
    batch = ChatCollator(AutoProcessor.from_pretrained(folder))(items)
    plain_out, plain_grads = _tower_outputs_and_grads(model, batch)
    batch_vision_attention(model)
    torch._dynamo.reset()
    counters.clear()
    visual = model.model.visual
    try:
        assert compile_decoder_layers(visual, backend="aot_eager") == len(visual.blocks)
        for _ in range(2):  # the second pass runs the cached graphs
            compiled_out, compiled_grads = _tower_outputs_and_grads(model, batch)
        torch.testing.assert_close(compiled_out, plain_out, atol=1e-5, rtol=1e-4)
        assert compiled_grads.keys() == plain_grads.keys()
        for name, grad in plain_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-4)
        breaks = dict(counters["graph_break"])
        assert len(breaks) == 1 and "disable" in next(iter(breaks)).lower(), breaks
    finally:
        for layer in checkpointable_layers(visual):
            layer._compiled_call_impl = None
        torch._dynamo.reset()
