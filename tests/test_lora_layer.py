"""LoraLinear against PEFT's LoRA Linear: same A/B -> same outputs; exact merge/unmerge."""

import copy

import pytest
import torch
from torch import nn

from vlm_lora.lora import AdapterSpec, LoraLinear

peft = pytest.importorskip("peft")


def _pair(rank=4, alpha=8.0, in_f=24, out_f=20):
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f)
    ours = LoraLinear(copy.deepcopy(base), "default", AdapterSpec(rank=rank, alpha=alpha))
    torch.nn.init.normal_(ours.lora_B["default"].weight)
    model = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)),
                                peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"]))
    theirs = model.base_model.model[0]
    theirs.lora_A["default"].weight.data.copy_(ours.lora_A["default"].weight)
    theirs.lora_B["default"].weight.data.copy_(ours.lora_B["default"].weight)
    return ours, theirs


def test_forward_matches_peft():
    ours, theirs = _pair()
    x = torch.randn(3, 7, 24)
    assert ours.scaling["default"] == theirs.scaling["default"] == 2.0
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)
    assert not torch.allclose(ours(x), ours.base_layer(x))  # the adapter really contributes


def test_fresh_adapter_is_identity_and_init_matches_peft_scheme():
    base = nn.Linear(16, 12)
    layer = LoraLinear(copy.deepcopy(base), "default", AdapterSpec(rank=8, alpha=16))
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)
    bound = 1 / 16 ** 0.5  # kaiming_uniform(a=sqrt(5)) on [r, in] gives U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A["default"].weight.abs().max() <= bound
    assert layer.lora_A["default"].weight.std() > bound / 3
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_merge_equals_w_plus_scaled_ba_and_unmerge_restores():
    ours, theirs = _pair(rank=3, alpha=12.0)
    w0 = ours.base_layer.weight.detach().clone()
    expected = w0 + 4.0 * ours.lora_B["default"].weight @ ours.lora_A["default"].weight
    x = torch.randn(6, 24)
    before = ours(x)
    ours.merge()
    torch.testing.assert_close(ours.base_layer.weight, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(x), before, atol=1e-5, rtol=0)  # merged adapters are not added twice
    theirs.merge()
    torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, atol=1e-6, rtol=0)
    ours.unmerge()
    torch.testing.assert_close(ours.base_layer.weight, w0, atol=1e-6, rtol=0)


def test_disable_gives_base_output_and_gradients_reach_a_and_b():
    ours, _ = _pair()
    x = torch.randn(4, 24)
    ours.disabled = True
    torch.testing.assert_close(ours(x), ours.base_layer(x), atol=0, rtol=0)
    ours.disabled = False
    ours(x).square().sum().backward()
    assert ours.lora_A["default"].weight.grad.abs().sum() > 0
    assert ours.lora_B["default"].weight.grad.abs().sum() > 0


def test_two_named_adapters_add_up():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 8), "a", AdapterSpec(rank=2, alpha=2))
    layer.add_adapter("b", AdapterSpec(rank=4, alpha=8))
    for name in ("a", "b"):
        nn.init.normal_(layer.lora_B[name].weight)
    x = torch.randn(3, 8)
    expected = layer.base_layer(x) + (x @ layer.delta_weight("a").T) + (x @ layer.delta_weight("b").T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradients_match_peft(dropout):
    """The fused forward/backward (no dropout) and the plain path (dropout) give PEFT's gradients."""
    ours, theirs = _pair()
    for layer in (ours, theirs):
        layer.lora_dropout["default"] = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
    x = torch.randn(3, 7, 24)
    grads = []
    for layer in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(5)
        (layer(xi) * torch.linspace(-1, 1, 20)).sum().backward()
        grads.append((xi.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad))
    for mine, peft_grad in zip(*grads):
        torch.testing.assert_close(mine, peft_grad, atol=1e-5, rtol=1e-5)


def test_shared_input_groups_give_the_same_outputs_and_gradients(tiny_llava, tiny_batch):
    """q/k/v and gate/up applying their A matrices as one matmul change nothing numerically."""
    import copy as copy_module

    import vlm_lora
    from conftest import randomize_adapters

    grouped = tiny_llava
    vlm_lora.plan(grouped, "both", vision_encoder={"rank": 4}).apply(grouped)
    randomize_adapters(grouped, seed=7)
    plain = copy_module.deepcopy(grouped)
    for _, layer in vlm_lora.lora.iter_lora_layers(plain):
        layer.shared_group = None
    attn = grouped.model.language_model.layers[0].self_attn
    assert attn.q_proj.shared_group is attn.v_proj.shared_group is not None
    assert grouped.model.language_model.layers[0].mlp.gate_proj.shared_group is not None
    results = []
    for model in (grouped, plain):
        model.train()
        out = model(**tiny_batch).logits
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, atol=1e-5, rtol=1e-4)


def test_a_shared_input_group_is_one_autograd_node_with_fresh_gradients(tiny_llava, tiny_batch):
    """The group's A product is one node (not cat, cast, matmul and a slice per member), and each A
    gets a gradient of its own (not a view of the group's, which would be copied again)."""
    import vlm_lora

    vlm_lora.plan(tiny_llava, "language_only").apply(tiny_llava)
    model = tiny_llava.to(torch.bfloat16).train()
    for _, layer in vlm_lora.lora.iter_lora_layers(model):
        for module in (*layer.lora_A.values(), *layer.lora_B.values()):
            module.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**{**tiny_batch, "pixel_values": tiny_batch["pixel_values"].bfloat16()}).logits
    nodes, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    groups = {id(layer.shared_group) for _, layer in vlm_lora.lora.iter_lora_layers(model) if layer.shared_group}
    assert nodes.count("_SharedLowRankInputBackward") == len(groups) > 0
    out.float().sum().backward()
    attn = model.model.language_model.layers[0].self_attn
    grads = [attn.q_proj.lora_A["default"].weight.grad, attn.k_proj.lora_A["default"].weight.grad]
    assert all(g is not None and g.dtype == torch.float32 and g._base is None for g in grads)
    assert grads[0].untyped_storage().data_ptr() != grads[1].untyped_storage().data_ptr()
