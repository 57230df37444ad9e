"""Shared fixtures: tiny models built from configs (no downloads), the embedded assets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ASSET_MODEL = REPO / "assets" / "tiny-llava"
ASSET_DATA = REPO / "assets" / "data"


def tiny_llava_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=16, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=63, vision_feature_layer=-1,
                       vision_feature_select_strategy="default", image_seq_length=4, pad_token_id=0)


@pytest.fixture
def tiny_llava():
    """A random-init LLaVA with a 2-layer CLIP tower and a 2-layer Llama decoder, eval mode."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    return LlavaForConditionalGeneration(tiny_llava_config()).eval()


@pytest.fixture
def tiny_batch():
    """input_ids [2, 10] with 4 image tokens each, pixel_values [2, 3, 16, 16]."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 60, (2, 10), generator=g)
    ids[:, 1:5] = 63
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def randomize_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every LoRA B (and fully-trained weight) non-zero values so tests see real updates."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05 + (param if "lora_" not in name else 0))
