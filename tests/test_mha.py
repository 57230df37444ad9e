"""LoraMultiheadAttention: identical to nn.MultiheadAttention with B = 0, exact merge into the plain
module, PEFT export equal to PEFT's own MHA LoRA, and an open_clip tiny CLIP."""

import copy

import pytest
import torch
from torch import nn

from vlm_lora.lora import AdapterSpec, inject_lora
from vlm_lora.lora.mha import LoraMultiheadAttention

peft = pytest.importorskip("peft")

E, HEADS, R, ALPHA = 16, 4, 2, 4.0
ORDER = ("q", "k", "v", "o")
L = 6


def _spec(slices=("q", "k", "v", "o"), rank=R, alpha=ALPHA) -> AdapterSpec:
    return AdapterSpec(rank=rank, alpha=alpha, slices=slices, slice_order=ORDER)


def _mha(batch_first: bool) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first).eval()
    with torch.no_grad():  # non-zero biases so their slicing is tested
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    return mha


def _randomize(layer: LoraMultiheadAttention, name: str = "default", seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            if ".lora_B." in f".{pname}" and f".{name}." in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _x(batch_first: bool, length: int = L, seed: int = 2) -> torch.Tensor:
    shape = (3, length, E) if batch_first else (length, 3, E)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _mask(kind: str | None) -> torch.Tensor | None:
    if kind == "causal_float":
        return torch.full((L, L), float("-inf")).triu(1)
    if kind == "bool":
        return torch.ones(L, L, dtype=torch.bool).triu(1)
    return None


def _call(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None, kv: torch.Tensor | None = None,
          **kwargs) -> torch.Tensor:
    kv = x if kv is None else kv
    return module(x, kv, kv, need_weights=False, attn_mask=mask, **kwargs)[0]


def _merged_copy(base: nn.MultiheadAttention, layer: LoraMultiheadAttention, name: str = "default"):
    """A fresh plain MHA with the adapter's deltas added to its weights by hand."""
    merged = copy.deepcopy(base)
    in_delta, out_delta = layer.delta_weight(name)
    with torch.no_grad():
        if in_delta is not None:
            merged.in_proj_weight += in_delta
        if out_delta is not None:
            merged.out_proj.weight += out_delta
    return merged


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "causal_float", "bool"])
def test_zero_b_equals_the_original_module(batch_first, mask):
    base = _mha(batch_first)
    layer = LoraMultiheadAttention(copy.deepcopy(base), "default", _spec())
    x = _x(batch_first)
    out, weights = layer(x, x, x, need_weights=False, attn_mask=_mask(mask))
    assert weights is None and out.shape == x.shape
    torch.testing.assert_close(out, _call(base, x, _mask(mask)), atol=1e-6, rtol=0)


def test_zero_b_key_padding_mask_cross_attention_and_unbatched():
    base = _mha(True)
    layer = LoraMultiheadAttention(copy.deepcopy(base), "default", _spec())
    x, kv = _x(True), _x(True, length=4, seed=3)
    pad = torch.tensor([[False] * 4, [False, False, True, True], [False, True, False, False]])
    torch.testing.assert_close(_call(layer, x, kv=kv, key_padding_mask=pad),
                               _call(base, x, kv=kv, key_padding_mask=pad), atol=1e-6, rtol=0)
    torch.testing.assert_close(_call(layer, x[0]), _call(base, x[0]), atol=1e-6, rtol=0)
    per_head = torch.randn(3 * HEADS, L, 4, generator=torch.Generator().manual_seed(5))  # [B * h, L, S] float
    torch.testing.assert_close(_call(layer, x, per_head, kv=kv), _call(base, x, per_head, kv=kv), atol=1e-6, rtol=0)
    with pytest.raises(NotImplementedError, match="need_weights"):
        _randomize(layer)
        layer(x, x, x)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("slices", [("q", "k", "v", "o"), ("q", "v"), ("o",)])
def test_random_b_matches_merging_into_a_fresh_plain_mha(batch_first, slices):
    base = _mha(batch_first)
    layer = LoraMultiheadAttention(copy.deepcopy(base), "default", _spec(slices))
    _randomize(layer)
    x, mask = _x(batch_first), _mask("causal_float")
    out = _call(layer, x, mask)
    assert (out - _call(base, x, mask)).abs().max() > 1e-2
    merged = _merged_copy(base, layer)
    torch.testing.assert_close(_call(merged, x, mask), out, atol=1e-5, rtol=0)
    kv = _x(batch_first, length=4, seed=3)  # cross-attention takes the per-slice path
    torch.testing.assert_close(_call(merged, x, kv=kv), _call(layer, x, kv=kv), atol=1e-5, rtol=0)
    if "k" not in slices:  # the un-adapted key rows of in_proj are left exactly as they were
        assert torch.equal(merged.in_proj_weight[E:2 * E], base.in_proj_weight[E:2 * E])


def test_merge_calls_the_plain_module_and_unmerge_restores():
    base = _mha(False)
    layer = LoraMultiheadAttention(copy.deepcopy(base), "default", _spec(("q", "v", "o")))
    _randomize(layer)
    x = _x(False)
    expected = _call(layer, x)
    w_in, w_out = base.in_proj_weight.detach().clone(), base.out_proj.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer.base_layer.in_proj_weight[E:2 * E], w_in[E:2 * E], atol=0, rtol=0)
    torch.testing.assert_close(_call(layer.base_layer, x), expected, atol=1e-5, rtol=0)
    _, weights = layer(x, x, x)  # all merged: the plain module runs, need_weights included
    assert weights is not None and weights.shape == (3, L, L)
    torch.testing.assert_close(_call(layer, x), expected, atol=1e-5, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.in_proj_weight, w_in, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.base_layer.out_proj.weight, w_out, atol=1e-6, rtol=0)
    layer.disabled = True
    torch.testing.assert_close(_call(layer, x), _call(base, x), atol=1e-6, rtol=0)


def test_two_adapters_add_up():
    base = _mha(True)
    layer = LoraMultiheadAttention(copy.deepcopy(base), "a", _spec(("q", "v")))
    layer.add_adapter("b", _spec(("k", "o"), rank=3, alpha=3.0))
    _randomize(layer, "a", seed=1)
    _randomize(layer, "b", seed=4)
    merged = _merged_copy(_merged_copy(base, layer, "a"), layer, "b")
    x = _x(True)
    torch.testing.assert_close(_call(layer, x), _call(merged, x), atol=1e-5, rtol=0)


def test_gradients_reach_a_and_b_of_in_and_out_proj():
    layer = LoraMultiheadAttention(_mha(True), "default", _spec(("q", "v", "o")))
    layer.base_layer.requires_grad_(False)
    _randomize(layer)
    _call(layer, _x(True)).square().sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
    assert set(grads) == {"lora_A.default.weight", "lora_B.default.weight",
                          "out_proj_lora.lora_A.default.weight", "out_proj_lora.lora_B.default.weight"}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    a_grad, b_grad = grads["lora_A.default.weight"], grads["lora_B.default.weight"]
    assert all(a_grad[i * R:(i + 1) * R].abs().sum() > 0 and b_grad[i].abs().sum() > 0 for i in range(2))


class _Wrap(nn.Module):
    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def _peft_out_proj_factor() -> int:
    """How many times PEFT's MHA forward adds its own out_proj delta (probed on PEFT alone).

    peft 0.21.2 adds it twice (``MultiheadAttention.merge`` writes ``W + dW`` and then calls
    ``out_proj.merge()``, which adds ``dW`` again; huggingface/peft PR #3774); a fixed PEFT adds it once.
    """
    base = _mha(True)
    model = peft.get_peft_model(_Wrap(copy.deepcopy(base)), peft.LoraConfig(r=2, lora_alpha=2, target_modules=["attn"]))
    out_proj = model.base_model.model.attn.base_layer.out_proj
    with torch.no_grad():
        out_proj.lora_B["default"].weight.normal_()
    x = _x(True)
    got = model(x)
    for factor in (1, 2):
        plain = copy.deepcopy(base)
        with torch.no_grad():
            plain.out_proj.weight += factor * out_proj.get_delta_weight("default")
        if torch.allclose(_call(plain, x), got, atol=1e-5, rtol=0):
            return factor
    raise AssertionError("PEFT's MHA LoRA matches neither W + dW nor W + 2 dW on out_proj")


@pytest.mark.parametrize("slices", [("q", "v", "o"), ("q", "k", "v"), ("o",)])
def test_peft_export_matches_peft_mha_lora(slices, tmp_path):
    base = _mha(True)
    ours = _Wrap(LoraMultiheadAttention(copy.deepcopy(base), "default", _spec(slices)))
    _randomize(ours.attn)
    entries = {e.suffix: e for e in ours.attn.peft_export("default")}
    n_in = len(set(slices) - {"o"})
    assert set(entries) == ({""} if n_in else set()) | ({"base_layer.out_proj"} if "o" in slices else set())
    ((rank, alpha),) = {(e.rank, e.alpha) for e in entries.values()}  # PEFT: one r / alpha for both parts
    assert rank == max(n_in, 1) * R and alpha / rank == ALPHA / R

    theirs = peft.get_peft_model(_Wrap(copy.deepcopy(base)),
                                 peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["attn"]))
    peft_mha = theirs.base_model.model.attn
    params = dict(peft_mha.named_parameters())
    with torch.no_grad():
        for suffix, entry in entries.items():
            prefix = f"{suffix}." if suffix else ""
            params[f"{prefix}lora_A.default.weight"].copy_(entry.lora_A)
            params[f"{prefix}lora_B.default.weight"].copy_(entry.lora_B)
    in_delta, out_delta = ours.attn.delta_weight("default")  # PEFT's own deltas are ours
    zeros = torch.zeros(3 * E, E), torch.zeros(E, E)
    torch.testing.assert_close(peft_mha.get_delta_weight("default"),
                               in_delta if in_delta is not None else zeros[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(peft_mha.base_layer.out_proj.get_delta_weight("default"),
                               out_delta if out_delta is not None else zeros[1], atol=1e-6, rtol=0)

    x = _x(True)
    expected = ours(x)
    assert (expected - _call(base, x)).abs().max() > 1e-2
    factor = _peft_out_proj_factor() if "o" in slices else 1
    if factor == 1:
        torch.testing.assert_close(theirs(x), expected, atol=1e-6, rtol=0)
    else:  # PEFT's double-counted out_proj: it computes what a plain MHA with W_o + 2 dW_o computes
        reference = _merged_copy(base, ours.attn)
        with torch.no_grad():
            reference.out_proj.weight += out_delta
        torch.testing.assert_close(theirs(x), _call(reference, x), atol=1e-5, rtol=0)

    theirs.save_pretrained(tmp_path)  # PEFT's own files load back into ours with load_peft
    state = peft.PeftModel.from_pretrained(_Wrap(copy.deepcopy(base)), tmp_path).base_model.model.attn
    sd = {n: p for n, p in state.named_parameters() if "lora_" in n}
    back = LoraMultiheadAttention(copy.deepcopy(base), "default", _spec(slices))
    back.load_peft("default", {suffix: (sd[f"{suffix}.lora_A.default.weight".lstrip(".")],
                                        sd[f"{suffix}.lora_B.default.weight".lstrip(".")])
                               for suffix in ("", "base_layer.out_proj")})
    torch.testing.assert_close(_call(back, x), expected, atol=1e-6, rtol=0)


def test_load_peft_round_trip_and_rejects_what_it_cannot_represent():
    layer = LoraMultiheadAttention(_mha(True), "default", _spec(("q", "v", "o")))
    _randomize(layer)
    pairs = {e.suffix: (e.lora_A, e.lora_B) for e in layer.peft_export("default")}
    assert pairs[""][0].shape == (2 * R, E) and pairs[""][1].shape == (3 * E, 2 * R)
    assert pairs["base_layer.out_proj"][0].shape == (2 * R, E) and pairs["base_layer.out_proj"][1].shape == (E, 2 * R)
    other = LoraMultiheadAttention(_mha(True), "default", _spec(("q", "v", "o")))
    other.load_peft("default", pairs)
    for (name, p), (_, q) in zip(layer.named_parameters(), other.named_parameters()):
        assert torch.equal(p, q), name
    a, b = pairs["base_layer.out_proj"]
    b_used = b.clone()
    b_used[:, R:] = 1.0  # the padding in use: more rank than the adapter has
    with pytest.raises(ValueError, match="rank beyond"):
        other.load_peft("default", {"": pairs[""], "base_layer.out_proj": (a + 1.0, b_used)})
    k_rows = pairs[""][1].clone()
    k_rows[E:2 * E] = 1.0
    with pytest.raises(ValueError, match="outside the per-slice block"):
        other.load_peft("default", {"": (pairs[""][0], k_rows), "base_layer.out_proj": (a, b)})
    q_only = LoraMultiheadAttention(_mha(True), "default", _spec(("q",)))
    with pytest.raises(ValueError, match="no 'o' slice"):
        q_only.load_peft("default", {"": (pairs[""][0][:R], pairs[""][1][:, :R]), "out_proj": (a, b)})


def test_open_clip_tiny_vit_attention():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=8, image_size=32),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=4, layers=2),
    ).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model.encode_image(images)
    path = "visual.transformer.resblocks.0.attn"
    inject_lora(model, {path: _spec(("q", "v", "o"))})
    layer = model.get_submodule(path)
    assert isinstance(layer, LoraMultiheadAttention)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), before, atol=1e-5, rtol=0)
        _randomize(layer)
        adapted = model.encode_image(images)
        assert (adapted - before).abs().max() > 1e-3
        layer.merge()
        torch.testing.assert_close(model.encode_image(images), adapted, atol=1e-5, rtol=0)
