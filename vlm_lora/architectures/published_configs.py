"""Published hyperparameters of a few hub checkpoints, as data, so that ``vlm-lora plan --meta`` can
build their shapes without network access (the shipped recipes name these ids).

Each entry is ``hub id -> (config class name, kwargs)`` copied from the model's ``config.json`` on the
hub (sizes, layer counts, heads, vocabulary); nothing else of the checkpoint is needed to plan.
"""

from __future__ import annotations

PUBLISHED_CONFIGS: dict[str, tuple[str, dict]] = {
    "Qwen/Qwen2.5-VL-7B-Instruct": ("Qwen2_5_VLConfig", {
        "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                        "max_position_embeddings": 128000, "rope_theta": 1000000.0, "tie_word_embeddings": False},
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                          "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
        "image_token_id": 151655, "video_token_id": 151656, "tie_word_embeddings": False}),
    "google/gemma-3-4b-it": ("Gemma3Config", {
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
                        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 262208,
                        "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                          "num_attention_heads": 16, "image_size": 896, "patch_size": 14, "vision_use_head": False},
        "mm_tokens_per_image": 256, "image_token_index": 262144}),
    "meta-llama/Llama-3.2-11B-Vision-Instruct": ("MllamaConfig", {
        "text_config": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 40,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "rope_theta": 500000.0},
        "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                          "num_global_layers": 8, "attention_heads": 16, "image_size": 560, "patch_size": 14,
                          "max_num_tiles": 4, "vision_output_dim": 7680,
                          "intermediate_layers_indices": [3, 7, 15, 23, 30]},
        "image_token_index": 128256}),
}


def published_config(hub_id: str):
    """The transformers config of ``hub_id`` built from the table above; None if it is not listed."""
    if hub_id not in PUBLISHED_CONFIGS:
        return None
    import transformers

    class_name, kwargs = PUBLISHED_CONFIGS[hub_id]
    return getattr(transformers, class_name)(**kwargs)
