"""FusedLinearLora on a timm-style fused qkv: untouched slices bit-identical, exact per-slice LoRA,
exact merge/unmerge, PEFT export equivalent to PEFT's own LoRA on the fused linear."""

import copy

import pytest
import torch
from torch import nn

from vlm_lora.lora import AdapterSpec, LoraLinear, inject_lora
from vlm_lora.lora.fused import FusedLinearLora

peft = pytest.importorskip("peft")
vit = pytest.importorskip("timm.models.vision_transformer")

DIM, R, ALPHA = 32, 2, 8.0
S = ALPHA / R
SPEC = AdapterSpec(rank=R, alpha=ALPHA, slices=("q", "v"), slice_order=("q", "k", "v"))
Q, K, V = (slice(i * DIM, (i + 1) * DIM) for i in range(3))


def _attn() -> nn.Module:
    torch.manual_seed(0)
    return vit.Attention(dim=DIM, num_heads=4, qkv_bias=True).eval()


def _randomize(layer: FusedLinearLora, name: str = "default", seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B[name].weight.copy_(torch.randn(layer.lora_B[name].weight.shape, generator=g) * 0.1)


def _layer(spec: AdapterSpec = SPEC) -> tuple[nn.Linear, FusedLinearLora]:
    base = _attn().qkv
    layer = FusedLinearLora(copy.deepcopy(base), "default", spec)
    _randomize(layer)
    return base, layer


def _x() -> torch.Tensor:
    return torch.randn(2, 5, DIM, generator=torch.Generator().manual_seed(2))


def test_unadapted_slice_is_bit_identical_and_adapted_slices_are_exact():
    base, layer = _layer()
    x = _x()
    y, y0 = layer(x), base(x)
    assert torch.equal(y[..., K], y0[..., K])
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # [2r, in], [2, d, r]
    for i, cols in enumerate((Q, V)):
        expected = y0[..., cols] + S * (x @ a[i * R:(i + 1) * R].T) @ b[i].T
        torch.testing.assert_close(y[..., cols], expected, atol=1e-6, rtol=0)
        assert (y[..., cols] - y0[..., cols]).abs().max() > 1e-2  # the adapter really contributes


def test_fresh_adapter_is_identity_with_peft_init_scheme():
    base = _attn().qkv
    layer = FusedLinearLora(copy.deepcopy(base), "default", SPEC)
    x = _x()
    assert torch.equal(layer(x), base(x))
    a = layer.lora_A["default"].weight
    assert a.shape == (2 * R, DIM) and a.abs().max() <= 1 / DIM ** 0.5 and a.std() > 1 / DIM ** 0.5 / 3
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert layer.scaling["default"] == S


def test_merge_puts_deltas_in_the_right_rows_and_unmerge_restores():
    base, layer = _layer()
    x = _x()
    before = layer(x)
    w0 = base.weight.detach().clone()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    layer.merge()
    w = layer.base_layer.weight
    torch.testing.assert_close(w[Q], w0[Q] + S * b[0] @ a[:R], atol=1e-6, rtol=0)
    torch.testing.assert_close(w[V], w0[V] + S * b[1] @ a[R:], atol=1e-6, rtol=0)
    assert torch.equal(w[K], w0[K])
    torch.testing.assert_close(layer.delta_weight("default"), w.detach() - w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)  # not added twice
    torch.testing.assert_close(layer.base_layer(x), before, atol=1e-5, rtol=0)  # the plain linear has it all
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
    assert torch.equal(layer.base_layer.weight[K], w0[K])
    assert layer.merged_adapters == []


def test_gradients_reach_each_slice_pair_and_nothing_else_changes():
    base, layer = _layer()
    layer.base_layer.requires_grad_(False)
    x = _x()
    layer(x).square().sum().backward()
    a_grad, b_grad = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
    for i in range(2):
        assert a_grad[i * R:(i + 1) * R].abs().sum() > 0 and b_grad[i].abs().sum() > 0

    layer.zero_grad(set_to_none=True)
    layer(x)[..., K].square().sum().backward()  # the k slice does not depend on the adapter
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in layer.parameters())

    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert len(trainable) == 2
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    layer(x).square().sum().backward()
    optimizer.step()
    assert torch.equal(layer.base_layer.weight, base.weight) and torch.equal(layer.base_layer.bias, base.bias)
    assert torch.equal(layer(x)[..., K], base(x)[..., K])


def _peft_model(base_attn: nn.Module, entry) -> nn.Module:
    config = peft.LoraConfig(r=entry.rank, lora_alpha=entry.alpha, target_modules=["qkv"])
    model = peft.get_peft_model(copy.deepcopy(base_attn), config)
    qkv = model.base_model.model.qkv
    with torch.no_grad():
        qkv.lora_A["default"].weight.copy_(entry.lora_A)
        qkv.lora_B["default"].weight.copy_(entry.lora_B)
    return model


def test_peft_export_gives_peft_the_same_outputs(tmp_path):
    attn = _attn()
    ours = copy.deepcopy(attn)
    ours.qkv = FusedLinearLora(ours.qkv, "default", SPEC)
    _randomize(ours.qkv)
    (entry,) = ours.qkv.peft_export("default")
    assert entry.suffix == "" and entry.rank == 2 * R and entry.alpha == 2 * ALPHA
    assert entry.lora_A.shape == (2 * R, DIM) and entry.lora_B.shape == (3 * DIM, 2 * R)
    assert torch.count_nonzero(entry.lora_B[K]) == 0

    theirs = _peft_model(attn, entry)
    x = _x()
    expected = ours(x)
    torch.testing.assert_close(theirs(x), expected, atol=1e-6, rtol=0)
    assert not torch.allclose(attn(x), expected, atol=1e-3)

    theirs.save_pretrained(tmp_path)  # and through PEFT's own files
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(attn), tmp_path).eval()
    torch.testing.assert_close(loaded(x), expected, atol=1e-6, rtol=0)
    loaded_qkv = loaded.base_model.model.qkv
    torch.testing.assert_close(loaded_qkv.get_delta_weight("default"), ours.qkv.delta_weight("default"),
                               atol=1e-6, rtol=0)


def test_load_peft_round_trips_and_rejects_non_block_b():
    _, layer = _layer()
    (entry,) = layer.peft_export("default")
    other = FusedLinearLora(_attn().qkv, "default", SPEC)
    other.load_peft("default", {"": (entry.lora_A, entry.lora_B)})
    assert torch.equal(other.lora_A["default"].weight, layer.lora_A["default"].weight)
    assert torch.equal(other.lora_B["default"].weight, layer.lora_B["default"].weight)
    x = _x()
    assert torch.equal(other(x), layer(x))

    bad_k_rows = entry.lora_B.clone()
    bad_k_rows[K, 0] = 1.0  # an update to the un-adapted k slice
    with pytest.raises(ValueError, match="outside the per-slice block"):
        other.load_peft("default", {"": (entry.lora_A, bad_k_rows)})
    bad_cross = entry.lora_B.clone()
    bad_cross[Q, R] = 1.0  # q rows fed by v's A
    with pytest.raises(ValueError, match="outside the per-slice block"):
        other.load_peft("default", {"": (entry.lora_A, bad_cross)})
    with pytest.raises(ValueError, match="lora_A"):
        other.load_peft("default", {"": (entry.lora_A[:R], entry.lora_B[:, :R])})
    assert torch.equal(other.lora_B["default"].weight, layer.lora_B["default"].weight)  # untouched by failures


def test_two_adapters_add_up_and_disable():
    base, layer = _layer()
    layer.add_adapter("b", AdapterSpec(rank=3, alpha=6.0, slices=("k", "v"), slice_order=("q", "k", "v")))
    _randomize(layer, "b", seed=5)
    x = _x()
    expected = base(x) + x @ (layer.delta_weight("default") + layer.delta_weight("b")).T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    layer.disabled = True
    assert torch.equal(layer(x), base(x))
    layer.disabled = False
    layer.merge(["b"])  # one merged, one added in forward
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    layer.active_adapters = ["b"]
    torch.testing.assert_close(layer(x), base(x) + x @ layer.delta_weight("b").T, atol=1e-5, rtol=0)


def test_injection_picks_the_fused_layer_and_plain_linears_stay_loralinear():
    attn = _attn()
    inject_lora(attn, {"qkv": SPEC, "proj": AdapterSpec(rank=R, alpha=ALPHA)})
    assert isinstance(attn.qkv, FusedLinearLora) and isinstance(attn.proj, LoraLinear)
    names = [n for n, _ in attn.named_parameters() if ".lora_" in n]
    assert "qkv.lora_A.default.weight" in names and "qkv.lora_B.default.weight" in names
    with pytest.raises(ValueError, match="equal slices"):
        FusedLinearLora(nn.Linear(8, 10), "default", SPEC)


@pytest.mark.parametrize("factory,strategy", [("timm_vit", "vision_only"), ("open_clip", "vision_only")])
def test_sliced_adapters_round_trip_through_files_and_checkpoint_restore(factory, strategy, tmp_path):
    """Per-slice layers (fused qkv, MHA) saved by save_adapter come back identical through
    load_adapter (fresh model) and restore_weights (resume into an already planned model)."""
    import vlm_lora
    from conftest import randomize_adapters
    from vlm_lora.train.checkpoint import restore_weights
    from vlm_lora.architectures.tiny_models import FACTORIES

    overrides = {"vision_encoder": {"rank": 4, "targets": ["q", "v"] + (["o"] if factory == "open_clip" else [])}}
    model = FACTORIES[factory]()
    plan = vlm_lora.plan(model, strategy, **overrides)
    plan.apply(model)
    randomize_adapters(model, seed=11)
    vlm_lora.save_adapter(model, tmp_path, factory, plan.full_prefixes())
    images = torch.randn(2, 3, 16, 16)
    encode = (lambda m: m(images)) if factory == "timm_vit" else (lambda m: m.encode_image(images))
    with torch.no_grad():
        expected = encode(model)
        loaded = FACTORIES[factory]()
        vlm_lora.load_adapter(loaded, tmp_path)
        torch.testing.assert_close(encode(loaded), expected, atol=1e-5, rtol=1e-5)
        resumed = FACTORIES[factory]()
        vlm_lora.plan(resumed, strategy, **overrides).apply(resumed)
        restore_weights(resumed, tmp_path)
        torch.testing.assert_close(encode(resumed), expected, atol=1e-5, rtol=1e-5)
