"""What the processors of the model families take and return, as data, and the padding of their outputs.

The collator asks this module how a processor wants its images (one flat list, or one list per
sample), whether it takes several images per sample, whether it builds prefix-LM labels itself, and
pads what the processor returned per sample into one batch; ``build_prompt`` renders the generation
prompt the processor's chat template makes of one user turn.
"""

from __future__ import annotations

import torch
from PIL import Image

from vlm_lora.data.datasets import FALLBACK_TEMPLATE

# Prefix-LM processors without a chat template that build labels themselves from ``suffix=`` (the answer):
# image tokens + BOS + prompt + "\n" is the prefix, the answer + EOS the suffix (``token_type_ids`` 1).
SUFFIX_PROCESSORS = ("PaliGemmaProcessor",)
# Processors that take one image per sample (a multi-image sample is refused); those that insert the image
# tokens themselves (BLIP-2 style, no chat template) are refused too.
SINGLE_IMAGE_PROCESSORS = SUFFIX_PROCESSORS + ("Blip2Processor", "InstructBlipProcessor")
# Processors that take the images of a batch as one flat list (one placeholder per image in the texts);
# the others take one list of images per sample (Idefics3/SmolVLM, Gemma3, Mllama, Qwen-VL, InternVL ...).
FLAT_IMAGE_PROCESSORS = ("LlavaProcessor",)


def inserts_image_tokens(processor) -> bool:
    """Whether the processor puts the image tokens in itself (BLIP-2) rather than expanding a placeholder."""
    token = getattr(processor, "image_token", None)
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None and token is not None:
        token_id = processor.tokenizer.convert_tokens_to_ids(str(token))
    if token_id is None:
        return False
    try:
        ids = processor(images=[Image.new("RGB", (32, 32))], text=["a"], return_tensors="pt")["input_ids"]
    except ValueError:  # e.g. LLaVA: "number of image tokens ... does not match"
        return False
    return bool((ids == token_id).any())


def _pad_to_common(values: list[torch.Tensor], fill) -> list[torch.Tensor]:
    """Each tensor padded at the end of every dim with ``fill`` to the largest size of that dim."""
    shape = [max(v.shape[d] for v in values) for d in range(values[0].dim())]
    out = []
    for v in values:
        pad = [p for d in reversed(range(v.dim())) for p in (0, shape[d] - v.shape[d])]
        out.append(torch.nn.functional.pad(v, pad, value=fill) if any(pad) else v)
    return out


def pad_batch(encoded: list[dict], per_token: set[str], fill: dict[str, int]) -> dict[str, torch.Tensor]:
    """Right-pad the per-token [T, ...] tensors to [B, T_max, ...] (``fill[key]``, else 0); concatenate the
    others along dim 0 (zero-padded to a common shape first when they differ and each is one sample's [1, ...]);
    those only some samples have (images beside video-only samples) are concatenated over those samples."""
    batch = {}
    for key in dict.fromkeys(k for e in encoded for k in e):  # text-only samples have no image tensors
        values = [e[key] for e in encoded if key in e]
        if key in per_token:
            batch[key] = torch.stack(_pad_to_common(values, fill.get(key, 0)))
        elif len({v.shape[1:] for v in values}) > 1 and all(v.shape[0] == 1 for v in values):
            batch[key] = torch.cat(_pad_to_common(values, 0))
        else:
            batch[key] = torch.cat(values)
    return batch


def pad_length_to_multiple(batch: dict[str, torch.Tensor], per_token: set[str], fill: dict[str, int],
                           multiple: int, limit: int | None = None) -> dict[str, torch.Tensor]:
    """The per-token [B, T, ...] tensors right-padded along T to the next multiple of ``multiple``, but not past
    ``limit`` (``train.max_length``: a model's positions may end there) (``fill[key]``, else 0: attention mask 0,
    labels ignored)."""
    length = batch["input_ids"].shape[1]
    extra = -length % multiple
    if limit is not None and length + extra > limit:
        extra = max(limit - length, 0)
    if not extra:
        return batch
    for key in per_token & batch.keys():
        value = batch[key]
        pad = [0, 0] * (value.dim() - 2) + [0, extra]
        batch[key] = torch.nn.functional.pad(value, pad, value=fill.get(key, 0))
    return batch


CUDA_LENGTH_MULTIPLE = 64  # data.pad_to_multiple_of: auto on CUDA


def length_multiple(data_cfg, cuda: bool) -> int | None:
    """``data.pad_to_multiple_of`` resolved. ``auto``: 64 on CUDA (not for packed rows). There SDPA runs cuDNN
    attention, which builds an execution plan for every new sequence length, about 130 ms per step (forward and
    backward) on an H100 for LLaVA-7B when every batch has its own length; with lengths in steps of 64 a run meets a
    few lengths and the plans are reused. On CPU the padding would only add work."""
    if data_cfg.pad_to_multiple_of != "auto":
        return data_cfg.pad_to_multiple_of
    return CUDA_LENGTH_MULTIPLE if cuda and not data_cfg.packing else None


# ---------------------------------------------------------------- prompts

def user_turn(text: str, n_images: int) -> dict:
    """A chat-template user turn: ``n_images`` image placeholders, then ``text``."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def build_prompt(processor, prompt: str, chat_template: str | None = None) -> str:
    """The generation prompt (user turn with one image, then the assistant cue).

    Chat template (``chat_template`` overrides the processor's); without one, the plain prompt for
    processors that insert image tokens themselves (BLIP-2), else ``FALLBACK_TEMPLATE``.
    """
    template = chat_template or getattr(processor, "chat_template", None)
    if template:
        return processor.apply_chat_template([user_turn(prompt, 1)], chat_template=template, add_generation_prompt=True)
    if inserts_image_tokens(processor):
        return prompt
    return FALLBACK_TEMPLATE.format(prompt=prompt)
