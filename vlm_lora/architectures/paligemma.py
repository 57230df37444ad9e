"""PaliGemma (1 and 2) in transformers 5: a SigLIP tower, one linear projector, a Gemma (1) or Gemma 2
decoder with a prefix-LM mask over image + prompt.

- vision encoder ``model.vision_tower.encoder.layers.{i}.self_attn.{q,k,v,out}_proj``, ``.mlp.fc1/fc2``;
  patch embedding ``model.vision_tower.embeddings.patch_embedding``, never adapted
- connector ``model.multi_modal_projector.linear``
- language decoder ``model.language_model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``.mlp.{gate,up,down}_proj``
"""

from vlm_lora.architectures.registry import (ATTN_QKV, CLIP_VISION_TARGETS, LLAMA_TARGETS, MLP_GATE_UP, Architecture,
                                             ComponentMap, register)

register(Architecture(
    name="paligemma",
    model_classes=("PaliGemmaForConditionalGeneration",),
    components={
        "vision_encoder": ComponentMap(("model.vision_tower",), CLIP_VISION_TARGETS, shared_inputs=(ATTN_QKV,)),
        "connector": ComponentMap(("model.multi_modal_projector",)),
        "language_decoder": ComponentMap(("model.language_model",), LLAMA_TARGETS,
                                         shared_inputs=(ATTN_QKV, MLP_GATE_UP)),
        "lm_head": ComponentMap(("lm_head",)),
    },
    never_adapted=("model.vision_tower.embeddings.patch_embedding",),
    fsdp_wrap_classes=("SiglipEncoderLayer", "GemmaDecoderLayer", "Gemma2DecoderLayer"),
))
