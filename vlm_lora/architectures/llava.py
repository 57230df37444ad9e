"""LLaVA (1.5 and NeXT) in transformers 5: CLIP vision tower, MLP projector, Llama-family decoder."""

from vlm_lora.architectures.registry import Architecture, ComponentMap, register

_CLIP_VISION_TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                        "o": "self_attn.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_LLAMA_TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                  "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}

_ATTN_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")

register(Architecture(
    name="llava",
    model_classes=("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"),
    components={
        "vision_encoder": ComponentMap(("model.vision_tower",), _CLIP_VISION_TARGETS, shared_inputs=(_ATTN_QKV,)),
        "connector": ComponentMap(("model.multi_modal_projector",), {"fc1": "linear_1", "fc2": "linear_2"}),
        "language_decoder": ComponentMap(("model.language_model",), _LLAMA_TARGETS,
                                         shared_inputs=(_ATTN_QKV, _MLP_GATE_UP)),
        "lm_head": ComponentMap(("lm_head",)),
    },
    never_adapted=("model.vision_tower.embeddings.patch_embedding",),
))
