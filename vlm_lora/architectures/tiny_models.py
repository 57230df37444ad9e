"""Tiny random-init models of every registered architecture, built from configs (no downloads).

Each factory seeds torch, returns the model in eval mode and takes well under a second. Shapes are
chosen so that every dimension differs (vision width != Q-Former width != decoder width), which makes
parameter-count tests meaningful. ``save_tiny_blip2`` writes a loadable BLIP-2 folder with a processor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

IMAGE_SIZE = 16  # 2 x 2 patches of 8
NUM_QUERY_TOKENS = 4
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]  # ids 0..3 in the saved BLIP-2 tokenizer
_SENTENCES = [
    "a photo of a cat on a couch", "two dogs playing in the park", "a red car parked on the street",
    "a bowl of fruit on a wooden table", "question: what is in the image? answer: a bird",
    "a man riding a bicycle down the road", "cells under a microscope", "a plate with food",
]


def _blip2_parts(text_config):
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=IMAGE_SIZE, patch_size=8)
    qformer = Blip2QFormerConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                 encoder_hidden_size=32, cross_attention_frequency=2, vocab_size=64,
                                 max_position_embeddings=32)
    return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                       text_config=text_config.to_dict(), num_query_tokens=NUM_QUERY_TOKENS,
                       image_token_index=3)


def _opt_config(vocab_size: int = 64):
    from transformers import OPTConfig

    return OPTConfig(vocab_size=vocab_size, hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64, word_embed_proj_dim=48, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2)


def tiny_blip2_opt() -> nn.Module:
    """BLIP-2, OPT decoder: vision 2 x 32, Q-Former 3 x 24 (cross-attention in layers 0, 2), OPT 2 x 48."""
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(0)
    return Blip2ForConditionalGeneration(_blip2_parts(_opt_config())).eval()


def tiny_blip2_t5() -> nn.Module:
    """BLIP-2, flan-T5 (gated-gelu, untied head) LM: 2 encoder + 2 decoder blocks of width 40."""
    from transformers import Blip2ForConditionalGeneration, T5Config

    text = T5Config(vocab_size=64, d_model=40, d_kv=10, d_ff=80, num_layers=2, num_decoder_layers=2, num_heads=4,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                    pad_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    return Blip2ForConditionalGeneration(_blip2_parts(text)).eval()


def tiny_instructblip() -> nn.Module:
    """InstructBLIP, OPT decoder, same sizes as :func:`tiny_blip2_opt` (its Q-Former also embeds text)."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    blip2 = _blip2_parts(_opt_config())
    config = InstructBlipConfig(vision_config=blip2.vision_config.to_dict(),
                                qformer_config=blip2.qformer_config.to_dict(),
                                text_config=blip2.text_config.to_dict(), num_query_tokens=NUM_QUERY_TOKENS,
                                image_token_index=3)
    torch.manual_seed(0)
    return InstructBlipForConditionalGeneration(config).eval()


def tiny_timm_vit(num_classes: int = 10) -> nn.Module:
    """timm ViT: 16 px images, patch 8, 2 blocks of width 32, a ``num_classes`` head."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=IMAGE_SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2,
                             num_classes=num_classes).eval()


def tiny_open_clip() -> nn.Module:
    """open_clip CLIP: vision 2 blocks of width 32 (16 px, patch 8), text 2 blocks of width 24, embed 16."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=2, width=32, head_width=8, mlp_ratio=2, patch_size=8, image_size=IMAGE_SIZE)
    text = CLIPTextCfg(context_length=8, vocab_size=64, width=24, heads=4, layers=2, mlp_ratio=2)
    return CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


OPEN_CLIP_CFG = {"embed_dim": 16, "vision_cfg": {"layers": 2, "width": 32, "head_width": 8, "mlp_ratio": 2,
                                                 "patch_size": 8, "image_size": 32},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 24, "heads": 4, "layers": 2,
                              "mlp_ratio": 2}}


def save_tiny_open_clip(path: str | Path) -> Path:
    """Save a tiny open_clip ``CLIP`` (32 px, vision 2 x 32, text 2 x 24 over open_clip's BPE vocabulary)
    as ``open_clip_config.json`` + ``open_clip_model.safetensors``; ``open_clip.create_model_and_transforms(
    "local-dir:<path>")`` loads it."""
    import json

    from open_clip.model import CLIP
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = CLIP(**OPEN_CLIP_CFG)
    config = {"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (path / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return path


def tiny_llava() -> nn.Module:
    """The LLaVA of ``tests/conftest.py``: 2-layer CLIP tower (32), 2-layer Llama (48, GQA 4/2)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=63, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", image_seq_length=4, pad_token_id=0)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def tiny_blip2_tokenizer(vocab_size: int = 300):
    """Byte-level BPE (all 256 bytes, merges learnt on a few captions) that prepends ``<s>`` like OPT's,
    with ``<pad>``, ``<s>``, ``</s>`` and the ``<image>`` token Blip2Processor expands per query token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_SENTENCES, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    # no ``image_token`` attribute: Blip2Processor then registers its own AddedToken("<image>"), already id 3
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   padding_side="right")


def save_tiny_blip2(path: str | Path) -> Path:
    """Save a tiny ``Blip2ForConditionalGeneration`` (OPT) with a working ``Blip2Processor`` to ``path``.

    ``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained(path)`` load it;
    ``processor(images=..., text=...)`` puts ``NUM_QUERY_TOKENS`` ``<image>`` tokens before ``<s>``.
    """
    from transformers import BlipImageProcessor, Blip2ForConditionalGeneration, Blip2Processor

    path = Path(path)
    tokenizer = tiny_blip2_tokenizer()
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_convert_rgb=True)
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    config = _blip2_parts(_opt_config(vocab_size=len(tokenizer)))
    config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    model.generation_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


FACTORIES = {
    "blip2_opt": tiny_blip2_opt,
    "blip2_t5": tiny_blip2_t5,
    "timm_vit": tiny_timm_vit,
    "open_clip": tiny_open_clip,
    "llava": tiny_llava,
}
"""Registry entry name -> factory of a tiny model of it."""
