"""LLaVA (1.5, NeXT) and LLaVA-OneVision in transformers 5: a CLIP (1.5, NeXT) or SigLIP (OneVision)
vision tower, an MLP projector and a Llama / Vicuna / Mistral / Qwen2 decoder. SigLIP's leaves have
CLIP's names; LLaVA-OneVision's tiles (anyres) change the inputs, not the modules.

- vision encoder ``model.vision_tower.encoder.layers.{i}.self_attn.{q,k,v,out}_proj``, ``.mlp.fc1/fc2``;
  patch embedding ``model.vision_tower.embeddings.patch_embedding`` (never adapted)
- connector ``model.multi_modal_projector.linear_1`` / ``.linear_2``
- language decoder ``model.language_model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``.mlp.{gate,up,down}_proj``
"""

from vlm_lora.architectures.registry import (ATTN_QKV, CLIP_VISION_TARGETS, LLAMA_TARGETS, MLP_GATE_UP, Architecture,
                                             ComponentMap, register)

VISION_BLOCKS = ("CLIPEncoderLayer", "SiglipEncoderLayer")
DECODER_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")

register(Architecture(
    name="llava",
    model_classes=("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                   "LlavaOnevisionForConditionalGeneration"),
    components={
        "vision_encoder": ComponentMap(("model.vision_tower",), CLIP_VISION_TARGETS, shared_inputs=(ATTN_QKV,)),
        "connector": ComponentMap(("model.multi_modal_projector",), {"fc1": "linear_1", "fc2": "linear_2"}),
        "language_decoder": ComponentMap(("model.language_model",), LLAMA_TARGETS,
                                         shared_inputs=(ATTN_QKV, MLP_GATE_UP)),
        "lm_head": ComponentMap(("lm_head",)),
    },
    never_adapted=("model.vision_tower.embeddings.patch_embedding",),
    fsdp_wrap_classes=VISION_BLOCKS + DECODER_LAYERS,
))
