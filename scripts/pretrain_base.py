"""Build and pretrain the embedded tiny LLaVA base model under ``assets/tiny-llava/``.

The base is a real ``LlavaForConditionalGeneration`` (CLIP vision tower, two-layer MLP
connector, Llama decoder) with a byte-level BPE tokenizer, a CLIP image processor and a
``LlavaProcessor`` with a chat template: everything a hub LLaVA has, a thousand times smaller.

Pretraining mixes two objectives so the base behaves like a real one:
* captioning the *general* data set (prompt and image tokens masked out of the loss),
* text-only language modelling on a generated English corpus, so that every token that
  ordinary English uses has a trained embedding.

It never sees the *microscopy* domain, which the quickstart recipe then teaches with LoRA.
Deterministic for a given torch version and thread count (seeded, fixed threads)::

    python scripts/make_datasets.py && python scripts/pretrain_base.py   # ~8 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from english_corpus import corpus  # noqa: E402
from make_datasets import IMAGE_SIZE, general_sample  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Describe the image."
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]


def build_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE: all 256 bytes plus merges learnt on ``texts`` (so every merge is trained)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=50,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )
    return fast


def build_processor(tokenizer, patch_size: int):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer, patch_size: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=patch_size, projection_dim=128,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=(IMAGE_SIZE // patch_size) ** 2, pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaForConditionalGeneration(config)


def caption_batch(processor, images, captions):
    """Chat-formatted caption examples; labels only on the answer and its end token."""
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True) for _ in captions]
    full = [p + " " + c + processor.tokenizer.eos_token for p, c in zip(prompts, captions)]
    tok = processor.tokenizer
    tok.padding_side = "right"
    batch = processor(images=images, text=full, return_tensors="pt", padding=True)
    prompt_lens = [len(ids) for ids in processor(images=images, text=prompts)["input_ids"]]
    labels = batch["input_ids"].clone()
    for row, n in enumerate(prompt_lens):
        labels[row, :n] = -100
    labels[batch["attention_mask"] == 0] = -100
    tok.padding_side = "left"
    return batch, labels


def text_batch(tokenizer, sentences):
    tokenizer.padding_side = "right"
    batch = tokenizer([tokenizer.bos_token + s + tokenizer.eos_token for s in sentences],
                      return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = "left"
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    return batch, labels


def main() -> None:
    parser = argparse.ArgumentParser(description="pretrain the embedded tiny LLaVA")
    parser.add_argument("--out", type=Path, default=REPO / "assets" / "tiny-llava")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(args.seed)

    english = corpus(40000, seed=args.seed)
    data_dir = REPO / "assets" / "data" / "general"
    rows = [json.loads(line) for line in open(data_dir / "train.jsonl")]
    images = [Image.open(data_dir / r["image"]).convert("RGB") for r in rows]
    captions = [r["caption"] for r in rows]
    # More scenes from the same generator (another seed) so the base sees the general domain widely.
    gen_rng = random.Random(1000 + args.seed)
    for _ in range(3000):
        image, caption, _ = general_sample(gen_rng)
        images.append(image)
        captions.append(caption)

    tokenizer = build_tokenizer(english + captions, vocab_size=384)
    processor = build_processor(tokenizer, patch_size=8)
    model = build_model(tokenizer, patch_size=8)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}, params {n_params / 1e6:.2f}M, {len(images)} caption examples")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = 50
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    model.train()
    start = time.time()
    for step in range(args.steps):
        idx = [rng.randrange(len(images)) for _ in range(args.batch_size)]
        batch, labels = caption_batch(processor, [images[i] for i in idx], [captions[i] for i in idx])
        caption_loss = model(**batch, labels=labels).loss
        tbatch, tlabels = text_batch(tokenizer, [english[rng.randrange(len(english))] for _ in range(args.batch_size)])
        text_loss = model(**tbatch, labels=tlabels).loss
        loss = caption_loss + 0.5 * text_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  caption {caption_loss.item():.3f}  text {text_loss.item():.3f}  "
                  f"{time.time() - start:.0f}s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    print(f"saved to {args.out} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
