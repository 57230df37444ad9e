"""Save a random-weight LLaVA with LLaVA-1.5 proportions (CLIP-L-like tower, a 2k-wide Llama) that
uses the embedded tiny-llava processor, for multi-GPU throughput runs without downloads::

    python bench/make_llava_shaped.py /tmp/llava-shaped   # ~1.3B params, bf16
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]


def save_llava_shaped(out, vision_width: int = 1024, vision_mlp: int = 4096, vision_layers: int = 24,
                      vision_heads: int = 16, text_width: int = 2048, text_mlp: int = 5504, text_layers: int = 16,
                      text_heads: int = 16, dtype=torch.bfloat16) -> int:
    """Save a random LLaVA of these widths (tiny-llava's processor, 48 px images) to ``out``; its parameter count."""
    processor = AutoProcessor.from_pretrained(REPO / "assets" / "tiny-llava")
    base = LlavaConfig.from_pretrained(REPO / "assets" / "tiny-llava")
    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=vision_mlp, num_hidden_layers=vision_layers,
                              num_attention_heads=vision_heads, image_size=48, patch_size=8)
    text = LlamaConfig(vocab_size=base.text_config.vocab_size, hidden_size=text_width, intermediate_size=text_mlp,
                       num_hidden_layers=text_layers, num_attention_heads=text_heads, max_position_embeddings=512,
                       bos_token_id=base.text_config.bos_token_id, eos_token_id=base.text_config.eos_token_id,
                       pad_token_id=base.text_config.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=base.image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=base.image_seq_length, pad_token_id=base.pad_token_id)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(dtype)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main(out: str) -> None:
    print(f"{save_llava_shaped(out) / 1e9:.2f}B params")

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/llava-shaped")
