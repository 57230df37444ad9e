"""Inputs of ``bench/e2e.py`` shared by every system: the random-weight model folder of a preset, the
generated JPEG + caption data set, its real-token count, and the HF side's dataset and padding collator."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WORDS = ("cell nucleus stain membrane lesion lower upper left right center dense sparse round oval cluster "
         "pink blue purple dark light small large edge field tissue sample visible several few many shows "
         "a the with and of in near around").split()
PROMPT = "Describe the image."


def build_model_folder(p: dict, folder: Path, device: str) -> None:
    """A random-weight model of preset ``p`` with its processor at ``p['img']``-px images (built on
    ``device``; saved in bf16 from CUDA, else fp32)."""
    from transformers import AutoModelForImageTextToText

    config, processor = {"llava": llava_config, "qwen2_5_vl": qwen_config}[p.get("arch", "llava")](p)

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        model = AutoModelForImageTextToText.from_config(config)
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the runs are child processes: leave them the memory
    processor.save_pretrained(folder)


def llava_config(p: dict):
    """LLaVA config of preset ``p`` and the tiny-llava processor resized to ``p['img']``."""
    from transformers import AutoProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig

    processor = AutoProcessor.from_pretrained(REPO / "assets" / "tiny-llava")
    base = LlavaConfig.from_pretrained(REPO / "assets" / "tiny-llava")
    processor.image_processor.size = {"shortest_edge": p["img"]}
    processor.image_processor.crop_size = {"height": p["img"], "width": p["img"]}
    processor.patch_size = p["patch"]
    vision = CLIPVisionConfig(hidden_size=p["vh"], intermediate_size=4 * p["vh"], num_hidden_layers=p["vl"],
                              num_attention_heads=max(1, p["vh"] // 64), image_size=p["img"], patch_size=p["patch"])
    text = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["th"], intermediate_size=p["inter"],
                       num_hidden_layers=p["tl"], num_attention_heads=max(1, p["th"] // 128),
                       max_position_embeddings=8192, bos_token_id=base.text_config.bos_token_id,
                       eos_token_id=base.text_config.eos_token_id, pad_token_id=base.text_config.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=base.image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(p["img"] // p["patch"]) ** 2, pad_token_id=base.pad_token_id)
    return config, processor


def qwen_config(p: dict):
    """Qwen2.5-VL config of preset ``p`` (published 7B sizes, or the tiny sizes of ``p``) and the tiny
    Qwen2.5-VL processor taking ``p['img']``-px images whole; special-token ids follow its tokenizer."""
    from transformers import Qwen2_5_VLConfig

    from vlm_lora.architectures.published_configs import published_config
    from vlm_lora.architectures.tiny_processors import tiny_processor

    processor = tiny_processor("qwen2_5_vl")
    processor.image_processor.patch_size = p["patch"]
    pixels = p["img"] * p["img"]
    processor.image_processor.size = {"shortest_edge": pixels, "longest_edge": pixels}
    ids = {name: processor.tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    tokenizer = processor.tokenizer
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    if "published" in p:
        config = published_config(p["published"])
        for key, value in {**ids, **special}.items():
            setattr(config, key, value)
            setattr(config.text_config, key, value)
        return config, processor
    text = dict(hidden_size=p["th"], intermediate_size=p["inter"], num_hidden_layers=p["tl"], num_attention_heads=4,
                num_key_value_heads=2, vocab_size=p["vocab"], **special,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 2, 2]})
    vision = dict(depth=p["vl"], hidden_size=p["vh"], intermediate_size=2 * p["vh"], num_heads=4, patch_size=p["patch"],
                  out_hidden_size=p["th"], window_size=4 * p["patch"], fullatt_block_indexes=[p["vl"] - 1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids), processor


def make_data(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` JPEG images of random shapes and captions of 5-60 words; returns the caption JSONL."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 6)):
            x, y, r = rng.randrange(size), rng.randrange(size), rng.randint(2, max(3, size // 6))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(folder / "images" / f"{i:05d}.jpg", quality=90)
        caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + "."
        rows.append({"image": f"images/{i:05d}.jpg", "caption": caption})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def conversation(caption: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": caption}]}]


def row_tokens(model_dir: Path, data: Path) -> list[int]:
    """Image + text tokens of each sample (what a padding-free batch holds of it)."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    lengths = []
    for line in data.read_text().splitlines():
        row = json.loads(line)
        text = processor.apply_chat_template(conversation(row["caption"]), tokenize=False)
        image = Image.open(data.parent / row["image"]).convert("RGB")
        lengths.append(processor(images=[image], text=[text], return_tensors="pt")["input_ids"].shape[1])
    return lengths


def real_tokens(model_dir: Path, data: Path) -> int:
    """Image + text tokens of every sample."""
    return sum(row_tokens(model_dir, data))



class CaptionRows(torch.utils.data.Dataset):
    """The JSONL rows with the text's token ids (``input_ids``: what length grouping sorts by)."""

    def __init__(self, data: Path, tokenizer):
        self.rows = [json.loads(line) for line in data.read_text().splitlines()]
        self.root = data.parent
        self.ids = [tokenizer(PROMPT + " " + r["caption"])["input_ids"] for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "image": str(self.root / self.rows[i]["image"]),
                "caption": self.rows[i]["caption"]}


class PaddingCollator:
    """What LLaVA/TRL scripts do: render, process with ``padding=True``, labels = answer tokens."""

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length  # pad every batch to this length (fixed shapes for torch.compile)
        processor.tokenizer.padding_side = "right"  # training pads right (LLaVA's train.py does the same)

    def __call__(self, items: list[dict]) -> dict:
        from PIL import Image

        images = [Image.open(it["image"]).convert("RGB") for it in items]
        texts = [self.processor.apply_chat_template(conversation(it["caption"]), tokenize=False) for it in items]
        prompts = [self.processor.apply_chat_template(conversation(it["caption"])[:1], tokenize=False,
                                                      add_generation_prompt=True) for it in items]
        padding = dict(padding="max_length", max_length=self.max_length) if self.max_length else dict(padding=True)
        batch = self.processor(images=images, text=texts, return_tensors="pt", **padding)
        prompt_lens = self.processor(images=images, text=prompts, padding=True, return_tensors="pt")[
            "attention_mask"].sum(1)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        for row, n in enumerate(prompt_lens.tolist()):
            labels[row, :n] = -100
        batch["labels"] = labels
        return dict(batch)
