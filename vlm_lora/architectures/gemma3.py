"""Gemma 3 (4B-27B, image-text) in transformers 5: a SigLIP tower, a pooling projector and a Gemma 3 decoder.

- vision encoder ``model.vision_tower.encoder.layers.{i}.self_attn.{q,k,v,out}_proj``, ``.mlp.fc1/fc2``;
  patch embedding ``model.vision_tower.embeddings.patch_embedding``, never adapted. Configs with
  ``vision_use_head`` (the default config, not the released checkpoints) add an attention-pooling head
  ``model.vision_tower.head.attention`` (``nn.MultiheadAttention``): target ``pool`` puts
  ``LoraMultiheadAttention`` on all its slices; no default targets it (Gemma 3 feeds the LM the patch
  features, not the pooled one, so the head gets no gradient unless you use its output yourself).
- connector ``model.multi_modal_projector``: ``mm_input_projection_weight`` (an ``nn.Parameter``, no
  ``nn.Linear``) and ``mm_soft_emb_norm``: trained in full, never LoRA
- language decoder ``model.language_model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``.mlp.{gate,up,down}_proj``;
  the scaled word embedding is an ``nn.Embedding``, never a LoRA target
"""

from vlm_lora.architectures.registry import (ATTN_QKV, CLIP_VISION_TARGETS, LLAMA_TARGETS, MLP_GATE_UP, Architecture,
                                             ComponentMap, register)

register(Architecture(
    name="gemma3",
    model_classes=("Gemma3ForConditionalGeneration",),
    components={
        "vision_encoder": ComponentMap(("model.vision_tower",), {**CLIP_VISION_TARGETS, "pool": "head.attention"},
                                       fused={"head.attention": ("q", "k", "v", "o")}, shared_inputs=(ATTN_QKV,)),
        "connector": ComponentMap(("model.multi_modal_projector",)),
        "language_decoder": ComponentMap(("model.language_model",), LLAMA_TARGETS,
                                         shared_inputs=(ATTN_QKV, MLP_GATE_UP)),
        "lm_head": ComponentMap(("lm_head",)),
    },
    never_adapted=("model.vision_tower.embeddings.patch_embedding",),
    fsdp_wrap_classes=("SiglipEncoderLayer", "Gemma3DecoderLayer"),
))
