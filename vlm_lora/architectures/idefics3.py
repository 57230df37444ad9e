"""Idefics3 and SmolVLM in transformers 5 (one layout): a SigLIP-style tower over image splits, a
pixel-shuffle connector and a Llama decoder.

- vision encoder ``model.vision_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj``, ``.mlp.fc1/fc2``;
  patch embedding ``model.vision_model.embeddings.patch_embedding``, never adapted
- connector ``model.connector.modality_projection.proj`` (after the pixel shuffle)
- language decoder ``model.text_model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``.mlp.{gate,up,down}_proj``
"""

from vlm_lora.architectures.registry import (ATTN_QKV, CLIP_VISION_TARGETS, LLAMA_TARGETS, MLP_GATE_UP, Architecture,
                                             ComponentMap, register)

register(Architecture(
    name="idefics3",
    model_classes=("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"),
    components={
        "vision_encoder": ComponentMap(("model.vision_model",), CLIP_VISION_TARGETS, shared_inputs=(ATTN_QKV,)),
        "connector": ComponentMap(("model.connector",)),
        "language_decoder": ComponentMap(("model.text_model",), LLAMA_TARGETS, shared_inputs=(ATTN_QKV, MLP_GATE_UP)),
        "lm_head": ComponentMap(("lm_head",)),
    },
    never_adapted=("model.vision_model.embeddings.patch_embedding",),
    fsdp_wrap_classes=("Idefics3EncoderLayer", "SmolVLMEncoderLayer", "LlamaDecoderLayer", "MistralDecoderLayer"),
))
