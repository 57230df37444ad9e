"""LoRA variants and QLoRA against PEFT: same weights in, same numbers out."""

import copy
import json

import pytest
import torch
from torch import nn

import vlm_lora
from conftest import randomize_adapters
from vlm_lora.lora import AdapterSpec, LoraLinear

peft = pytest.importorskip("peft")


def _peft_layer(base: nn.Linear, **config):
    model = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), peft.LoraConfig(target_modules=["0"], **config))
    return model, model.base_model.model[0]


def _copy_ab(ours: LoraLinear, theirs) -> None:
    theirs.lora_A["default"].weight.data.copy_(ours.lora_A["default"].weight)
    theirs.lora_B["default"].weight.data.copy_(ours.lora_B["default"].weight)


def _base(in_f=24, out_f=20, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


def test_rslora_scaling_and_forward_match_peft():
    base = _base()
    ours = LoraLinear(copy.deepcopy(base), "default", AdapterSpec(rank=4, alpha=8, rslora=True))
    nn.init.normal_(ours.lora_B["default"].weight)
    _, theirs = _peft_layer(base, r=4, lora_alpha=8, use_rslora=True)
    _copy_ab(ours, theirs)
    assert ours.scaling["default"] == theirs.scaling["default"] == 4.0
    x = torch.randn(5, 24)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)


def test_dora_forward_merge_and_magnitude_match_peft():
    base = _base()
    ours = LoraLinear(copy.deepcopy(base), "default", AdapterSpec(rank=4, alpha=8, variant="dora"))
    _, theirs = _peft_layer(base, r=4, lora_alpha=8, use_dora=True)
    torch.testing.assert_close(ours.lora_magnitude_vector["default"].weight,
                               theirs.lora_magnitude_vector["default"].weight, atol=1e-6, rtol=0)
    nn.init.normal_(ours.lora_B["default"].weight, std=0.3)
    nn.init.normal_(ours.lora_magnitude_vector["default"].weight, mean=1.0, std=0.2)
    _copy_ab(ours, theirs)
    theirs.lora_magnitude_vector["default"].weight.data.copy_(ours.lora_magnitude_vector["default"].weight)
    x = torch.randn(6, 24)
    out = ours(x)
    torch.testing.assert_close(out, theirs(x), atol=1e-5, rtol=0)
    w0 = ours.base_layer.weight.detach().clone()
    ours.merge()
    theirs.merge()
    torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours(x), out, atol=1e-5, rtol=0)
    ours.unmerge()
    torch.testing.assert_close(ours.base_layer.weight, w0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.1])  # one fused node; with dropout the unfused path
def test_dora_gradients_match_peft(dropout):
    base = _base()
    ours = LoraLinear(copy.deepcopy(base), "default", AdapterSpec(rank=4, alpha=8, variant="dora", dropout=dropout))
    _, theirs = _peft_layer(base, r=4, lora_alpha=8, use_dora=True, lora_dropout=dropout)
    nn.init.normal_(ours.lora_B["default"].weight, std=0.3)
    nn.init.normal_(ours.lora_magnitude_vector["default"].weight, mean=1.0, std=0.2)
    _copy_ab(ours, theirs)
    theirs.lora_magnitude_vector["default"].weight.data.copy_(ours.lora_magnitude_vector["default"].weight)
    ours.eval(), theirs.eval()  # dropout off: both sides see the same input
    x = torch.randn(2, 6, 24)
    grads = []
    for layer in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        (layer(xi) * torch.linspace(-1, 1, 20)).square().sum().backward()
        grads.append([xi.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad,
                      layer.lora_magnitude_vector["default"].weight.grad])
    for mine, peft_grad in zip(*grads):
        torch.testing.assert_close(mine, peft_grad, atol=1e-5, rtol=1e-4)


def test_dora_norm_is_detached_in_backward():
    ours = LoraLinear(_base(), "default", AdapterSpec(rank=2, alpha=4, variant="dora"))
    nn.init.normal_(ours.lora_B["default"].weight)
    x = torch.randn(3, 24)
    ours(x).square().sum().backward()

    def manual_grad(detach: bool) -> torch.Tensor:
        w = ours.base_layer.weight.detach()
        a = ours.lora_A["default"].weight.detach()
        b = ours.lora_B["default"].weight.detach().clone().requires_grad_(True)
        m = ours.lora_magnitude_vector["default"].weight.detach()
        s = ours.scaling["default"]
        norm = (w + s * b @ a).norm(dim=1)
        scale = m / (norm.detach() if detach else norm)
        y = x @ (scale[:, None] * (w + s * b @ a)).T + ours.base_layer.bias.detach()
        y.square().sum().backward()
        return b.grad

    torch.testing.assert_close(ours.lora_B["default"].weight.grad, manual_grad(detach=True), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours.lora_B["default"].weight.grad, manual_grad(detach=False), atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_init_match_peft_and_save_for_original_base(init, tmp_path):
    base = _base(32, 24)
    ours = LoraLinear(copy.deepcopy(base), "default", AdapterSpec(rank=4, alpha=4, init=init))
    _, theirs = _peft_layer(base, r=4, lora_alpha=4, init_lora_weights=init)
    for attr in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(ours, attr)["default"].weight, getattr(theirs, attr)["default"].weight,
                                   atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, atol=1e-5, rtol=0)
    x = torch.randn(4, 32)
    torch.testing.assert_close(ours(x), base(x), atol=1e-5, rtol=0)  # principal part moved, output unchanged

    # train a little, then save: the adapter must reproduce the model on the ORIGINAL base
    nn.init.normal_(ours.lora_B["default"].weight, std=0.1)
    model = nn.Sequential(ours)
    vlm_lora.save_adapter(model, tmp_path, "orig", [])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8
    reloaded = peft.PeftModel.from_pretrained(nn.Sequential(copy.deepcopy(base)), tmp_path)
    torch.testing.assert_close(reloaded(x), model(x), atol=1e-5, rtol=0)


def test_lora_fa_freezes_a_and_loraplus_scales_b(tiny_llava):
    from vlm_lora.train.optim import param_groups

    plan = vlm_lora.plan(tiny_llava, "language_only", language_decoder={"variant": "lora_fa"})
    plan.apply(tiny_llava)
    layer = tiny_llava.model.language_model.layers[0].self_attn.q_proj
    assert not layer.lora_A["default"].weight.requires_grad and layer.lora_B["default"].weight.requires_grad
    assert plan.trainable_params == sum(p.numel() for p in tiny_llava.parameters() if p.requires_grad)
    groups = {g["name"]: g for g in param_groups(tiny_llava, plan, 1e-4, 0.0, loraplus_lr_ratio=16)}
    assert groups["language_decoder/lora_B"]["lr"] == pytest.approx(16e-4)
    assert all(".lora_B." not in n for n, p in tiny_llava.named_parameters()
               if any(p is q for q in groups.get("language_decoder", {"params": []})["params"]))


def test_dora_and_rslora_adapters_load_in_peft_with_same_logits(tiny_llava, tiny_batch, tmp_path):
    base = copy.deepcopy(tiny_llava)
    plan = vlm_lora.plan(tiny_llava, "language_only", language_decoder={"variant": "dora", "rslora": True})
    plan.apply(tiny_llava)
    randomize_adapters(tiny_llava, seed=5)
    vlm_lora.save_adapter(tiny_llava, tmp_path, "tiny", plan.full_prefixes())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    with torch.no_grad():
        ours = tiny_llava(**tiny_batch).logits
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()(**tiny_batch).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    reloaded = copy.deepcopy(base)
    vlm_lora.load_adapter(reloaded, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**tiny_batch).logits, ours, atol=1e-5, rtol=0)


def test_mixed_rslora_exports_as_equivalent_alpha(tiny_llava, tiny_batch, tmp_path):
    base = copy.deepcopy(tiny_llava)
    plan = vlm_lora.plan(tiny_llava, "both", vision_encoder={"rank": 4, "rslora": True})
    plan.apply(tiny_llava)
    randomize_adapters(tiny_llava, seed=2)
    vlm_lora.save_adapter(tiny_llava, tmp_path, "tiny", plan.full_prefixes())
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_rslora"] is False
    with torch.no_grad():
        ours = tiny_llava(**tiny_batch).logits
        theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()(**tiny_batch).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_fused_modules_reject_dora_at_plan_time():
    pytest.importorskip("vlm_lora.lora.fused")
    from vlm_lora.planner import PlanError
    from vlm_lora.architectures.tiny_models import tiny_timm_vit

    with pytest.raises(PlanError, match="variant 'dora'.*not available on fused modules"):
        vlm_lora.plan(tiny_timm_vit(), "vision_only", vision_encoder={"variant": "dora"})


bnb = pytest.importorskip("bitsandbytes")


def test_qlora_forward_equals_peft_bnb_on_the_same_4bit_layer():
    from vlm_lora.quantize import quantize_linears

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    quantize_linears(model, ["0"], compute_dtype="float32")
    ours_model = copy.deepcopy(model)
    vlm_lora.inject_lora(ours_model, {"0": AdapterSpec(rank=4, alpha=8)})
    ours = ours_model[0]
    nn.init.normal_(ours.lora_B["default"].weight)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    theirs = peft_model.base_model.model[0]
    assert isinstance(theirs.base_layer, bnb.nn.Linear4bit)  # PEFT wraps the same NF4 layer
    _copy_ab(ours, theirs)
    x = torch.randn(5, 64)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def test_4bit_adapter_merge_reports_small_logit_difference(tmp_path):
    from conftest import ASSET_MODEL
    from vlm_lora.adapters.merge import merge_adapter
    from vlm_lora.modeling import load_model_and_processor
    from vlm_lora.quantize import quantize_linears

    model, _ = load_model_and_processor(str(ASSET_MODEL))
    plan = vlm_lora.plan(model, "language_only")
    quantize_linears(model, plan.prefixes_of(["language_decoder"]), compute_dtype="float32")
    plan.apply(model)
    randomize_adapters(model, seed=4)
    quant = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "float32",
             "components": ["language_decoder"]}
    vlm_lora.save_adapter(model, tmp_path / "a", str(ASSET_MODEL), plan.full_prefixes(),
                          extra_meta={"quantization": quant})
    report = merge_adapter(str(ASSET_MODEL), tmp_path / "a", tmp_path / "merged")
    assert report["max_logit_diff"] < 1e-3  # merged into the dequantized NF4 weights the adapter saw


def test_the_fused_lora_linear_scales_and_casts_a_and_b_inside_its_node():
    """In eager mode every autograd node costs host time and kernels: A's cast and product and B's scale
    and cast happen inside the one-node path, so a bf16 LoRA linear outside a shared-input group is one
    node in the graph."""
    from vlm_lora.lora import AdapterSpec, inject_lora

    model = nn.Sequential(nn.Linear(16, 24)).to(torch.bfloat16).requires_grad_(False)
    inject_lora(model, {"0": AdapterSpec(rank=4, alpha=8)})
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    nodes, stack = [], [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            nodes.append(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
    assert nodes[0] == "_LinearPlusLowRankBackward"
    b_path = nodes[:1] + [n for n in nodes[1:] if "Mul" in n]
    assert b_path == ["_LinearPlusLowRankBackward"], nodes  # no MulBackward for s * B
    assert "ToCopyBackward0" not in nodes and "MmBackward0" not in nodes, nodes  # nor for A (no shared group)


def test_the_fused_lora_linear_writes_its_output_once():
    """The base GEMM adds into the low-rank product in place: no copy of the [N, out] output first
    (an out-of-place addmm copies its ``self`` argument, a device-to-device memcpy per layer on CUDA)."""
    from torch.profiler import profile

    from vlm_lora.lora import AdapterSpec, inject_lora

    model = nn.Sequential(nn.Linear(16, 24, bias=False)).requires_grad_(False)
    inject_lora(model, {"0": AdapterSpec(rank=4, alpha=8)})
    x = torch.randn(3, 16, requires_grad=True)
    with profile(record_shapes=True) as prof:
        out = model(x)
    ops = {event.key: event.count for event in prof.key_averages()}
    assert ops.get("aten::addmm_") == 1 and "aten::addmm" not in ops, ops
    copies = [event.input_shapes for event in prof.events() if event.name == "aten::copy_"]
    assert not [shapes for shapes in copies if [3, 24] in shapes], copies
    assert out.grad_fn.name() == "_LinearPlusLowRankBackward"


def test_the_fused_lora_linear_backward_matches_the_plain_chain_in_bf16_with_one_add_less():
    """Backward of the one-node LoRA linear (A inline): the same input and A/B gradients as the plain ops
    under bf16 autocast (fp32 masters), and the low-rank input gradient is added inside the base GEMM
    (``addmm_``), not in a separate pass over [N, in]."""
    from torch.profiler import profile

    from vlm_lora.lora import AdapterSpec, inject_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48)).to(torch.bfloat16).requires_grad_(False)
    inject_lora(model, {"0": AdapterSpec(rank=8, alpha=16)})
    layer = model[0]
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    x = torch.randn(5, 7, 64, dtype=torch.bfloat16)
    weight_out = torch.randn(5, 7, 48, dtype=torch.bfloat16)

    def gradients(plain: bool):
        xi = x.clone().requires_grad_(True)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if plain:
                base = layer.base_layer
                out = base(xi) + (xi @ a.to(xi.dtype).T) @ (b * layer.scaling["default"]).to(xi.dtype).T
            else:
                out = model(xi)
        with profile() as prof:
            (out.float() * weight_out).sum().backward()
        grads = [xi.grad, a.grad, b.grad]
        a.grad = b.grad = None
        return grads, {event.key: event.count for event in prof.key_averages()}

    (fused, fused_ops), (plain, _) = gradients(False), gradients(True)
    assert fused[0].dtype == plain[0].dtype == torch.bfloat16
    for mine, reference, name in zip(fused, plain, ["x", "A", "B"]):
        scale = reference.abs().max().item()
        torch.testing.assert_close(mine.float(), reference.float(), atol=2e-2 * scale, rtol=0, msg=name)
    assert fused_ops.get("aten::addmm_") == 1 and "aten::add" not in fused_ops, fused_ops
