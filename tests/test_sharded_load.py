"""Sharded loading in one process (a 1-rank gloo group): the shards hold exactly the checkpoint's tensors
and the adapters the values a loaded model gets from the same seed; what cannot load sharded says why."""

import pytest
import torch

from conftest import ASSET_MODEL, REPO


@pytest.fixture
def recipe():
    from vlm_lora.recipe import load_recipe

    return lambda *overrides: load_recipe(REPO / "recipes" / "quickstart.yaml",
                                          [f"model.path={ASSET_MODEL}", "train.fsdp=true", *overrides])


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_shards_equal_the_loaded_model_and_its_adapters(recipe, one_rank_group):
    from torch.distributed.tensor import DTensor

    from vlm_lora.planner import plan as make_plan
    from vlm_lora.train.setup import load_for_recipe
    from vlm_lora.train.sharded_load import load_sharded

    r = recipe("components.vision_encoder.mode=lora")
    torch.manual_seed(0)
    loaded, _ = load_for_recipe(r, "cpu")
    make_plan(loaded, r.strategy, r.components).apply(loaded)
    expected = dict(loaded.named_parameters())
    torch.manual_seed(0)
    sharded, processor, plan = load_sharded(r, "no", (), torch.device("cpu"))
    params = dict(sharded.named_parameters())
    assert params.keys() == expected.keys() and all(isinstance(p, DTensor) for p in params.values())
    for name, param in params.items():
        assert torch.equal(param.full_tensor(), expected[name].detach()), name
        assert param.requires_grad == expected[name].requires_grad, name
    for name, buffer in sharded.named_buffers():  # rotary tables and position ids, computed not loaded
        assert torch.equal(buffer, dict(loaded.named_buffers())[name]), name
    assert sum(p.requires_grad for p in params.values()) == sum(p.requires_grad for p in expected.values()) > 0


def test_what_cannot_load_sharded_says_why(recipe):
    from vlm_lora.train.sharded_load import refusal

    assert refusal(recipe()) is None
    assert "4-bit" in refusal(recipe("model.quantization.bits=4"))
    assert "pissa" in refusal(recipe("components.language_decoder.init=pissa"))
    assert "dora" in refusal(recipe("components.language_decoder.variant=dora"))
    assert "timm models load whole" in refusal(recipe(f"model.path={REPO / 'assets' / 'tiny-vit'}"))
