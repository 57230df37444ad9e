"""Regional torch.compile of LoRA decoder layers: one graph for every layer (no per-layer recompiles), one
more for any length at the first new length and none after it, and the compiled step gives the eager loss
and gradients."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import randomize_adapters, tiny_llava_config


def _model(layers: int = 4, variant: str = "lora"):
    from transformers import LlavaForConditionalGeneration

    import vlm_lora

    config = tiny_llava_config()
    config.text_config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).train()
    # q/k/v and gate/up share their A matmul (LoRA); DoRA's one-node linear with its detached norm
    vlm_lora.plan(model, "language_only", language_decoder={"variant": variant}).apply(model)
    randomize_adapters(model)
    return model


LENGTHS = (10, 12, 14)


def _batch(length: int) -> dict:
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(1, 60, (2, length), generator=g)
    ids[:, 1:5] = 63
    labels = ids.clone()
    labels[:, :6] = -100
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=g), "labels": labels}


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_compiled_lora_layers_share_one_graph_and_match_eager(variant):
    from torch._dynamo.utils import counters

    from vlm_lora.train.loss import labelled_token_loss, training_kwargs
    from vlm_lora.train.speed import checkpointable_layers, compile_decoder_layers

    model = _model(variant=variant)
    assert training_kwargs(model) == {"use_cache": False}
    eager = []
    for length in LENGTHS:
        model.zero_grad(set_to_none=True)
        loss = labelled_token_loss(model, _batch(length), use_cache=False)
        loss.backward()
        eager.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    torch._dynamo.reset()
    counters.clear()
    vision_layers = len(checkpointable_layers(model.model.vision_tower))
    assert compile_decoder_layers(model, backend="aot_eager") == 4 + vision_layers
    graphs = []
    for (eager_loss, eager_grads), length in zip(eager, LENGTHS):
        model.zero_grad(set_to_none=True)
        loss = labelled_token_loss(model, _batch(length), use_cache=False)
        loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
        torch.testing.assert_close(loss.detach(), eager_loss, atol=1e-5, rtol=1e-5)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-4)
    # one graph for the 4 decoder layers, one for the vision layers (one image size); the first new length
    # compiles the decoder layers once more, for any length, and the next compiles nothing; no graph breaks
    assert graphs == [2, 3, 3], (graphs, dict(counters["stats"]))
    assert not counters["graph_break"], dict(counters["graph_break"])
    for layer in checkpointable_layers(model):
        layer._compiled_call_impl = None
    torch._dynamo.reset()


def test_inductor_runs_the_lora_linear_without_copying_the_low_rank_addend():
    """Inductor turns an in-place ``addmm_`` into ``addmm(addend, ..., out=new)``, which copies the [N, out]
    addend first; the LoRA linear's sum is one opaque op under compile, with the eager bits."""
    from torch._inductor.utils import run_and_get_code

    from vlm_lora.lora.nodes import _LinearPlusLowRank

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 16, generator=g)
    x, a, b = (torch.randn(*shape, generator=g, requires_grad=True) for shape in ((3, 5, 16), (4, 16), (24, 4)))

    def step(x, a, b):
        y = _LinearPlusLowRank.apply(x, None, weight, None, b, 0.5, a)
        loss = (y * y.detach().sin()).sum()
        return loss, torch.autograd.grad(loss, (x, a, b))

    eager_loss, eager_grads = step(x, a, b)
    torch._dynamo.reset()
    (loss, grads), codes = run_and_get_code(torch.compile(step, backend="inductor"), x, a, b)
    code = "\n".join(codes)
    assert "extern_kernels.addmm" not in code
    assert code.count("torch.ops.vlm_lora.low_rank_plus_mm.default(") == 2  # forward sum, input gradient
    torch.testing.assert_close(loss, eager_loss, atol=1e-4, rtol=1e-5)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad, atol=1e-4, rtol=1e-5)
    torch._dynamo.reset()
