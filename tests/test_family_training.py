"""Every modern family trains, captions, exports and resumes on its tiny model (CPU), through the
quickstart recipe with only the model path, the strategy and the vision mode changed.

One tiny model folder per family per session (``scripts/make_tiny_models.py --family``); per family one
4-step run (checkpoint at 2), a resume from the checkpoint, a merge and a PeftModel load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ASSET_DATA, REPO
from vlm_lora.architectures.tiny_processors import STYLE, save_tiny_family
from vlm_lora.data.datasets import IGNORE_INDEX

pytestmark = [pytest.mark.slow, pytest.mark.families]
FAMILIES = list(STYLE)
ANSWER_END = {"qwen": "<|im_end|>\n", "gemma": "<end_of_turn>\n", "paligemma": "<eos>",
              "idefics3": "<end_of_utterance>\n", "mllama": "<|eot_id|>", "internvl": "<|im_end|>\n",
              "llava_onevision": "<|im_end|>\n"}  # the end-of-turn text each family's labels close with


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """family -> its tiny model folder, written once per session."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = save_tiny_family(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return made[family]
    return get


def _rows(split: str, n: int) -> list[dict]:
    rows = [json.loads(r) for r in (ASSET_DATA / "microscopy" / f"{split}.jsonl").read_text().splitlines()[:n]]
    return [{**r, "image": str(ASSET_DATA / "microscopy" / r["image"])} for r in rows]


def _recipe(tmp_path: Path, model: Path):
    """recipes/quickstart.yaml with model.path, strategy=both and components.vision_encoder.mode=lora set
    (as ``--set`` would), on 4 training rows and 1 eval row, 4 steps of 2 samples."""
    from vlm_lora.recipe import apply_overrides, validate_recipe

    for split, n in (("train", 4), ("eval", 1)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(split, n)))
    data = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    data = apply_overrides(data, [f"model.path={model}", "strategy=both", "components.vision_encoder.mode=lora"])
    data["data"].update(train=str(tmp_path / "train.jsonl"), eval=str(tmp_path / "eval.jsonl"))
    data["train"].update(batch_size=2, max_steps=4, save_steps=2, eval_steps=None, log_steps=1, warmup_steps=0,
                         learning_rate=5e-3, eval_base=False, eval_batch_size=1, max_new_tokens=4,
                         save_total_limit=10)
    data["output_dir"] = str(tmp_path / "run")
    return validate_recipe(data)


def _loss(model, collate, items) -> float:
    with torch.no_grad():
        return float(model(**collate(items)).loss)


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is faster than several fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_captions_exports_and_resumes(family, family_dir, tmp_path, one_thread):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_lora.adapters.merge import merge_adapter, probe_batch
    from vlm_lora.adapters.peft_format import load_adapter
    from vlm_lora.data.collate import make_collator
    from vlm_lora.data.datasets import load_dataset
    from vlm_lora.eval.captioning import generate_captions
    from vlm_lora.train import finetune

    model_dir = family_dir(family)
    recipe = _recipe(tmp_path, model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    collate = make_collator(processor, recipe)
    train = load_dataset(recipe.data.train, prompt=recipe.data.prompt)
    items = [train[i] for i in range(len(train))]

    # labels: exactly the answer and the family's end-of-turn text, nothing of image or prompt
    batch = collate(items[:2])
    for row, labels in zip(_rows("train", 2), batch["labels"]):
        text = processor.tokenizer.decode(labels[labels != IGNORE_INDEX])
        assert text == row["caption"] + ANSWER_END[STYLE[family]], text

    finetune(recipe)
    run = Path(recipe.output_dir)
    base = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    before = _loss(base, collate, items)
    load_adapter(base, run / "adapter_last")
    after = _loss(base, collate, items)
    print(f"{family}: loss on the 4 training samples {before:.3f} -> {after:.3f}")
    assert after < before - 0.1

    predictions = [json.loads(line) for line in (run / "predictions_adapted.jsonl").read_text().splitlines()]
    assert len(predictions) == 1 and all(isinstance(p["prediction"], str) for p in predictions)
    train.examples = train.examples[:2]  # a batch of two prompts, each with its own image, beam search
    beams = generate_captions(base, processor, train, recipe.data.prompt, batch_size=2, max_new_tokens=3, num_beams=2)
    assert len(beams) == 2 and all(isinstance(c, str) for c in beams)

    # merged export == the adapter loaded by PEFT, on the probe the family's processor builds
    report = merge_adapter(str(model_dir), run / "adapter_last", tmp_path / "merged")
    probe = {k: v for k, v in probe_batch(processor).items() if isinstance(v, torch.Tensor)}
    peft_model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model_dir),
                                           str(run / "adapter_last")).eval()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        peft_logits, merged_logits = peft_model(**probe).logits, merged(**probe).logits
        base_logits = AutoModelForImageTextToText.from_pretrained(model_dir).eval()(**probe).logits
    difference = (peft_logits - merged_logits).abs().max().item()
    print(f"{family}: PeftModel vs merged export max |logit difference| {difference:.2e} "
          f"(merge's own check {report['max_logit_diff']:.2e})")
    assert difference <= 1e-3 and report["max_logit_diff"] <= 1e-3
    assert (peft_logits - base_logits).abs().max().item() > 1e-2  # the adapter does change the model

    # resume: from checkpoint-2 (the last step writes adapters, no checkpoint) to the same adapter
    straight = load_file(run / "adapter_last" / "adapter_model.safetensors")
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-2"]
    finetune(recipe, resume=True)
    resumed = load_file(run / "adapter_last" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
