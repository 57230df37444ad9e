"""Processors for the tiny family models: an offline byte-level BPE tokenizer with the family's special
tokens, the family's image processor at 16-32 px, and a chat template in the family's style.

``save_tiny_family(family, path)`` writes a folder that ``AutoModelForImageTextToText`` and
``AutoProcessor`` load: the model of :mod:`vlm_lora.architectures.tiny_families` (random init, seed 0)
with its config's special-token ids equal to the tokenizer's.
"""

from __future__ import annotations

from pathlib import Path

from vlm_lora.architectures.tiny_families import (IMAGE_SIZE, PATCH, TOKEN_NAMES, tiny_config, tiny_family_model,
                                                  token_ids)
from vlm_lora.architectures.tiny_models import _SENTENCES

_CORPUS = _SENTENCES + ["pink stain, 5 cells, lesion lower left.", "purple stain, 3 cells, lesion upper right.",
                        "blue stain, 2 cells, no lesion.", "Describe the image.", "user assistant model system"]
_QWEN_TOKENS = {"pad": "<|endoftext|>", "bos": "<|endoftext|>", "eos": "<|im_end|>", "image": "<|image_pad|>",
                "video": "<|video_pad|>", "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>",
                "im_start": "<|im_start|>", "im_end": "<|im_end|>"}
# family -> special token strings by slot of TOKEN_NAMES (a slot left out holds an unused token)
SPECIAL_TOKENS = {
    "qwen": _QWEN_TOKENS,
    "gemma": {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "image": "<image_soft_token>",
              "boi": "<start_of_image>", "eoi": "<end_of_image>", "start_of_turn": "<start_of_turn>",
              "end_of_turn": "<end_of_turn>"},
    "paligemma": {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "image": "<image>"},
    "idefics3": {"pad": "<|endoftext|>", "bos": "<|im_start|>", "eos": "<end_of_utterance>", "image": "<image>",
                 "fake_image": "<fake_token_around_image>", "global_image": "<global-img>",
                 "row_col": "<row_1_col_1>", "end_of_turn": "<end_of_utterance>"},
    "mllama": {"pad": "<|finetune_right_pad_id|>", "bos": "<|begin_of_text|>", "eos": "<|eot_id|>",
               "image": "<|image|>", "vision_start": "<|start_header_id|>", "vision_end": "<|end_header_id|>",
               "boi": "<|python_tag|>"},
    "internvl": {**_QWEN_TOKENS, "image": "<IMG_CONTEXT>", "img_context": "<IMG_CONTEXT>", "boi": "<img>",
                 "eoi": "</img>", "video": "<video>"},
    "llava_onevision": {**_QWEN_TOKENS, "image": "<image>", "video": "<video>"},
}


def _turns(bos: str, headers: dict[str, str], end: str, image: str, cue: str, video: str = "") -> str:
    """A Jinja chat template: ``bos``, then per message ``headers[role]``, its content (``image`` for an
    image part, ``video`` for a video part), ``end``; the generation prompt is ``cue``."""
    branches = "".join(f"{{% {'if' if i == 0 else 'elif'} message['role'] == '{role}' %}}{header}"
                       for i, (role, header) in enumerate(headers.items()))
    return (f"{bos}{{% for message in messages %}}{branches}{{% endif %}}"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            f"{{% for item in message['content'] %}}{{% if item['type'] == 'image' %}}{image}"
            f"{{% elif item['type'] == 'video' %}}{video}"
            "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
            f"{end}{{% endfor %}}{{% if add_generation_prompt %}}{cue}{{% endif %}}")


def _chatml(image: str, video: str = "") -> str:
    return _turns("", {r: f"<|im_start|>{r}\n" for r in ("system", "user", "assistant")}, "<|im_end|>\n", image,
                  "<|im_start|>assistant\n", video)


CHAT_TEMPLATES = {
    "qwen": _chatml("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"),
    "internvl": _chatml("<IMG_CONTEXT>\n"),
    "llava_onevision": _chatml("<image>\n", "<video>\n"),
    "gemma": _turns("<bos>", {"system": "<start_of_turn>user\n", "user": "<start_of_turn>user\n",
                              "assistant": "<start_of_turn>model\n"}, "<end_of_turn>\n", "<start_of_image>",
                    "<start_of_turn>model\n"),
    "idefics3": _turns("<|im_start|>", {"system": "System:", "user": "User:", "assistant": "Assistant:"},
                       "<end_of_utterance>\n", "<image>", "Assistant:"),
    "mllama": _turns("<|begin_of_text|>", {r: f"<|start_header_id|>{r}<|end_header_id|>\n\n"
                                           for r in ("system", "user", "assistant")}, "<|eot_id|>", "<|image|>",
                     "<|start_header_id|>assistant<|end_header_id|>\n\n"),
}


def tiny_tokenizer(style: str):
    """Byte-level BPE learnt on a few captions, then the family's special tokens at the last
    ``len(TOKEN_NAMES)`` ids (in slot order, see ``tiny_families.token_ids``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    names = SPECIAL_TOKENS[style]
    slots = [names.get(slot, f"<|unused_{i}|>") for i, slot in enumerate(TOKEN_NAMES)]
    slots = [s if s not in slots[:i] else f"<|unused_{i}|>" for i, s in enumerate(slots)]  # one id per slot
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in slots])
    extra = {f"{slot}_token": names[slot] for slot in ("image", "video", "boi", "eoi") if slot in names}
    if style == "internvl":
        extra.update(context_image_token="<IMG_CONTEXT>", start_image_token="<img>", end_image_token="</img>")
    if style == "gemma":
        extra.update(boi_token="<start_of_image>", eoi_token="<end_of_image>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=names["pad"], bos_token=names["bos"],
                                   eos_token=names["eos"], extra_special_tokens=extra, padding_side="left")


def _image_processor(family: str):
    import transformers as t

    square = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    half = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    if family.startswith("qwen"):  # 48 px images -> 32 x 32 (max_pixels) -> 8 x 8 patches -> 16 tokens
        return t.Qwen2VLImageProcessor(patch_size=PATCH, merge_size=2, temporal_patch_size=2,
                                       size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})
    if family == "gemma3":
        return t.Gemma3ImageProcessor(size=square, **half)
    if family == "paligemma":
        return t.SiglipImageProcessor(size=square, image_seq_length=(IMAGE_SIZE // PATCH) ** 2, **half)
    if family in ("idefics3", "smolvlm"):  # 48 px -> 32 px -> 2 x 2 splits of 16 px + the global image
        image_class = t.Idefics3ImageProcessor if family == "idefics3" else t.SmolVLMImageProcessor
        return image_class(size={"longest_edge": 2 * IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE},
                           do_image_splitting=True, **half)
    if family == "mllama":
        return t.MllamaImageProcessor(size=square, max_image_tiles=2)
    if family == "internvl":
        return t.GotOcr2ImageProcessor(size=square, crop_to_patches=False, **half)
    if family == "llava_onevision":
        return t.LlavaOnevisionImageProcessor(size=square, crop_size=square,
                                              image_grid_pinpoints=[[16, 16], [16, 32], [32, 16], [32, 32]], **half)
    raise ValueError(f"no tiny image processor for {family!r}")


def _video_processor(family: str):
    """The family's video processor at the image sizes (Qwen-VL: 16 x 16 to 32 x 32 x 2 pixels per frame)."""
    import transformers as t

    square = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if family.startswith("qwen"):
        video_class = t.Qwen3VLVideoProcessor if family == "qwen3_vl" else t.Qwen2VLVideoProcessor
        return video_class(patch_size=PATCH, merge_size=2, temporal_patch_size=2,
                           size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32 * 2})
    if family == "smolvlm":
        return t.SmolVLMVideoProcessor(size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE})
    video_class = t.InternVLVideoProcessor if family == "internvl" else t.LlavaOnevisionVideoProcessor
    return video_class(size=square)


STYLE = {"qwen2_vl": "qwen", "qwen2_5_vl": "qwen", "qwen3_vl": "qwen", "gemma3": "gemma", "paligemma": "paligemma",
         "idefics3": "idefics3", "smolvlm": "idefics3", "mllama": "mllama", "internvl": "internvl",
         "llava_onevision": "llava_onevision"}
TOKENS_PER_IMAGE = 4  # Gemma 3 (pooled), Idefics3 / SmolVLM (per split), InternVL (per tile)


def tiny_processor(family: str):
    """The family's processor: tiny tokenizer + image processor + chat template (PaliGemma: none)."""
    import transformers as t

    style = STYLE[family]
    tokenizer, images = tiny_tokenizer(style), _image_processor(family)
    template = CHAT_TEMPLATES.get(style)
    if family.startswith("qwen"):
        processor_class = {"qwen2_vl": t.Qwen2VLProcessor, "qwen2_5_vl": t.Qwen2_5_VLProcessor,
                           "qwen3_vl": t.Qwen3VLProcessor}[family]
        return processor_class(image_processor=images, tokenizer=tokenizer, video_processor=_video_processor(family),
                               chat_template=template)
    if family == "gemma3":
        return t.Gemma3Processor(images, tokenizer, chat_template=template, image_seq_length=TOKENS_PER_IMAGE)
    if family == "paligemma":
        return t.PaliGemmaProcessor(images, tokenizer)
    if family == "idefics3":
        return t.Idefics3Processor(images, tokenizer, image_seq_len=TOKENS_PER_IMAGE, chat_template=template)
    if family == "smolvlm":
        return t.SmolVLMProcessor(images, tokenizer, _video_processor(family), image_seq_len=TOKENS_PER_IMAGE, chat_template=template)
    if family == "mllama":
        return t.MllamaProcessor(images, tokenizer, chat_template=template)
    if family == "internvl":
        return t.InternVLProcessor(images, tokenizer, _video_processor(family), image_seq_length=TOKENS_PER_IMAGE, chat_template=template)
    return t.LlavaOnevisionProcessor(images, tokenizer, _video_processor(family), num_image_tokens=(IMAGE_SIZE // PATCH) ** 2,
                                     vision_feature_select_strategy="full", chat_template=template)


def save_tiny_family(family: str, path: str | Path) -> Path:
    """Save the tiny ``family`` model with its processor to ``path``; returns ``path``."""
    if family not in STYLE:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(STYLE)}")
    path = Path(path)
    specials = len(tiny_tokenizer(STYLE[family]))  # the special tokens end here, whatever the processor adds
    processor = tiny_processor(family)
    tokenizer = processor.tokenizer  # PaliGemma's processor adds 1152 location / segmentation tokens
    model = tiny_family_model(family, config=tiny_config(family, len(tokenizer), token_ids(specials)))
    model.generation_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path

