"""Speed options: checkpointing modes and compile give the eager gradients; Liger and packing refusals."""

from __future__ import annotations

import pytest
import torch

from vlm_lora.recipe import TrainConfig
from vlm_lora.train.speed import (SpeedOptionError, apply_liger, apply_speed_options, checkpointable_layers,
                                  compile_decoder_layers, enable_gradient_checkpointing)


def _adapted_llava():
    import vlm_lora
    from vlm_lora.architectures.tiny_models import FACTORIES

    from tests.conftest import randomize_adapters

    model = FACTORIES["llava"]()
    vlm_lora.plan(model, "language_only").apply(model)
    randomize_adapters(model)
    return model.train()


def _batch(model) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 60, (2, 10), generator=g)
    ids[:, 1:5] = model.config.image_token_id
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=g), "labels": ids.clone()}


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_true_means_full_checkpointing_and_modes_are_validated():
    assert TrainConfig(gradient_checkpointing=True).gradient_checkpointing == "full"
    assert TrainConfig(gradient_checkpointing=False).gradient_checkpointing == "none"
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        TrainConfig(gradient_checkpointing="sometimes")
    with pytest.raises(ValueError, match="kernels"):
        TrainConfig(kernels="triton")


@pytest.mark.parametrize("mode", ["full", "selective", "offload"])
def test_checkpointing_modes_give_the_eager_gradients(mode):
    reference = _adapted_llava()
    loss, grads = _loss_and_grads(reference, _batch(reference))
    model = _adapted_llava()
    enable_gradient_checkpointing(model, mode)
    flags = [layer.gradient_checkpointing for layer in checkpointable_layers(model)]
    assert flags == ([i % 2 == 0 for i in range(len(flags))] if mode == "selective" else [True] * len(flags))
    loss_ckpt, grads_ckpt = _loss_and_grads(model, _batch(model))
    torch.testing.assert_close(loss_ckpt, loss)
    assert any(".lora_A." in n for n in grads) and grads.keys() == grads_ckpt.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-5, rtol=1e-4)


def test_offload_keeps_checkpoint_inputs_on_the_cpu_side():
    """Under offload every tensor saved at a checkpoint goes through save_on_cpu's pack hook."""
    from torch.autograd.graph import saved_tensors_hooks

    model = _adapted_llava()
    enable_gradient_checkpointing(model, "offload")
    packed = []
    original = saved_tensors_hooks.__init__

    def spy(self, pack, unpack):
        original(self, lambda t: packed.append(t.shape) or pack(t), unpack)

    saved_tensors_hooks.__init__ = spy
    try:
        model(**_batch(model)).loss.backward()
    finally:
        saved_tensors_hooks.__init__ = original
    assert len(packed) >= len(checkpointable_layers(model))


@pytest.mark.slow
def test_compiled_decoder_layers_match_eager_without_graph_breaks():
    from torch._dynamo.utils import counters

    reference = _adapted_llava()
    loss, grads = _loss_and_grads(reference, _batch(reference))
    model = _adapted_llava()
    torch._dynamo.reset()
    counters.clear()
    assert compile_decoder_layers(model, backend="aot_eager") == len(checkpointable_layers(model)) > 0
    loss_compiled, grads_compiled = _loss_and_grads(model, _batch(model))
    assert not counters["graph_break"], dict(counters["graph_break"])  # LoRA layers trace as one graph
    assert counters["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(loss_compiled, loss, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_compiled[name], grad, atol=1e-5, rtol=1e-4)


def test_liger_refusals():
    from vlm_lora.architectures.tiny_models import FACTORIES

    model = _adapted_llava()
    with pytest.raises(SpeedOptionError, match="train.kernels: liger runs Triton kernels on a CUDA GPU"):
        apply_speed_options(model, TrainConfig(kernels="liger"))
    model.lm_head.weight.requires_grad_(True)  # trained lm_head: fused linear cross-entropy would skip its grad
    with pytest.raises(SpeedOptionError, match="liger_flce .* lm_head carries LoRA or is trained"):
        apply_liger(model, fused_cross_entropy=True)
    with pytest.raises(SpeedOptionError, match="Liger has no kernels for blip-2"):
        apply_liger(FACTORIES["blip2_opt"]())


@pytest.fixture
def restore_transformers():
    """Liger also patches transformers' Llama/LLaVA modules globally: put them back for later tests."""
    from transformers.models.llama import modeling_llama
    from transformers.models.llava import modeling_llava

    saved = {module: dict(vars(module)) for module in (modeling_llama, modeling_llava)}
    forward = modeling_llava.LlavaForConditionalGeneration.forward
    yield
    for module, names in saved.items():
        vars(module).update(names)
    modeling_llava.LlavaForConditionalGeneration.forward = forward


def test_liger_patches_the_llava_decoder_when_installed(restore_transformers):
    """Patching only (its Triton kernels need a GPU; the GPU path is run by bench/gpu_perf.sh)."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    model = _adapted_llava()
    apply_liger(model, fused_cross_entropy=True)  # lm_head frozen: allowed
    norms = [m for n, m in model.named_modules() if n.startswith("model.language_model") and n.endswith("norm")]
    assert norms and all(m.forward.__func__ is LigerRMSNorm.forward for m in norms)


def test_packing_is_refused_for_other_families():
    from vlm_lora.architectures.tiny_models import FACTORIES

    with pytest.raises(SpeedOptionError, match="data.packing: not supported for blip-2"):
        apply_speed_options(FACTORIES["blip2_opt"](), TrainConfig(), packing=True)
