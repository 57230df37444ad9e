"""Mllama (Llama 3.2 Vision, 11B / 90B) in transformers 5: a two-stage ViT over image tiles, one linear
projector and a Llama decoder that interleaves cross-attention layers (every 5th layer).

- vision encoder ``model.vision_model``: a local ``transformer.layers.{i}`` and a gated
  ``global_transformer.layers.{i}``, both ``self_attn.{q,k,v,o}_proj`` and ``mlp.fc1/fc2``; tile and position
  embeddings; patch embedding ``model.vision_model.patch_embedding``, never adapted
- cross-attention: in layers ``text_config.cross_attention_layers`` (3, 8, ... 38 for 11B),
  ``model.language_model.layers.{i}.cross_attn.{q,k,v,o}_proj`` and the tanh gates ``cross_attn_attn_gate`` /
  ``cross_attn_mlp_gate`` (``nn.Parameter``)
- language decoder: everything else of ``model.language_model``: ``layers.{i}.self_attn`` (self-attention
  layers), ``layers.{i}.mlp`` and the norms (all layers), embeddings and final norm
- connector ``model.multi_modal_projector`` (one ``nn.Linear``)

Strategy ``both`` adapts the cross-attention layers too (``strategy_extras``), with the
cross-attention default policy (q, k, v, r=16).

Prefixes cannot contain wildcards, so the two language-side components list per-layer prefixes for
layers 0..127 (absent ones are skipped by the planner), as BLIP-2's Q-Former split does.
"""

from vlm_lora.architectures.registry import (ATTN_QKV, CLIP_VISION_TARGETS, LLAMA_TARGETS, MLP_GATE_UP, Architecture,
                                             ComponentMap, register)

_MAX_TEXT_LAYERS = 128  # Llama-3.2-90B-Vision has 100
_LAYER = "model.language_model.layers.{i}."
_CROSS = ("cross_attn", "cross_attn_attn_gate", "cross_attn_mlp_gate")
_DECODER = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


def _per_layer(blocks: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_LAYER.format(i=i) + block for i in range(_MAX_TEXT_LAYERS) for block in blocks)


register(Architecture(
    name="mllama",
    model_classes=("MllamaForConditionalGeneration",),
    components={
        "vision_encoder": ComponentMap(("model.vision_model",), {**CLIP_VISION_TARGETS, "o": "self_attn.o_proj"},
                                       shared_inputs=(ATTN_QKV,)),
        "cross_attention": ComponentMap(
            _per_layer(_CROSS),
            {"q": "cross_attn.q_proj", "k": "cross_attn.k_proj", "v": "cross_attn.v_proj", "o": "cross_attn.o_proj"},
            shared_inputs=(("cross_attn.k_proj", "cross_attn.v_proj"),)),  # both read the vision states
        "connector": ComponentMap(("model.multi_modal_projector",)),
        "language_decoder": ComponentMap(
            ("model.language_model.embed_tokens", "model.language_model.norm") + _per_layer(_DECODER),
            LLAMA_TARGETS, shared_inputs=(ATTN_QKV, MLP_GATE_UP)),
        "lm_head": ComponentMap(("lm_head",)),
    },
    never_adapted=("model.vision_model.patch_embedding",),
    fsdp_wrap_classes=("MllamaVisionEncoderLayer", "MllamaSelfAttentionDecoderLayer",
                       "MllamaCrossAttentionDecoderLayer"),
    strategy_extras={"both": {"cross_attention": "its cross-attention layers are where the language decoder "
                                                 "reads the image; strategy language_only leaves them frozen"}},
))
