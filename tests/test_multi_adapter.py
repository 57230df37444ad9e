"""Several adapters in one model: switching, sums, disable, delete, and a different adapter per batch row
(plain, DoRA/rsLoRA, fused-qkv and MHA layers, packed and multi-image vision rows, a tiny LLaVA with
fully-trained connectors, forward and generate)."""

import copy

import pytest
import torch
from torch import nn

import vlm_lora
from conftest import randomize_adapters
from vlm_lora.lora import AdapterSpec, LoraLinear, inject_lora
from vlm_lora.lora.fused import FusedLinearLora
from vlm_lora.lora.mha import LoraMultiheadAttention
from vlm_lora.lora.routing import RoutingError, SampleRouting

NAMES = ["a", None, "b", "a"]


def _randomize_b(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _single(model: nn.Module, name: str | None, *args):
    if name is None:
        with vlm_lora.disable_adapters(model):
            return model(*args)
    vlm_lora.set_adapter(model, name)
    return model(*args)


def _linear_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 8))
    inject_lora(model, {"0": AdapterSpec(rank=2, alpha=4, variant="dora"), "2": AdapterSpec(rank=3, alpha=6)}, "a")
    inject_lora(model, {"0": AdapterSpec(rank=5, alpha=3, rslora=True)}, "b")  # b leaves layer 2 alone
    _randomize_b(model, 1)
    return model


def _fused_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24))
    order = ("q", "k", "v")
    inject_lora(model, {"0": AdapterSpec(rank=2, alpha=4, slices=("q", "v"), slice_order=order)}, "a")
    inject_lora(model, {"0": AdapterSpec(rank=3, alpha=3, slices=("k",), slice_order=order)}, "b")
    _randomize_b(model, 2)
    return model


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0] + self.attn(x, x[:, :3], x[:, :3], need_weights=False)[0]


def _mha_model() -> nn.Module:
    torch.manual_seed(0)
    model = _Attention().eval()
    qkvo = ("q", "k", "v", "o")
    inject_lora(model, {"attn": AdapterSpec(rank=2, alpha=4, slices=("q", "v", "o"), slice_order=qkvo)}, "a")
    inject_lora(model, {"attn": AdapterSpec(rank=4, alpha=2, slices=("k",), slice_order=qkvo)}, "b")
    _randomize_b(model, 3)
    return model


@pytest.mark.parametrize("make, in_dim, layer_type", [(_linear_model, 12, LoraLinear),
                                                      (_fused_model, 12, FusedLinearLora),
                                                      (_mha_model, 16, LoraMultiheadAttention)])
def test_mixed_batch_rows_equal_single_adapter_runs(make, in_dim, layer_type):
    model = make()
    assert any(isinstance(m, layer_type) for m in model.modules())
    x = torch.randn(len(NAMES), 5, in_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        singles = {name: _single(model, name, x) for name in ("a", "b", None)}
        with vlm_lora.adapter_per_sample(model, NAMES):
            mixed = model(x)
        perm = [2, 0, 3, 1]
        with vlm_lora.adapter_per_sample(model, [NAMES[i] for i in perm]):
            permuted = model(x[perm])
    assert (singles["a"] - singles[None]).abs().max() > 1e-2 and (singles["b"] - singles[None]).abs().max() > 1e-2
    for row, name in enumerate(NAMES):
        torch.testing.assert_close(mixed[row], singles[name][row], atol=1e-5, rtol=0)
    torch.testing.assert_close(permuted, mixed[perm], atol=1e-5, rtol=0)
    assert all(m.routing is None for m in model.modules() if isinstance(m, layer_type))


def test_set_adapter_several_is_the_sum_and_delete_unwraps():
    model = nn.Sequential(nn.Linear(12, 16))
    inject_lora(model, {"0": AdapterSpec(rank=2, alpha=4)}, "a")
    inject_lora(model, {"0": AdapterSpec(rank=3, alpha=3)}, "b")
    _randomize_b(model, 5)
    layer, x = model[0], torch.randn(3, 12)
    vlm_lora.set_adapter(model, ["a", "b"])
    expected = layer.base_layer(x) + x @ (layer.delta_weight("a") + layer.delta_weight("b")).T
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        vlm_lora.set_adapter(model, "c")
    vlm_lora.delete_adapter(model, "a")
    assert set(layer.specs) == {"b"} and "a" not in layer.lora_A and "a" not in layer.scaling
    torch.testing.assert_close(model(x), layer.base_layer(x) + x @ layer.delta_weight("b").T, atol=1e-5, rtol=0)
    vlm_lora.delete_adapter(model, "b")
    assert type(model[0]) is nn.Linear


def test_packed_and_multi_image_rows_route_to_their_sample():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    inject_lora(model, {"0": AdapterSpec(rank=2, alpha=2)}, "a")
    inject_lora(model, {"0": AdapterSpec(rank=2, alpha=2)}, "b")
    _randomize_b(model, 6)
    layer = model[0]
    layer.routing_side = "image"
    # sample 0: two images of 3 and 5 patches, sample 1: one image of 4 patches, packed as [12, C]
    x = torch.randn(12, 6)
    with torch.no_grad():
        with vlm_lora.adapter_per_sample(model, ["b", "a"], images_per_sample=[2, 1], rows_per_image=[3, 5, 4]):
            layer.routing_side = "image"
            packed = model(x)
            images = model(torch.randn(3, 7, 6))  # [images, patches, C]: images 0-1 are sample 0's
        vlm_lora.set_adapter(model, "b")
        torch.testing.assert_close(packed[:8], model(x[:8]), atol=1e-6, rtol=0)
        vlm_lora.set_adapter(model, "a")
        torch.testing.assert_close(packed[8:], model(x[8:]), atol=1e-6, rtol=0)
    assert images.shape == (3, 7, 4)
    routing = SampleRouting(["a", "b"], images_per_sample=[2, 1])
    assert routing.rows(torch.Size([3, 2]), torch.device("cpu"), "image")["a"][0].tolist() == [0, 1, 2, 3]
    assert routing.rows(torch.Size([6, 2]), torch.device("cpu"), "text")["b"][0].tolist() == [6, 7, 8, 9, 10, 11]
    with pytest.raises(RoutingError, match="cannot map a layer input with 5 rows"):
        routing.rows(torch.Size([5, 2]), torch.device("cpu"), "text")


def test_fewer_names_than_rows_is_an_error_not_a_repeat(tiny_llava, tiny_batch):
    """2 names for 4 rows used to run rows 0-1 with the first name and 2-3 with the second (read as
    2 beams); forward and generate now refuse, naming both counts. One name serves every row; beam
    search on one name per row still routes (the beams of row i run names[i])."""
    model = _linear_model()
    x = torch.randn(4, 5, 12)
    with torch.no_grad():
        with pytest.raises(RoutingError, match="got 2 adapter names for a batch of 4 rows"):
            with vlm_lora.adapter_per_sample(model, ["a", "b"]):
                model(x)
        with vlm_lora.adapter_per_sample(model, ["b"]):
            torch.testing.assert_close(model(x), _single(model, "b", x), atol=1e-6, rtol=0)
    plan = vlm_lora.plan(tiny_llava, "language_only", connector={"mode": "frozen"})
    plan.apply(tiny_llava)
    randomize_adapters(tiny_llava, seed=3)
    batch = {k: torch.cat([v, v]) for k, v in tiny_batch.items()}  # 4 rows
    with torch.no_grad(), vlm_lora.adapter_per_sample(tiny_llava, ["default", None]):
        with pytest.raises(ValueError, match="got 2 adapter names for a batch of 4 rows"):
            tiny_llava(**batch)
        with pytest.raises(ValueError, match="got 2 adapter names for a batch of 4 rows"):
            tiny_llava.generate(**batch, max_new_tokens=2, do_sample=False)
        beams = tiny_llava.generate(**tiny_batch, max_new_tokens=3, do_sample=False, num_beams=2)
    with vlm_lora.adapter_per_sample(tiny_llava, ["default"]), vlm_lora.adapter_per_sample(tiny_llava, [None]):
        pass  # nested blocks put back what they found
    assert "generate" not in vars(tiny_llava)
    with torch.no_grad():
        alone = tiny_llava.generate(**{k: v[:1] for k, v in tiny_batch.items()}, max_new_tokens=3, do_sample=False,
                                    num_beams=2)
    assert torch.equal(beams[:1], alone)


def test_tiny_llava_named_adapters_with_full_connectors_mix_per_sample(tiny_llava, tiny_batch, tmp_path):
    """Two saved adapters (different components and ranks, each with its own trained connector) loaded
    by name: every row of a mixed forward and of a mixed generate equals that adapter loaded alone."""
    base = copy.deepcopy(tiny_llava)
    for i, (strategy, options) in enumerate([("language_only", {"language_decoder": {"rank": 4}}),
                                             ("both", {"vision_encoder": {"rank": 2}})]):
        model = copy.deepcopy(base)
        plan = vlm_lora.plan(model, strategy, **options)
        plan.apply(model)
        randomize_adapters(model, seed=10 + i)
        vlm_lora.save_adapter(model, tmp_path / f"ad{i}", "tiny", plan.full_prefixes())
    batch = {k: torch.cat([v, v.flip(0)]) for k, v in tiny_batch.items()}  # 4 rows
    names = ["ad0", "ad1", None, "ad1"]
    singles = {}
    with torch.no_grad():
        for name in ("ad0", "ad1"):
            alone = copy.deepcopy(base)
            vlm_lora.load_adapter(alone, tmp_path / name)  # default name: connector overwritten
            singles[name] = (alone(**batch).logits, alone.generate(**batch, max_new_tokens=4, do_sample=False))
        singles[None] = (base(**batch).logits, base.generate(**batch, max_new_tokens=4, do_sample=False))
        model = copy.deepcopy(base)
        for name in ("ad0", "ad1"):
            vlm_lora.load_adapter(model, tmp_path / name, adapter_name=name)
        with vlm_lora.adapter_per_sample(model, names):
            logits = model(**batch).logits
            generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
        vlm_lora.set_adapter(model, "ad1")
        torch.testing.assert_close(model(**batch).logits, singles["ad1"][0], atol=1e-4, rtol=0)
    assert (singles["ad0"][0] - singles[None][0]).abs().max() > 1e-2
    for row, name in enumerate(names):
        torch.testing.assert_close(logits[row], singles[name][0][row], atol=1e-4, rtol=0)
        assert torch.equal(generated[row], singles[name][1][row])


def test_mixed_batch_eval_gives_the_sequential_captions(tmp_path):
    """``vlm-lora eval --mixed-batch`` (beam search, one adapter with a fully-trained connector) writes the
    captions and metrics of scoring base, a and b one at a time."""
    import json

    from conftest import ASSET_DATA, ASSET_MODEL
    from vlm_lora.cli import main
    from vlm_lora.eval.captioning import compare_models
    from vlm_lora.eval.coco import load_caption_data
    from vlm_lora.modeling import load_model_and_processor

    model, processor = load_model_and_processor(str(ASSET_MODEL))
    for name, seed, overrides in (("a", 1, {}), ("b", 2, {"connector": {"mode": "frozen"},
                                                          "language_decoder": {"rank": 4, "targets": ["q", "v"]}})):
        trained = copy.deepcopy(model)
        plan = vlm_lora.plan(trained, "language_only", **overrides)
        plan.apply(trained)
        randomize_adapters(trained, seed)
        vlm_lora.save_adapter(trained, tmp_path / name, str(ASSET_MODEL), plan.full_prefixes())
    data_file = ASSET_DATA / "microscopy" / "eval.jsonl"
    decoding = dict(prompt="Describe the image.", batch_size=3, max_new_tokens=6, num_beams=2)
    summary, rows = compare_models(model, processor, load_caption_data(data_file, limit=5),
                                   [("a", tmp_path / "a"), ("b", tmp_path / "b")], **decoding)
    assert main(["eval", "--model", str(ASSET_MODEL), "--adapter", str(tmp_path / "a"), "--adapter",
                 str(tmp_path / "b"), "--names", "a", "b", "--data", str(data_file), "--limit", "5",
                 "--out", str(tmp_path / "mixed"), "--batch-size", "3", "--max-new-tokens", "6", "--num-beams", "2",
                 "--mixed-batch", "--contact-sheet", "0"]) == 0
    mixed = [json.loads(line) for line in (tmp_path / "mixed" / "predictions.jsonl").read_text().splitlines()]
    assert [r["predictions"] for r in mixed] == [r["predictions"] for r in rows]
    assert len({r["predictions"]["a"] + r["predictions"]["b"] for r in rows}) > 1
    assert any(r["predictions"]["a"] != r["predictions"]["b"] for r in rows)
    mixed_summary = json.loads((tmp_path / "mixed" / "summary.json").read_text())
    for label in ("base", "a", "b"):
        assert {k: v for k, v in mixed_summary[label].items() if k != "speed"} == \
               {k: v for k, v in summary[label].items() if k != "speed"}
    assert mixed_summary["a"]["speed"]["mixed_batch"] is True
