"""Published ``config.json`` hyperparameters of the shipped recipes' hub ids and of each family's main
checkpoints, as data, so that ``vlm-lora plan --meta`` builds their shapes without network access.

Each entry is ``hub id -> (config class name, kwargs)``, copied from the model's ``config.json`` on the
hub: sizes, layer counts, heads, vocabulary, the vision tower, special token ids; nothing else of a
checkpoint is needed to plan. ``tests/test_published_configs.py`` checks every entry's parameter
count against the size the hub lists. Another model plans offline from a local folder holding just
its ``config.json`` (``hf download ORG/NAME config.json --local-dir DIR``).
"""

from __future__ import annotations

# towers and decoders several checkpoints share
_CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
               "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
               "projection_dim": 768}
_SIGLIP_SO400M = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                  "num_hidden_layers": 27, "num_attention_heads": 16, "patch_size": 14}
_INTERN_VIT_300M = {"model_type": "internvl_vision", "hidden_size": 1024, "intermediate_size": 4096,
                    "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": [448, 448],
                    "patch_size": [14, 14], "layer_scale_init_value": 0.1, "use_qk_norm": False,
                    "use_mean_pooling": True, "norm_type": "layer_norm", "projection_dropout": 0.0}
_QWEN2_VIT = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
_QWEN2_5_VIT = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                "fullatt_block_indexes": [7, 15, 23, 31]}
_QWEN3_VIT = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "patch_size": 16,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
              "deepstack_visual_indexes": [8, 16, 24]}
_MLLAMA_VISION = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_global_layers": 8,
                  "attention_heads": 16, "image_size": 560, "patch_size": 14, "max_num_tiles": 4,
                  "vision_output_dim": 7680, "intermediate_layers_indices": [3, 7, 15, 23, 30]}
_MROPE = {"rope_type": "default", "mrope_section": [16, 24, 24]}
_INTERLEAVED_MROPE = {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True}  # Qwen3-VL
_QWEN_VL_TOKENS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652}


def _qwen2(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tie: bool, **extra) -> dict:
    """A Qwen2 / Qwen2.5 decoder config (rope theta 1e6)."""
    return {"model_type": "qwen2", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "tie_word_embeddings": tie, "rope_theta": 1000000.0, **extra}


def _gemma3(hidden: int, inter: int, layers: int, heads: int, kv: int, head_dim: int,
            query_scalar: int) -> tuple[str, dict]:
    """A Gemma 3 image-text checkpoint: its decoder, SigLIP-400M at 896 px, 256 image tokens."""
    text = {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim, "vocab_size": 262208,
            "sliding_window": 1024, "query_pre_attn_scalar": query_scalar,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    return ("Gemma3Config", {"text_config": text,
                             "vision_config": {**_SIGLIP_SO400M, "image_size": 896, "vision_use_head": False},
                             "mm_tokens_per_image": 256, "image_token_index": 262144, "boi_token_index": 255999,
                             "eoi_token_index": 256000})


PUBLISHED_CONFIGS: dict[str, tuple[str, dict]] = {
    # ---- LLaVA (llava entry): 1.5, NeXT, OneVision
    "llava-hf/llava-1.5-7b-hf": ("LlavaConfig", {
        "vision_config": _CLIP_L_336,
        "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
        "image_token_index": 32000, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu", "pad_token_id": 32001}),
    "llava-hf/llava-v1.6-mistral-7b-hf": ("LlavaNextConfig", {
        "vision_config": _CLIP_L_336,
        "text_config": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "vocab_size": 32064, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                        "sliding_window": None},
        "image_token_index": 32000, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "pad_token_id": 32001}),
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": ("LlavaOnevisionConfig", {
        "vision_config": {**_SIGLIP_SO400M, "num_hidden_layers": 26, "image_size": 384},
        "text_config": _qwen2(3584, 18944, 28, 28, 4, 152128, False, max_position_embeddings=32768),
        "image_token_index": 151646, "video_token_index": 151647, "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"}),
    # ---- Qwen2-VL, Qwen2.5-VL, Qwen3-VL
    "Qwen/Qwen2-VL-7B-Instruct": ("Qwen2VLConfig", {
        "text_config": {**_qwen2(3584, 18944, 28, 28, 4, 152064, False, max_position_embeddings=32768),
                        "model_type": "qwen2_vl_text", "rope_scaling": _MROPE},
        "vision_config": {**_QWEN2_VIT, "hidden_size": 3584},
        **_QWEN_VL_TOKENS}),
    "Qwen/Qwen2-VL-2B-Instruct": ("Qwen2VLConfig", {
        "text_config": {**_qwen2(1536, 8960, 28, 12, 2, 151936, True, max_position_embeddings=32768),
                        "model_type": "qwen2_vl_text", "rope_scaling": _MROPE},
        "vision_config": {**_QWEN2_VIT, "hidden_size": 1536},
        **_QWEN_VL_TOKENS,
        "tie_word_embeddings": True}),
    "Qwen/Qwen2.5-VL-7B-Instruct": ("Qwen2_5_VLConfig", {
        "text_config": {**_qwen2(3584, 18944, 28, 28, 4, 152064, False, max_position_embeddings=128000),
                        "model_type": "qwen2_5_vl_text", "rope_scaling": _MROPE},
        "vision_config": {**_QWEN2_5_VIT, "out_hidden_size": 3584},
        **_QWEN_VL_TOKENS,
        "tie_word_embeddings": False}),
    "Qwen/Qwen2.5-VL-3B-Instruct": ("Qwen2_5_VLConfig", {
        "text_config": {**_qwen2(2048, 11008, 36, 16, 2, 151936, True, max_position_embeddings=128000),
                        "model_type": "qwen2_5_vl_text", "rope_scaling": _MROPE},
        "vision_config": {**_QWEN2_5_VIT, "out_hidden_size": 2048},
        **_QWEN_VL_TOKENS,
        "tie_word_embeddings": True}),
    "Qwen/Qwen3-VL-8B-Instruct": ("Qwen3VLConfig", {
        "text_config": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                        "max_position_embeddings": 262144, "rope_theta": 5000000.0, "tie_word_embeddings": False,
                        "rope_scaling": _INTERLEAVED_MROPE},
        "vision_config": {**_QWEN3_VIT, "out_hidden_size": 4096},
        **_QWEN_VL_TOKENS,
        "tie_word_embeddings": False}),
    "Qwen/Qwen3-VL-30B-A3B-Instruct": ("Qwen3VLMoeConfig", {
        "text_config": {"hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                        "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
                        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                        "vocab_size": 151936, "max_position_embeddings": 262144, "rope_theta": 5000000.0,
                        "tie_word_embeddings": False,
                        "rope_scaling": _INTERLEAVED_MROPE},
        "vision_config": {**_QWEN3_VIT, "out_hidden_size": 2048},
        **_QWEN_VL_TOKENS,
        "tie_word_embeddings": False}),
    # ---- Gemma 3, PaliGemma
    "google/gemma-3-4b-it": _gemma3(2560, 10240, 34, 8, 4, 256, 256),
    "google/gemma-3-12b-it": _gemma3(3840, 15360, 48, 16, 8, 256, 256),
    "google/gemma-3-27b-it": _gemma3(5376, 21504, 62, 32, 16, 128, 168),
    "google/paligemma2-3b-pt-224": ("PaliGemmaConfig", {
        "text_config": {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216,
                        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                        "vocab_size": 257216, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                        "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
        "vision_config": {**_SIGLIP_SO400M, "image_size": 224, "projection_dim": 2304, "vision_use_head": False},
        "projection_dim": 2304, "hidden_size": 2304, "image_token_index": 257152}),
    "google/paligemma-3b-pt-224": ("PaliGemmaConfig", {
        "text_config": {"model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384,
                        "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256,
                        "vocab_size": 257216},
        "vision_config": {**_SIGLIP_SO400M, "image_size": 224, "projection_dim": 2048, "vision_use_head": False},
        "projection_dim": 2048, "hidden_size": 2048, "image_token_index": 257152}),
    # ---- Idefics3, SmolVLM
    "HuggingFaceM4/Idefics3-8B-Llama3": ("Idefics3Config", {
        "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "vocab_size": 128259, "max_position_embeddings": 10240, "rope_theta": 500000.0},
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                          "num_attention_heads": 16, "image_size": 364, "patch_size": 14},
        "scale_factor": 2, "image_token_id": 128257, "tie_word_embeddings": False}),
    "HuggingFaceTB/SmolVLM-Instruct": ("Idefics3Config", {
        "text_config": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
                        "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32,
                        "vocab_size": 49155, "max_position_embeddings": 16384, "rope_theta": 273768.0,
                        "tie_word_embeddings": False},
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                          "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
        "scale_factor": 3, "image_token_id": 49153, "tie_word_embeddings": False}),
    # ---- Llama 3.2 Vision
    "meta-llama/Llama-3.2-11B-Vision-Instruct": ("MllamaConfig", {
        "text_config": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 40,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "rope_theta": 500000.0},
        "vision_config": _MLLAMA_VISION,
        "image_token_index": 128256}),
    "meta-llama/Llama-3.2-90B-Vision-Instruct": ("MllamaConfig", {
        "text_config": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 100,
                        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                        "cross_attention_layers": list(range(3, 100, 5)), "rope_theta": 500000.0},
        "vision_config": _MLLAMA_VISION,
        "image_token_index": 128256}),
    # ---- InternVL (-hf)
    "OpenGVLab/InternVL3-1B-hf": ("InternVLConfig", {
        "vision_config": _INTERN_VIT_300M,
        "text_config": _qwen2(896, 4864, 24, 14, 2, 151674, False, max_position_embeddings=32768),
        "tie_word_embeddings": False, "image_token_id": 151667, "downsample_ratio": 0.5, "projector_hidden_act": "gelu",
        "vision_feature_layer": -1, "vision_feature_select_strategy": "default"}),
    "OpenGVLab/InternVL3-8B-hf": ("InternVLConfig", {
        "vision_config": _INTERN_VIT_300M,
        "text_config": _qwen2(3584, 18944, 28, 28, 4, 151674, False, max_position_embeddings=32768),
        "tie_word_embeddings": False, "image_token_id": 151667, "downsample_ratio": 0.5, "projector_hidden_act": "gelu",
        "vision_feature_layer": -1, "vision_feature_select_strategy": "default"}),
    # ---- BLIP-2
    "Salesforce/blip2-opt-2.7b": ("Blip2Config", {
        "vision_config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                          "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "qkv_bias": True},
        "qformer_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                           "num_attention_heads": 12, "encoder_hidden_size": 1408, "cross_attention_frequency": 2,
                           "vocab_size": 30522},
        "text_config": {"model_type": "opt", "hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "vocab_size": 50272, "word_embed_proj_dim": 2560,
                        "max_position_embeddings": 2048, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 50118},
        "num_query_tokens": 32, "image_token_index": 50265}),
}


def published_config(hub_id: str):
    """The transformers config of ``hub_id`` built from the table above; None if it is not listed."""
    if hub_id not in PUBLISHED_CONFIGS:
        return None
    import copy

    import transformers

    class_name, kwargs = PUBLISHED_CONFIGS[hub_id]
    return getattr(transformers, class_name)(**copy.deepcopy(kwargs))  # config classes may edit the dicts
