"""Tiny random-init configs of the modern VLM families (Qwen-VL, Gemma 3, PaliGemma, Idefics3 /
SmolVLM, Mllama, InternVL, LLaVA-OneVision), for tests and ``scripts/make_tiny_models.py``.

Every family gets a 2-block vision tower of width 32 (16 px images, patch 4: 4 x 4 patches) and a
2-layer decoder of width 48 (GQA 4 / 2 heads); Mllama adds one cross-attention layer. Widths differ
per part so that parameter counts in tests are meaningful. ``TOKENS`` are the special-token ids every
config is built with; a saved tiny model's tokenizer puts its special tokens at these ids.
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_SIZE = 16
PATCH = 4
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
TEXT = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 1024}
# ids of the special tokens (a tokenizer of ``vocab_size`` tokens ends with them, see make_tiny_models)
TOKEN_NAMES = ("pad", "bos", "eos", "image", "video", "vision_start", "vision_end", "boi", "eoi", "fake_image",
               "global_image", "row_col", "im_start", "im_end", "img_context", "start_of_turn", "end_of_turn")


def token_ids(vocab_size: int) -> dict[str, int]:
    """Special-token name -> id: the last ``len(TOKEN_NAMES)`` ids of the vocabulary, in that order."""
    first = vocab_size - len(TOKEN_NAMES)
    return {name: first + i for i, name in enumerate(TOKEN_NAMES)}


def _siglip(**extra) -> dict:
    return {"model_type": "siglip_vision_model", **VISION, "image_size": IMAGE_SIZE, "patch_size": PATCH, **extra}


def _text(model_type: str, vocab: int, ids: dict, **extra) -> dict:
    return {"model_type": model_type, **TEXT, "vocab_size": vocab, "pad_token_id": ids["pad"],
            "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], **extra}


_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]}  # head_dim 12: 6 = 2 + 2 + 2


def qwen2_vl(vocab: int, ids: dict, version: str = "2"):
    """Qwen2-VL / Qwen2.5-VL (``version`` "2" / "2.5"): patch 4, 2 x 2 merge, 2-frame patches."""
    import transformers

    vision = {"depth": 2, "num_heads": 4, "patch_size": PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if version == "2":
        vision.update(embed_dim=32, hidden_size=48, mlp_ratio=2)
        config_class = transformers.Qwen2VLConfig
    else:
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=48, window_size=16,
                      fullatt_block_indexes=[1])
        config_class = transformers.Qwen2_5_VLConfig
    text = _text("qwen2_vl_text" if version == "2" else "qwen2_5_vl_text", vocab, ids, rope_parameters=_MROPE)
    return config_class(text_config=text, vision_config=vision, image_token_id=ids["image"],
                        video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
                        vision_end_token_id=ids["vision_end"], tie_word_embeddings=False)


def qwen3_vl(vocab: int, ids: dict, moe: bool = False):
    """Qwen3-VL (dense or MoE with 4 experts): learnt 8 x 8 position grid, one DeepStack merger."""
    import transformers

    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 48,
              "patch_size": PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
    rope = {**_MROPE, "mrope_interleaved": True}
    if moe:
        text = _text("qwen3_vl_moe_text", vocab, ids, head_dim=12, rope_parameters=rope, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
        config_class = transformers.Qwen3VLMoeConfig
    else:
        text = _text("qwen3_vl_text", vocab, ids, head_dim=12, rope_parameters=rope)
        config_class = transformers.Qwen3VLConfig
    return config_class(text_config=text, vision_config=vision, image_token_id=ids["image"],
                        video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
                        vision_end_token_id=ids["vision_end"], tie_word_embeddings=False)


def gemma3(vocab: int, ids: dict, vision_use_head: bool = False):
    """Gemma 3: SigLIP 4 x 4 patches pooled to 2 x 2 = 4 image tokens; ``vision_use_head`` adds the
    attention-pooling head (an ``nn.MultiheadAttention``) of the default config."""
    from transformers import Gemma3Config

    text = _text("gemma3_text", vocab, ids, head_dim=12, sliding_window=16)
    return Gemma3Config(text_config=text, vision_config=_siglip(vision_use_head=vision_use_head),
                        mm_tokens_per_image=4, image_token_index=ids["image"], boi_token_index=ids["boi"],
                        eoi_token_index=ids["eoi"], pad_token_id=ids["pad"], bos_token_id=ids["bos"],
                        eos_token_id=ids["eos"])


def paligemma(vocab: int, ids: dict):
    """PaliGemma: SigLIP 4 x 4 patches = 16 image tokens, projected to the Gemma width."""
    from transformers import PaliGemmaConfig

    text = _text("gemma", vocab, ids, head_dim=12)
    return PaliGemmaConfig(text_config=text, vision_config=_siglip(vision_use_head=False), projection_dim=48,
                           image_token_index=ids["image"], pad_token_id=ids["pad"], bos_token_id=ids["bos"],
                           eos_token_id=ids["eos"])


def idefics3(vocab: int, ids: dict, smolvlm: bool = False):
    """Idefics3 / SmolVLM: 4 x 4 patches, pixel shuffle x 2 = 4 image tokens per split."""
    import transformers

    config_class = transformers.SmolVLMConfig if smolvlm else transformers.Idefics3Config
    vision = {**VISION, "image_size": IMAGE_SIZE, "patch_size": PATCH}
    return config_class(vision_config=vision, text_config=_text("llama", vocab, ids), scale_factor=2,
                        image_token_id=ids["image"], pad_token_id=ids["pad"], tie_word_embeddings=False)


def mllama(vocab: int, ids: dict):
    """Mllama: 16 px tiles (up to 2), local 2 + global 1 layers; decoder of 3 layers, layer 1 cross-attention."""
    from transformers import MllamaConfig

    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_global_layers": 1,
              "attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": PATCH, "max_num_tiles": 2,
              "intermediate_layers_indices": [0], "vision_output_dim": 64,
              "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]]}
    text = _text("mllama_text_model", vocab - 8, ids, num_hidden_layers=3, cross_attention_layers=[1])
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=ids["image"])


def internvl(vocab: int, ids: dict):
    """InternVL: InternViT 4 x 4 patches, pixel unshuffle 0.5 = 4 image tokens per tile, Qwen2 decoder."""
    from transformers import InternVLConfig

    vision = {**VISION, "image_size": [IMAGE_SIZE, IMAGE_SIZE], "patch_size": [PATCH, PATCH]}
    return InternVLConfig(vision_config=vision, text_config=_text("qwen2", vocab, ids), downsample_ratio=0.5,
                          image_token_id=ids["image"], image_seq_length=4)


def llava_onevision(vocab: int, ids: dict):
    """LLaVA-OneVision: SigLIP 4 x 4 patches (16 tokens per crop, anyres up to 2 x 2 crops), Qwen2 decoder."""
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(vision_config=_siglip(vision_use_head=False), text_config=_text("qwen2", vocab, ids),
                                image_token_index=ids["image"], video_token_index=ids["video"],
                                vision_feature_layer=-1, vision_feature_select_strategy="full",
                                vision_aspect_ratio="anyres_max_9",
                                image_grid_pinpoints=[[16, 16], [16, 32], [32, 16], [32, 32]],
                                tie_word_embeddings=False)


# family name -> (model class name, config builder(vocab_size, token ids))
FAMILIES = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", qwen2_vl),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", lambda v, i: qwen2_vl(v, i, version="2.5")),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", qwen3_vl),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", lambda v, i: qwen3_vl(v, i, moe=True)),
    "gemma3": ("Gemma3ForConditionalGeneration", gemma3),
    "paligemma": ("PaliGemmaForConditionalGeneration", paligemma),
    "idefics3": ("Idefics3ForConditionalGeneration", idefics3),
    "smolvlm": ("SmolVLMForConditionalGeneration", lambda v, i: idefics3(v, i, smolvlm=True)),
    "mllama": ("MllamaForConditionalGeneration", mllama),
    "internvl": ("InternVLForConditionalGeneration", internvl),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration", llava_onevision),
}


def tiny_config(family: str, vocab_size: int = 128, ids: dict[str, int] | None = None):
    """The tiny config of ``family`` (a key of ``FAMILIES``) for a vocabulary of ``vocab_size`` tokens,
    special tokens at ``ids`` (default: the vocabulary's last ids, ``token_ids(vocab_size)``)."""
    return FAMILIES[family][1](vocab_size, ids or token_ids(vocab_size))


def tiny_family_model(family: str, vocab_size: int = 128, config=None) -> nn.Module:
    """A random-init (seed 0) model of ``family`` in eval mode, from ``config`` or :func:`tiny_config`."""
    import transformers

    torch.manual_seed(0)
    model_class = getattr(transformers, FAMILIES[family][0])
    return model_class(config or tiny_config(family, vocab_size)).eval()


def default_family_model(family: str) -> nn.Module:
    """The model of ``family`` with its config class's defaults (full size), on the meta device."""
    import transformers

    model_class = getattr(transformers, FAMILIES[family][0])
    with torch.device("meta"):
        return model_class(model_class.config_class())
