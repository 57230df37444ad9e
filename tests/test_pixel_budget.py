"""Pixel budgets (data.min_pixels / max_pixels / max_total_pixels) on tiny Qwen2.5-VL: our smart_resize equals
transformers', the image token count moves as the processor predicts, and the budget survives export."""

import json

import pytest
import torch
import yaml
from PIL import Image

from conftest import ASSET_DATA, ASSET_MODEL, REPO
from vlm_lora.data.pixels import PixelBudget, set_processor_pixels, smart_resize


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from vlm_lora.architectures.tiny_processors import save_tiny_family

    return save_tiny_family("qwen2_5_vl", tmp_path_factory.mktemp("tiny-qwen2_5_vl"))


def test_smart_resize_equals_transformers():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as reference

    for height, width in [(48, 48), (60, 100), (7, 300), (1000, 33), (224, 224), (1080, 1920), (17, 17)]:
        for factor, low, high in [(8, 256, 1024), (28, 56 * 56, 28 * 28 * 1280), (32, 64 * 64, 128 * 128), (8, 64, 64)]:
            assert smart_resize(height, width, factor, low, high) == reference(height, width, factor, low, high)


def _image_tokens(processor, images):
    """Image pad tokens the processor puts in one sample's text (the count the language model sees)."""
    image_token = processor.image_token
    text = "".join("<|vision_start|>" + image_token + "<|vision_end|>" for _ in images) + "hi"
    out = processor(images=images, text=[text], return_tensors="pt")
    return int((out["input_ids"] == processor.tokenizer.convert_tokens_to_ids(image_token)).sum())


def test_token_count_moves_as_the_processor_predicts(qwen_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(qwen_dir)
    sizes = [(48, 48), (100, 60)]
    images = [Image.new("RGB", size, (200, 30, 30)) for size in sizes]
    seen = []
    for low, high in [(None, None), (None, 48 * 48), (64 * 64, 96 * 96), (16 * 16, 16 * 16)]:
        if low or high:
            set_processor_pixels(processor, low, high)
        budget = PixelBudget.of(processor)
        for image in images:
            assert _image_tokens(processor, [image]) == budget.tokens([image.size])
        seen.append(budget.tokens(sizes))
    # by hand (factor 8, one token per 8 x 8 px): default 256..1024 px: 32x32 + 24x40; max 2304: 48x48 + 32x56;
    # 4096..9216: 64x64 (grown) + 64x96 (rounded half to even); max 256: 16x16 + 8x16
    assert seen == [16 + 15, 36 + 28, 64 + 96, 4 + 2]
    # a per-sample cap: both images shrink by one ratio, the processor keeps the fitted sizes as they are
    set_processor_pixels(processor, 16 * 16, 96 * 96)
    capped = PixelBudget.of(processor, max_total_pixels=3000)
    fitted = capped.fit_images(images)
    assert sum(w * h for w, h in (im.size for im in fitted)) <= 3000
    assert _image_tokens(processor, fitted) == capped.tokens(sizes) < PixelBudget.of(processor).tokens(sizes)
    with pytest.raises(ValueError, match="data.max_total_pixels 300 is below 2 image"):
        PixelBudget.of(processor, max_total_pixels=300).fit_sizes(sizes)


def _recipe(model_path, tmp_path, **data):
    from vlm_lora.recipe import apply_overrides, validate_recipe

    recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    recipe = apply_overrides(recipe, [f"model.path={model_path}"])
    recipe["data"].update(train=str(ASSET_DATA / "microscopy" / "train.jsonl"), eval=None, **data)
    recipe["train"].update(batch_size=4, max_steps=2, save_steps=100, eval_steps=None, log_steps=1, warmup_steps=0,
                           eval_base=False)
    recipe["output_dir"] = str(tmp_path / "run")
    return validate_recipe(recipe)


def test_budget_trains_saves_and_survives_export(qwen_dir, tmp_path, capsys):
    from transformers import AutoProcessor

    from vlm_lora.adapters.merge import merge_adapter
    from vlm_lora.adapters.peft_format import read_meta
    from vlm_lora.train import finetune
    from vlm_lora.train.setup import build_task_and_data, load_for_recipe

    recipe = _recipe(qwen_dir, tmp_path, min_pixels=64 * 64, max_pixels=96 * 96, max_total_pixels=9000)
    model, processor = load_for_recipe(recipe, "cpu")
    task, train_set, _ = build_task_and_data(recipe, model, processor)
    batch = task.collate([train_set[0]])  # 48 x 48 microscopy image grown to 64 x 64: 8 x 8 merged patches
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 64
    assert batch["image_grid_thw"].tolist() == [[1, 16, 16]]
    finetune(recipe)
    meta = read_meta(tmp_path / "run" / "adapter")
    assert meta["processor"] == {"min_pixels": 4096, "max_pixels": 9216, "max_total_pixels": 9000}
    merge_adapter(str(qwen_dir), tmp_path / "run" / "adapter", tmp_path / "merged")
    exported = AutoProcessor.from_pretrained(tmp_path / "merged")
    assert (exported.image_processor.size["shortest_edge"], exported.image_processor.size["longest_edge"]) == (4096, 9216)
    assert _image_tokens(exported, [Image.new("RGB", (48, 48))]) == 64
    from vlm_lora.adapters.export import export  # the serving export's base folder carries the budget too

    export(str(qwen_dir), [tmp_path / "run" / "adapter"], tmp_path / "served", "vllm")
    served = AutoProcessor.from_pretrained(tmp_path / "served" / "base")
    assert (served.image_processor.size["shortest_edge"], served.image_processor.size["longest_edge"]) == (4096, 9216)
    # eval with the adapter: the base processor takes the adapter's budget; adapters that disagree are refused
    import shutil

    from vlm_lora.adapters.peft_format import AdapterError
    from vlm_lora.eval.pixels import use_adapter_pixels

    base = AutoProcessor.from_pretrained(qwen_dir)
    assert use_adapter_pixels(base, [tmp_path / "run" / "adapter"]) == {"min_pixels": 4096, "max_pixels": 9216}
    assert _image_tokens(base, [Image.new("RGB", (48, 48))]) == 64
    other = shutil.copytree(tmp_path / "run" / "adapter", tmp_path / "other")
    (other / "vlm_lora.json").write_text(json.dumps({**meta, "processor": {"max_pixels": 1024}}))
    with pytest.raises(AdapterError, match="different pixel budgets"):
        use_adapter_pixels(base, [tmp_path / "run" / "adapter", other])

    from vlm_lora.cli import main

    capsys.readouterr()
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(json.loads(recipe.model_dump_json())))
    main(["plan", str(tmp_path / "r.yaml")])
    printed = capsys.readouterr().err
    assert "image tokens per sample (480 samples" in printed and "min 64, mean 64.0, max 64" in printed


def test_fixed_resolution_family_refuses_a_budget(tmp_path):
    from vlm_lora.train.setup import TrainingError, load_for_recipe

    with pytest.raises(TrainingError, match=r"data.max_pixels: pixel budgets apply to dynamic-resolution families "
                                            r"\(qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe\); llava"):
        load_for_recipe(_recipe(ASSET_MODEL, tmp_path, max_pixels=1024), "cpu")
