"""InternVL (2.5 / 3, ``-hf`` checkpoints) in transformers 5: InternViT, an MLP projector after pixel
unshuffle, a Qwen2 (or Llama) decoder. Images arrive as 448 px tiles.

- vision encoder ``model.vision_tower.encoder.layer.{i}.attention.{q,k,v}_proj``, attention output
  ``.attention.projection_layer``, ``.mlp.fc1/fc2``; patch embedding
  ``model.vision_tower.embeddings.patch_embeddings.projection``, never adapted
- connector ``model.multi_modal_projector.linear_1`` / ``.linear_2``
- language decoder ``model.language_model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``.mlp.{gate,up,down}_proj``
"""

from vlm_lora.architectures.registry import (ATTN_QKV, LLAMA_TARGETS, MLP_GATE_UP, Architecture, ComponentMap,
                                             register)

_VISION_QKV = ("attention.q_proj", "attention.k_proj", "attention.v_proj")

register(Architecture(
    name="internvl",
    model_classes=("InternVLForConditionalGeneration",),
    components={
        "vision_encoder": ComponentMap(
            ("model.vision_tower",),
            {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
             "o": "attention.projection_layer", "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
            shared_inputs=(_VISION_QKV,)),
        "connector": ComponentMap(("model.multi_modal_projector",), {"fc1": "linear_1", "fc2": "linear_2"}),
        "language_decoder": ComponentMap(("model.language_model",), LLAMA_TARGETS,
                                         shared_inputs=(ATTN_QKV, MLP_GATE_UP)),
        "lm_head": ComponentMap(("lm_head",)),
    },
    never_adapted=("model.vision_tower.embeddings.patch_embeddings.projection",),
    fsdp_wrap_classes=("InternVLVisionLayer", "Qwen2DecoderLayer", "LlamaDecoderLayer"),
))
